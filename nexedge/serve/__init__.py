"""nexedge.serve"""
