"""nexedge.models"""
