"""``open_backend(path)``: pick the inference backend from the artifact's suffix.

``.onnx`` -> ONNX Runtime, ``.engine``/``.plan`` -> TensorRT, ``.pt``/``.pth`` -> torch.
Every artifact must have its card beside it (``x.card.json``) whose sha256
matches; keyword arguments go to the backend's constructor. Python 3.8, no torch.
"""

import os
from typing import Any

from nexedge.runtime.base import Backend

SUFFIXES = {
    ".onnx": "onnxruntime",
    ".engine": "tensorrt",
    ".plan": "tensorrt",
    ".pt": "torch",
    ".pth": "torch",
}


def backend_kind(path: str) -> str:
    """Backend name for ``path`` by suffix; ValueError naming the accepted suffixes."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUFFIXES:
        raise ValueError(
            f"cannot tell which backend runs {path!r} (suffix {ext!r}); expected one of {', '.join(SUFFIXES)}"
        )
    return SUFFIXES[ext]


def open_backend(path: str, **kwargs: Any) -> Backend:
    """Open ``path`` with its backend. FileNotFoundError if missing; CardError if the card does not match."""
    kind = backend_kind(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model artifact not found: {path}")
    if kind == "onnxruntime":
        from nexedge.runtime.onnxrt import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, **kwargs)
    if kind == "tensorrt":
        from nexedge.runtime.tensorrt import TensorRTBackend

        return TensorRTBackend(path, **kwargs)
    from nexedge.runtime.torch_backend import TorchBackend

    return TorchBackend(path, **kwargs)
