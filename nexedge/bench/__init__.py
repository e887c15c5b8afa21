"""nexedge.bench"""
