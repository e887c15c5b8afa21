"""nexedge.store"""
