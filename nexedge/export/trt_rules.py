"""What a TensorRT build may be asked for, decided without TensorRT: the supported versions (8.5/8.6,
10.x; 11 refused), precision and INT8 mode, DLA combinations, network flags and the batch profile.

TensorRT 11 is refused with a message: it removed BuilderFlag.FP16/INT8, the INT8 calibrators and
``platform_has_fast_*`` (weakly typed networks are gone; only strongly typed networks, whose
precision comes from the ONNX types, remain).
"""

import logging
import re
from typing import Any, NamedTuple, Optional, Tuple

from nexedge import preprocess as pp
from nexedge.card import PRECISIONS, ModelCard
from nexedge.export.cuda_device import GiB

log = logging.getLogger(__name__)

MIN_VERSION = (8, 5)

MAX_MAJOR = 10  # TensorRT 11 dropped the weakly typed builder API nexedge uses


class BuildOptions(NamedTuple):
    precision: str = "fp16"
    max_batch: int = 0  # images; 0 = the card's graph.max_batch
    opt_batch: int = 0  # images; 0 = min(8, max)
    workspace: int = GiB
    dla_core: Optional[int] = None
    version_compatible: bool = False
    calib_cache: Optional[str] = None  # implicit INT8 (fp32 ONNX + entropy-calibration cache)
    calibrator: Any = None  # a live calibrator (used by `nexedge calibrate --trt-cache`)
    timing_cache: Optional[str] = None


def parse_version(version: str) -> Tuple[int, int, int]:
    """``"10.3.0.30"`` -> (10, 3, 0); ValueError for versions before 8.5 or unparsable ones."""
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if not m:
        raise ValueError(f"cannot parse TensorRT version {version!r}")
    v = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    if v[:2] < MIN_VERSION:
        raise ValueError(f"TensorRT {version} is too old: need 8.5 or newer (name-based tensor API, "
                         "set_memory_pool_limit, build_serialized_network)")
    return v


def check_builder_api(trt: Any, version: Tuple[int, int, int]) -> None:
    """Refuse TensorRT 11+ (or any build without BuilderFlag.FP16/INT8) with what to install instead."""
    flags = getattr(trt, "BuilderFlag", None)
    if version[0] > MAX_MAJOR or not (hasattr(flags, "FP16") and hasattr(flags, "INT8")):
        raise RuntimeError(
            f"TensorRT {trt.__version__} is not supported for building: TensorRT 11 removed BuilderFlag.FP16/INT8, "
            "IInt8EntropyCalibrator2 and platform_has_fast_* (strongly typed networks only). nexedge builds with "
            "TensorRT 8.5-10.x: on x86 `pip install 'tensorrt>=10,<11'` (what nexedge's trt extra pins); "
            "on a Jetson use JetPack's TensorRT.")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return precision


def int8_mode(onnx_precision: str, precision: str, has_calibration: bool, source: str = "") -> Optional[str]:
    """``"explicit"`` (Q/DQ ONNX), ``"implicit"`` (fp32 ONNX + calibration) or None (no INT8)."""
    check_precision(precision)
    if onnx_precision == "int8":
        if precision != "int8":
            raise ValueError(f"the ONNX model is Q/DQ INT8; it builds an INT8 engine, not {precision} "
                             "(use --precision int8, or build from the fp32 ONNX)")
        return "explicit"
    if precision != "int8":
        return None
    if not has_calibration:
        raise ValueError(f"INT8{source} from an fp32 ONNX model needs a calibration cache (--build-kw calib_cache=FILE, from "
                         "`nexedge calibrate --trt-cache`); or build from the Q/DQ model "
                         "(`nexedge calibrate` writes *.int8-trt.onnx); or pass --precision fp16")
    return "implicit"


def check_dla(opts: BuildOptions, precision: str, mode: Optional[str], version: Tuple[int, int, int],
              card: ModelCard) -> None:
    """Refuse DLA combinations TensorRT cannot build; warn about ones that mostly run on the GPU."""
    if opts.dla_core is None:
        return
    if precision == "fp32":
        raise ValueError("DLA runs FP16 or INT8 only; use --precision fp16 or int8 with --dla-core")
    if mode == "explicit" and version[0] < 10:
        # TensorRT 8.x developer guide, Working with DLA: explicit quantization (Q/DQ) is not supported on DLA.
        raise ValueError(f"TensorRT {'.'.join(map(str, version))} on DLA does not take explicit Q/DQ INT8 graphs; "
                         "build the Q/DQ model for the GPU (drop --dla-core), or build INT8 for DLA from the fp32 "
                         "ONNX with --build-kw calib_cache=FILE, or use --precision fp16 with the fp32 ONNX")
    if card.graph["crops"] != "host":
        log.warning("DLA: in-graph preprocessing (Cast, Slice, crops) runs on the GPU; host-crop models "
                    "(export --crops host) put more of the network on the DLA")


def network_flags(trt: Any, version: Tuple[int, int, int]) -> int:
    """EXPLICIT_BATCH is required before TensorRT 10 and deprecated (implied) from 10 on."""
    if version[0] < 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def batch_limits(card: ModelCard, max_batch: int = 0, opt_batch: int = 0) -> Tuple[int, int]:
    """(opt, max) in images; max from the card's graph.max_batch when not given."""
    mx = int(max_batch or card.graph.get("max_batch") or 0)
    if mx < 1:
        raise ValueError(f"max batch must be a positive number of images, got {mx} "
                         "(pass --max-batch or export with --max-batch)")
    opt = int(opt_batch or min(8, mx))
    if not 1 <= opt <= mx:
        raise ValueError(f"--opt-batch {opt} must be between 1 and the max batch {mx}")
    return opt, mx


def profile_shapes(card: ModelCard, opt: int, mx: int, static: bool = False
                   ) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
    """(min, opt, max) input shapes: images for in-graph models, images x crops for host-crop models.

    ``static``: min = opt = max = the max batch. DLA needs it ("DLA does not support dynamic shapes":
    with min != max every layer falls back to the GPU; TensorRT developer guide, Working with DLA);
    the runtime zero-pads smaller batches.
    """
    inp = card.input
    batches = (mx, mx, mx) if static else (1, opt, mx)
    if card.graph["crops"] == "host":
        k = pp.n_crops(inp["crop_mode"])
        h, w = inp["crop"]
        return tuple((n * k, 3, h, w) for n in batches)  # type: ignore[return-value]
    H, W = inp["resize"]
    c = 1 if inp["color"] == "gray" else 3
    return tuple((n, H, W, c) for n in batches)  # type: ignore[return-value]
