"""The factories of the torchvision architectures (ResNet18/34/50, VGG19_bn, ...) with the last
layer sized to the classes, their ``*_stn`` variants, ``resnet18_att2`` and ``small_max``. What
each architecture is (name, weights, defaults) is declared in ``nexedge/models/archs/``; a factory
is called as ``factory(name, num_classes=N, pretrained=P, **kw)``.

``pretrained``: ``none`` (default, no network), ``imagenet`` (torchvision weights,
downloaded into the torch hub cache; a clear error when that fails) or the path of
a local state dict (a plain state dict, ``{"state_dict": ...}`` or a nexedge
checkpoint). The classifier layer is re-initialised when its shape differs.

Every factory takes ``input_size`` (the crop [h, w]); only STN models need it, the
others accept and ignore it so the trainer can pass it uniformly.
"""

import os
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nexedge.models.attention import ResNetAtt2
from nexedge.models.stn import SpatialTransformer, STNNet


class ExportableAdaptiveAvgPool2d(nn.Module):
    """``AdaptiveAvgPool2d`` that also exports to ONNX when the output size does not
    divide the input size (VGG's 7x7 pool on small inputs): a fixed pooling matrix."""

    def __init__(self, output_size: Sequence[int] = (7, 7)) -> None:
        super().__init__()
        self.output_size = (int(output_size[0]), int(output_size[1]))

    @staticmethod
    def _matrix(n_in: int, n_out: int) -> torch.Tensor:
        m = torch.zeros(n_out, n_in)
        for i in range(n_out):
            start = (i * n_in) // n_out
            end = -((-(i + 1) * n_in) // n_out)
            m[i, start:end] = 1.0 / (end - start)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        oh, ow = self.output_size
        if h % oh == 0 and w % ow == 0:
            return F.adaptive_avg_pool2d(x, self.output_size)
        mh = self._matrix(h, oh).to(x.dtype).to(x.device)
        mw = self._matrix(w, ow).to(x.dtype).to(x.device)
        return torch.matmul(torch.matmul(mh, x), mw.t())


def _imagenet_state(arch: str) -> Dict[str, torch.Tensor]:
    import torchvision

    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as e:  # urllib/socket/hash errors all mean "no weights"
        hub = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise RuntimeError(
            f"could not download ImageNet weights for {arch} from {weights.url} ({type(e).__name__}: {e}). "
            f"This machine may have no network: copy the file into {hub}, or pass --pretrained PATH "
            "to a local state dict, or use --pretrained none"
        ) from None


def _file_state(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--pretrained {path!r}: no such file (expected none, imagenet or a state-dict path)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"--pretrained {path!r} does not hold a state dict of tensors")
    return obj


def load_pretrained(model: nn.Module, arch: str, pretrained: str) -> nn.Module:
    """Load ``imagenet`` or a state-dict file into ``model`` (keys must match except the
    classifier, which is kept freshly initialised when its shape differs)."""
    if pretrained in (None, "", "none"):
        return model
    state = _imagenet_state(arch) if pretrained == "imagenet" else _file_state(pretrained)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not any(k.startswith(s.rsplit(".", 1)[0]) for s in skipped)]
    if missing or unexpected:
        raise ValueError(
            f"--pretrained {pretrained!r} does not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


def _torchvision(arch: str, num_classes: int) -> nn.Module:
    """torchvision's ``arch`` with its last layer sized to the classes: ``fc`` (ResNet) or the last
    layer of ``classifier`` (VGG, MobileNet, ...); a fixed-size adaptive pool (VGG's 7x7) becomes
    :class:`ExportableAdaptiveAvgPool2d`, so the model exports at any input size."""
    import torchvision

    m = getattr(torchvision.models, arch)(weights=None)
    if isinstance(getattr(m, "fc", None), nn.Linear):
        m.fc = nn.Linear(m.fc.in_features, num_classes)
    elif isinstance(getattr(m, "classifier", None), nn.Sequential) and isinstance(m.classifier[-1], nn.Linear):
        m.classifier[-1] = nn.Linear(m.classifier[-1].in_features, num_classes)
    else:
        raise ValueError(f"torchvision {arch}: no fc or classifier[-1] Linear layer to size to the classes")
    pool = getattr(m, "avgpool", None)
    if isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size not in (1, (1, 1)):
        m.avgpool = ExportableAdaptiveAvgPool2d(pool.output_size)
    return m


def torchvision_model(name: str, num_classes: int, pretrained: str = "none",
                      input_size: Optional[Sequence[int]] = None) -> nn.Module:
    """torchvision's architecture ``name`` (``input_size`` accepted and ignored)."""
    return load_pretrained(_torchvision(name, num_classes), name, pretrained)


def stn_model(name: str, num_classes: int, pretrained: str = "none", input_size: Sequence[int] = (224, 224),
              stn_params: int = 6) -> nn.Module:
    """``<backbone>_stn``: torchvision's backbone behind a spatial transformer for ``input_size``."""
    arch = name[: -len("_stn")]
    backbone = _torchvision(arch, num_classes)
    if pretrained == "imagenet":
        load_pretrained(backbone, arch, pretrained)
        pretrained = "none"
    model = STNNet(SpatialTransformer(input_size, int(stn_params)), backbone)
    return load_pretrained(model, name, pretrained)


def resnet18_att2(name: str, num_classes: int, pretrained: str = "none",
                  input_size: Optional[Sequence[int]] = None, compat: str = "concat") -> nn.Module:
    backbone = _torchvision("resnet18", num_classes)
    if pretrained == "imagenet":
        load_pretrained(backbone, "resnet18", pretrained)
        pretrained = "none"
    return load_pretrained(ResNetAtt2(backbone, num_classes, compat), name, pretrained)


class SmallNet(nn.Module):
    """A CPU-sized CNN (about 1/5 of ResNet18's compute at the same input) ending in a
    global max-pool, so one small local defect decides the image (CPU benchmarks and demos)."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))

        self.features = nn.Sequential(
            block(3, w, 1), block(w, w, 2), block(w, 2 * w, 2), block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1)
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def small_max(name: str, num_classes: int, pretrained: str = "none", input_size: Optional[Sequence[int]] = None,
              width: int = 32) -> nn.Module:
    return load_pretrained(SmallNet(num_classes, int(width)), name, pretrained)
