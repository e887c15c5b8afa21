"""torchvision's architectures (built by :mod:`nexedge.models.zoo`), their ``*_stn`` variants and
``resnet18_att2``.

A torchvision classifier whose last layer is ``fc`` or ``classifier[-1]`` needs only its specs
here: :func:`nexedge.models.zoo.torchvision_model` sizes that layer to the classes and
``--pretrained imagenet`` loads torchvision's ``IMAGENET1K_V1`` weights.
"""

from typing import Tuple

from nexedge.models import ArchSpec, Weights

#: torchvision's ImageNet weights (its IMAGENET1K_V1 set).
IMAGENET = Weights("imagenet", "torchvision's, downloaded into the torch hub cache")


def _with_stn(name: str, family: str, summary: str) -> Tuple[ArchSpec, ArchSpec]:
    """``name`` from torchvision and ``name_stn``: the same backbone behind a spatial transformer."""
    return (ArchSpec(name, family, summary, "nexedge.models.zoo:torchvision_model", (IMAGENET,)),
            ArchSpec(name + "_stn", "stn", "the backbone behind a spatial transformer that learns to align the "
                     "part (--arch-kw stn_params=3: scale and shift only)", "nexedge.models.zoo:stn_model",
                     (IMAGENET,), needs_input_size=True))


_RESNET = "ResNet from torchvision"
_PLAIN_STN = [_with_stn("resnet18", "resnet", _RESNET), _with_stn("resnet34", "resnet", _RESNET),
              _with_stn("resnet50", "resnet", _RESNET),
              _with_stn("vgg19_bn", "vgg", "VGG19 with BatchNorm from torchvision (slow to export)")]

ARCHS = tuple(plain for plain, _ in _PLAIN_STN) + tuple(stn for _, stn in _PLAIN_STN) + (
    ArchSpec("resnet18_att2", "attention", "ResNet18 with two attention-pooled heads (--arch-kw compat=add for "
             "the additive variant)", "nexedge.models.zoo:resnet18_att2", (IMAGENET,)),
)
