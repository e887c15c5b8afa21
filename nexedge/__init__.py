"""nexedge: deploy semiconductor defect classifiers on inspection lines."""

__version__ = "0.1.0"
