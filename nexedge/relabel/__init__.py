"""nexedge.relabel"""
