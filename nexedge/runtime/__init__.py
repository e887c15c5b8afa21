"""Inference backends behind one interface; see :func:`open_backend`. No torch at import."""

from nexedge.runtime.base import ArtifactIncompatible, Backend, BackendError, InferenceResult

__all__ = ["ArtifactIncompatible", "Backend", "BackendError", "InferenceResult", "open_backend"]


def open_backend(path, backend="auto", **kwargs):  # type: ignore[no-untyped-def]
    """Open ``path`` with the backend its suffix names (.onnx, .engine, .pt), or with ``backend`` by name;
    see nexedge.runtime.factory."""
    from nexedge.runtime.factory import open_backend as _open

    return _open(path, backend, **kwargs)
