"""An engine's file name and its build key.

Engine files: ``trt_engines/<name>-<onnx sha8>.<precision>.b<max>.trt<version>.<device>.engine``
plus ``.card.json``. A cached engine is reused only when its card's full build key (ONNX sha256,
precision, INT8 mode and cache, batch profile, workspace, DLA, version compatibility, TensorRT
version, device) equals the requested one.
"""

import re
from typing import Any, Dict, Optional

from nexedge.card import sha256_file
from nexedge.export.cuda_device import DeviceInfo
from nexedge.export.trt_rules import BuildOptions


def device_slug(name: str) -> str:
    """``"NVIDIA GeForce RTX 4090"`` -> ``"geforce-rtx-4090"``; ``"Orin"`` -> ``"orin"``."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    s = re.sub(r"^nvidia-", "", s)
    return s or "gpu"


def device_tag(device: DeviceInfo) -> str:
    """File-name tag: the Jetson module (else the GPU name) and the SM count, e.g.
    ``jetson-orin-nano-developer-kit-sm8``, ``geforce-rtx-4090-sm128``."""
    tag = device_slug(device.board or device.name)
    return tag + (f"-sm{device.sm_count}" if device.sm_count else "")


def engine_filename(name: str, onnx_sha256: str, precision: str, max_batch: int, trt_version: str,
                    device: Any, dla_core: Optional[int] = None) -> str:
    dev = (device_tag(device) if isinstance(device, DeviceInfo) else device_slug(device))
    dev += f"-dla{dla_core}" if dla_core is not None else ""
    return f"{name}-{onnx_sha256[:8]}.{precision}.b{max_batch}.trt{trt_version}.{dev}.engine"


def build_key(onnx_sha256: str, precision: str, mode: Optional[str], shapes: Any, opts: BuildOptions,
              trt_version: str, device: DeviceInfo) -> Dict[str, Any]:
    """Everything the engine depends on; reuse needs equality of the whole dict."""
    return {
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "int8_mode": mode,
        "calib_cache_sha256": sha256_file(opts.calib_cache) if opts.calib_cache else None,
        "profile": [list(s) for s in shapes],
        "workspace": int(opts.workspace),
        "dla_core": opts.dla_core,
        "version_compatible": bool(opts.version_compatible),
        "tensorrt": str(trt_version),
        "device": device.name,
        "board": device.board,
        "sm_count": int(device.sm_count),
        "total_mem_gib": int(device.total_mem_gib),
        "compute_capability": list(device.compute_capability),
    }
