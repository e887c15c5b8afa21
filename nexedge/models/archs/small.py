"""Small from-scratch CNNs for CPUs, demos and tests (no pretrained weights)."""

from nexedge.models import ArchSpec

ARCHS = (
    ArchSpec("small_max", "small_max", "CPU-sized CNN ending in a global max-pool, so one small defect "
             "decides (--arch-kw width=16 for a smaller one)", "nexedge.models.zoo:small_max"),
    ArchSpec("tiny", "tiny", "a tiny CNN for tests and smoke runs", "nexedge.models.tiny:tiny", weights_file=False),
)
