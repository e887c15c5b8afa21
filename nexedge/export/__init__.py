"""nexedge.export"""
