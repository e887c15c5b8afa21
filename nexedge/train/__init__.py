"""nexedge.train"""
