"""``open_backend(path)``: open an artifact with the backend that runs it.

By default the backend is picked by suffix (``.onnx`` -> ONNX Runtime, ``.engine``/``.plan`` ->
TensorRT, ``.pt``/``.pth`` -> torch; :func:`nexedge.runtime.registry.backends`); ``backend=NAME``
picks one by name, which must open that suffix. Every artifact must have its card beside it
(``x.card.json``) whose sha256 matches; keyword arguments are the backend's declared options,
checked before the backend is imported. Python 3.8, no torch.
"""

import os
from typing import Any, Optional

from nexedge.runtime import registry
from nexedge.runtime.base import Backend


def backend_kind(path: str, backend: Optional[str] = registry.AUTO) -> str:
    """Backend name for ``path`` (by suffix, or ``backend`` when it opens the file); ValueError naming
    the accepted suffixes."""
    return registry.choose(path, backend).name


def open_backend(path: str, backend: Optional[str] = registry.AUTO, **kwargs: Any) -> Backend:
    """Open ``path`` with ``backend`` (``auto``: by suffix). FileNotFoundError if missing; CardError if
    the card does not match; ValueError for a backend that cannot open the file or an option it does
    not take (named, with the ones it does)."""
    registry.choose(path, backend)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model artifact not found: {path}")
    return registry.open_with(path, backend, **kwargs)
