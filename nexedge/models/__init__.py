"""Model registry: ``create_model(name, num_classes, ...)`` as in timm.

Architectures register themselves by name on import of their module; the
modules listed in ``_ARCH_MODULES`` are imported on first use.
"""

import importlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

_REGISTRY: Dict[str, Callable] = {}
_NORM: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {}
_ARCH_MODULES = ["nexedge.models.tiny", "nexedge.models.zoo", "nexedge.models.efficientnet_lite"]
_loaded = False


def register(
    name: str, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None
) -> Callable[[Callable], Callable]:
    """Decorator: register a factory ``fn(num_classes, pretrained='none', **kw) -> nn.Module``.

    ``mean``/``std``: the input normalisation the architecture's pretrained weights
    expect (default ImageNet's); the trainer writes it into the card.
    """

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        if mean is not None and std is not None:
            _NORM[name] = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
        return fn

    return deco


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _ARCH_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    _loaded = True


def list_models() -> List[str]:
    _load_all()
    return sorted(_REGISTRY)


def input_normalization(name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) on [0, 1] RGB that architecture ``name`` is trained with (ImageNet's unless registered)."""
    from nexedge.card import IMAGENET_MEAN, IMAGENET_STD

    _load_all()
    return _NORM.get(name, (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)))


def create_model(name: str, num_classes: int, pretrained: str = "none", **kwargs):  # type: ignore[no-untyped-def]
    """Build architecture ``name`` with ``num_classes`` outputs (logits)."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError("unknown architecture {!r}; available: {}".format(name, ", ".join(sorted(_REGISTRY))))
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return _REGISTRY[name](num_classes=num_classes, pretrained=pretrained, **kwargs)
