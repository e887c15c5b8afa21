"""``open_backend(path)``: pick the inference backend from the artifact's suffix.

``.onnx`` -> ONNX Runtime, ``.engine``/``.plan`` -> TensorRT, ``.pt``/``.pth`` -> torch
(:data:`nexedge.runtime.registry.BACKENDS`). Every artifact must have its card beside it
(``x.card.json``) whose sha256 matches; keyword arguments are the backend's declared options,
checked before the backend is imported. Python 3.8, no torch.
"""

import os
from typing import Any

from nexedge.runtime import registry
from nexedge.runtime.base import Backend

#: Suffix -> backend name (kept for callers; the registry is the source).
SUFFIXES = {s: spec.name for spec in registry.BACKENDS.values() for s in spec.suffixes}


def backend_kind(path: str) -> str:
    """Backend name for ``path`` by suffix; ValueError naming the accepted suffixes."""
    return registry.backend_for(path).name


def open_backend(path: str, **kwargs: Any) -> Backend:
    """Open ``path`` with its backend. FileNotFoundError if missing; CardError if the card does not
    match; ValueError for an option the backend does not take (named, with the ones it does)."""
    registry.backend_for(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model artifact not found: {path}")
    return registry.open_with(path, **kwargs)
