"""nexedge.data"""
