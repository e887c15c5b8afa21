"""ONNX (fp32 or Q/DQ INT8) -> TensorRT engine, for TensorRT 8.5/8.6 (JetPack 5/6.0) and 10.x.

TensorRT 11 is refused with a message: it removed BuilderFlag.FP16/INT8, the INT8
calibrators and ``platform_has_fast_*`` (weakly typed networks are gone; only
strongly typed networks, whose precision comes from the ONNX types, remain).

The TensorRT-free logic (version parsing, precision rules, network flags,
profile shapes, names and cache keys, parser error reports) is plain Python and
unit-tested; :func:`build_serialized` drives whatever ``tensorrt`` module it is
given (the real one on a GPU box, a fake in tests).

Engine files: ``trt_engines/<name>-<onnx sha8>.<precision>.b<max>.trt<version>.<device>.engine``
plus ``.card.json``. A cached engine is reused only when its card's full build
key (ONNX sha256, precision, INT8 mode and cache, batch profile, workspace, DLA,
version compatibility, TensorRT version, device) equals the requested one.
"""

import json
import logging
import os
import re
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from nexedge import preprocess as pp
from nexedge.card import PRECISIONS, CardError, ModelCard, atomic_write_bytes, load_card, sha256_file
from nexedge.export import BACKBONE_PREFIX

log = logging.getLogger(__name__)

MIN_VERSION = (8, 5)
MAX_MAJOR = 10  # TensorRT 11 dropped the weakly typed builder API nexedge uses
GiB = 1 << 30
JETSON_MODEL_FILE = "/proc/device-tree/model"


class DeviceInfo(NamedTuple):
    """What an engine is tied to. ``name`` alone is not enough: cudaGetDeviceProperties says "Orin"
    for AGX Orin, Orin NX and Orin Nano alike; they differ in SM count and memory."""

    name: str  # e.g. "Orin", "NVIDIA GeForce RTX 4090"
    compute_capability: Tuple[int, int]
    sm_count: int = 0  # multiProcessorCount
    total_mem_gib: int = 0  # totalGlobalMem, rounded
    board: str = ""  # Jetson module (/proc/device-tree/model), e.g. "NVIDIA Jetson Orin Nano Developer Kit"


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


# -- pure logic ------------------------------------------------------------
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


def has_fast_int8(builder: Any, device: DeviceInfo) -> bool:
    """``platform_has_fast_int8`` where the builder still has it (deprecated in 10.5), else the
    compute capability: DP4A from SM 6.1, except SM 6.2 (Jetson TX2)."""
    if hasattr(builder, "platform_has_fast_int8"):
        return bool(builder.platform_has_fast_int8)
    cc = tuple(device.compute_capability)
    return cc >= (6, 1) and cc != (6, 2)


def has_fast_fp16(builder: Any, device: DeviceInfo) -> bool:
    if hasattr(builder, "platform_has_fast_fp16"):
        return bool(builder.platform_has_fast_fp16)
    return tuple(device.compute_capability) >= (5, 3)


def parser_errors(parser: Any) -> List[str]:
    return [str(parser.get_error(i)) for i in range(parser.num_errors)]


def format_parser_errors(onnx_path: str, errors: List[str]) -> str:
    lines = [f"TensorRT's ONNX parser rejected {onnx_path} with {len(errors)} error(s):"]
    lines += [f"  {i + 1}. {e}" for i, e in enumerate(errors)]
    return "\n".join(lines)


def jetson_board(path: str = JETSON_MODEL_FILE) -> str:
    """The Jetson module name from the device tree ("" elsewhere)."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip("\x00 \n")
    except OSError:
        return ""


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "none"


# cuda-python per platform, as setup.py's `trt` extra pins it (the wheels pip resolves: 13.x needs a
# 580+ driver and has no cuda.cudart; there is no aarch64 wheel for 11.4, 11.5-11.8 cp38 ones exist).
CUDA_PYTHON_PINS = ("JetPack 5 (CUDA 11.4): cuda-python>=11.5,<12; JetPack 6 (CUDA 12.2/12.6): "
                    "cuda-python>=12.6,<12.7; x86: the CUDA major of your driver, e.g. cuda-python>=12,<13")


def cuda_mismatch_message(rt: Any, err: Any, what: str) -> str:
    """Explain a CUDA runtime error at start-up: driver vs cuda-python versions and the pins."""
    try:
        import importlib.metadata as md

        pkg = next((f"{d} {md.version(d)}" for d in ("cuda-python", "cuda-bindings") if _has_dist(md, d)), "")
    except ImportError:  # Python 3.7 metadata backport not needed on 3.8+
        pkg = ""
    drv = rt.cudaDriverGetVersion()
    rtv = rt.cudaRuntimeGetVersion()
    driver = _cuda_version(int(drv[1])) if drv[0] == rt.cudaError_t.cudaSuccess else "unknown"
    runtime = _cuda_version(int(rtv[1])) if rtv[0] == rt.cudaError_t.cudaSuccess else "unknown"
    msg = f"{what} failed: {err}. CUDA driver supports CUDA {driver}; cuda-python ({pkg or 'version unknown'}) " \
          f"was built for CUDA {runtime}."
    if driver == "none":
        msg += " No NVIDIA driver was found (is this a GPU machine, and is the driver loaded?)."
    elif runtime != "unknown" and driver != "unknown" and runtime.split(".")[0] != driver.split(".")[0]:
        msg += f" Install the cuda-python matching the driver's CUDA {driver.split('.')[0]}.x."
    elif "InsufficientDriver" in str(err):
        msg += " The driver is older than this cuda-python needs: install an older cuda-python."
    return msg + " Pins: " + CUDA_PYTHON_PINS


def _has_dist(md: Any, name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def device_info(device: int = 0) -> DeviceInfo:
    """Name, compute capability, SM count, memory and Jetson board of CUDA device ``device``
    (cuda-python, else pycuda). A driver/cuda-python mismatch raises a RuntimeError that says so."""
    board = jetson_board(JETSON_MODEL_FILE)
    try:
        from nexedge.runtime.backends.tensorrt import _import_cudart

        rt = _import_cudart()
    except ImportError:
        import pycuda.driver as cuda

        cuda.init()
        d = cuda.Device(device)
        attr = cuda.device_attribute
        return DeviceInfo(d.name(), tuple(d.compute_capability()),  # type: ignore[arg-type]
                          int(d.get_attribute(attr.MULTIPROCESSOR_COUNT)), round(d.total_memory() / GiB), board)
    err, props = rt.cudaGetDeviceProperties(device)
    if err != rt.cudaError_t.cudaSuccess:
        raise RuntimeError(cuda_mismatch_message(rt, err, f"cudaGetDeviceProperties({device})"))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name.rstrip("\x00"), (int(props.major), int(props.minor)), int(props.multiProcessorCount),
                      round(int(props.totalGlobalMem) / GiB), board)


def make_cache_calibrator(trt: Any, cache: bytes) -> Any:
    """A calibrator that only replays an existing entropy-calibration cache (no images needed)."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: List[str]) -> None:
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data: Any) -> None:
            pass

    return CacheCalibrator()


RECIPE_KEYS = {
    "target": str, "jetpack": str, "tensorrt": str, "notes": str,
    "precision": str, "max_batch": int, "opt_batch": int, "workspace_mib": int,
    "dla_core": int, "version_compatible": bool,
}


def load_recipe(path: str) -> Dict[str, Any]:
    """A per-target build recipe (YAML mapping, keys :data:`RECIPE_KEYS`); errors name the key."""
    import yaml

    if not os.path.exists(path):
        raise FileNotFoundError(f"build recipe not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of build settings, got {type(data).__name__}")
    for key, value in data.items():
        if key not in RECIPE_KEYS:
            raise ValueError(f"{path}: unknown key {key!r}; expected some of {', '.join(RECIPE_KEYS)}")
        want = RECIPE_KEYS[key]
        if value is not None and not (isinstance(value, want) and not (want is int and isinstance(value, bool))):
            raise ValueError(f"{path}: {key} must be {want.__name__}, got {value!r}")
    if "precision" in data:
        check_precision(data["precision"])
    return data


def check_recipe_version(recipe: Dict[str, Any], trt_version: str, path: str = "recipe") -> None:
    """The recipe's ``tensorrt`` (e.g. ``"10.3"``) must prefix the installed version."""
    want = recipe.get("tensorrt")
    if want and not (trt_version == want or trt_version.startswith(str(want) + ".")):
        raise ValueError(f"{path} is for TensorRT {want} ({recipe.get('target', 'its target')}), "
                         f"but this machine has TensorRT {trt_version}")


# -- precision of what reaches the score -------------------------------------
#: Layer types left alone when pinning: Q/DQ carry their own types, constants and shape layers no math.
_NOT_PINNED = ("QUANTIZE", "DEQUANTIZE", "CONSTANT", "SHAPE")


def _name(x: Any) -> str:
    return str(getattr(x, "name", None) or str(x).rsplit(".", 1)[-1])


def _float_outputs(layer: Any) -> bool:
    outs = [layer.get_output(i) for i in range(layer.num_outputs)]
    return bool(outs) and all(_name(t.dtype) in ("FLOAT", "HALF") for t in outs)


def pin_outside_backbone(trt: Any, network: Any, card: ModelCard) -> List[str]:
    """In-graph models: pin every float layer outside the backbone (uint8 -> float preprocessing, crops,
    the crop average, softmax, defect sum) to FP32, so neither FP16 nor implicit INT8 touches them;
    the builder obeys with ``OBEY_PRECISION_CONSTRAINTS``. Host-crop graphs are the backbone alone
    (the host scores their logits in float64): nothing to pin. Returns the pinned layer names."""
    if card.graph.get("crops", "host") == "host":
        return []
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    if not any(str(layer.name).startswith(BACKBONE_PREFIX) for layer in layers):
        raise RuntimeError(f"in-graph model without {BACKBONE_PREFIX}* layers: cannot tell its preprocessing and "
                           "score tail from the backbone to keep them FP32; re-export it with this nexedge")
    fp32 = trt.DataType.FLOAT
    pinned = []
    for layer in layers:
        if str(layer.name).startswith(BACKBONE_PREFIX) or _name(layer.type) in _NOT_PINNED \
                or not _float_outputs(layer):
            continue
        layer.precision = fp32
        for i in range(layer.num_outputs):
            layer.set_output_type(i, fp32)
        pinned.append(str(layer.name))
    return pinned


def score_output(network: Any) -> str:
    """The network output the runtime scores from: ``logits`` when present, else ``probs`` (in-graph
    graphs exported before ``logits``), else the only output (host-crop logits)."""
    names = [network.get_output(i).name for i in range(network.num_outputs)]
    for want in ("logits", "probs"):
        if want in names:
            return want
    return names[0]


def score_path_problems(network: Any, precision: str, in_graph: bool, obeyed: bool) -> List[str]:
    """What would put reduced precision into the defect score (FP16 flushes probabilities below 6e-8
    to 0): a softmax feeding the ``logits`` the runtime scores from, and, in in-graph models, any float
    layer outside the backbone on the way to the score output that is not pinned to FP32 with
    ``obeyed`` (OBEY_PRECISION_CONSTRAINTS set). A host-crop graph is all backbone: its output must
    be logits, not a softmax. Empty for fp32 builds."""
    if precision == "fp32":
        return []
    if not in_graph:
        last = next((network.get_layer(i) for i in range(network.num_layers)
                     if any(network.get_layer(i).get_output(j).name == score_output(network)
                            for j in range(network.get_layer(i).num_outputs))), None)
        return [f"{last.name}: the host-crop graph outputs a softmax, not logits"] \
            if last is not None and _name(last.type) == "SOFTMAX" else []
    producer: Dict[str, Any] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
    out = score_output(network)
    todo, seen, problems = [out], set(), []
    while todo:
        layer = producer.get(todo.pop())
        if layer is None or layer.name in seen or str(layer.name).startswith(BACKBONE_PREFIX):
            continue
        seen.add(layer.name)
        kind = _name(layer.type)
        if kind == "SOFTMAX" and out == "logits":
            problems.append(f"{layer.name}: a softmax feeds the score output {out!r}")
        if kind not in _NOT_PINNED and _float_outputs(layer) and not (
                obeyed and getattr(layer, "precision_is_set", False) and _name(layer.precision) == "FLOAT"):
            problems.append(f"{layer.name} ({kind}) on the way to {out!r} is not pinned to FP32")
        todo += [layer.get_input(k).name for k in range(layer.num_inputs) if layer.get_input(k) is not None]
    return problems


def check_profile_dims(network: Any, shapes: Any) -> None:
    """The profile's shapes must have the input's rank and its static dimensions (-1 = dynamic)."""
    inp = network.get_input(0)
    dims = tuple(int(d) for d in inp.shape)
    for s in shapes:
        if len(s) != len(dims) or any(d >= 0 and d != v for d, v in zip(dims, s)):
            raise ValueError(f"optimisation profile shape {tuple(s)} does not fit input {inp.name!r} of the ONNX "
                             f"model, dims {dims} (-1 = dynamic); the card's input geometry or crops do not match "
                             "the graph")


def attach_timing_cache(config: Any, path: str) -> Any:
    """The timing cache from ``path`` (a new one when missing); one TensorRT refuses (another device or
    version made it) is replaced by a new one, with a warning. RuntimeError if even that is refused."""
    blob = b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            blob = f.read()
    cache = config.create_timing_cache(blob)
    if cache is not None and config.set_timing_cache(cache, False):
        return cache
    log.warning("timing cache %s was not accepted by this TensorRT/device (made elsewhere?); starting a new one",
                path)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        raise RuntimeError(f"TensorRT refused a new, empty timing cache (for {path})")
    return cache


# -- TensorRT driver -------------------------------------------------------
def build_serialized(trt: Any, onnx_path: str, card: ModelCard, opts: BuildOptions,
                     device: Optional[DeviceInfo] = None) -> Tuple[bytes, Dict[str, Any]]:
    """Parse, configure and build; returns (serialized engine, build info)."""
    version = parse_version(trt.__version__)
    check_builder_api(trt, version)
    precision = check_precision(opts.precision)
    device = device or device_info()
    mode = int8_mode(card.precision, precision, bool(opts.calib_cache or opts.calibrator))
    check_dla(opts, precision, mode, version, card)
    opt, mx = batch_limits(card, opts.max_batch, opts.opt_batch)
    shapes = profile_shapes(card, opt, mx, static=opts.dla_core is not None)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if precision == "int8" and not has_fast_int8(builder, device):
        raise RuntimeError(f"INT8 requested but {device.name} (SM {device.compute_capability[0]}."
                           f"{device.compute_capability[1]}) has no fast INT8; refusing to build a slow or FP32 "
                           "engine. Use --precision fp16.")
    if precision == "fp16" and not has_fast_fp16(builder, device):
        raise RuntimeError(f"FP16 requested but {device.name} has no fast FP16; use --precision fp32")
    network = builder.create_network(network_flags(trt, version))
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        ok = parser.parse(f.read())
    errors = parser_errors(parser)
    if not ok or errors:
        msg = format_parser_errors(onnx_path, errors or ["parse() returned False without errors"])
        if card.graph["crops"] != "host" and any("UINT8" in e for e in errors):
            # Every TensorRT from 8.5 takes a UINT8 network input into a Cast (8.5: DataType::kUINT8 docs,
            # TensorRT issue 1503); 8.6+ reject UINT8 anywhere else. Older nexedge exports permuted first.
            msg += ("\nhint: the graph uses UINT8 past its input; re-export with this nexedge (it casts the "
                    "uint8 images to float first) and check it with `nexedge check-onnx`, or export --crops host.")
        raise RuntimeError(msg)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace))
    if precision == "fp16" or (precision == "int8" and has_fast_fp16(builder, device)):
        # With INT8 too: layers left unquantized (preprocessing, the float tail) would otherwise run FP32.
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if mode == "implicit":
            if version[:2] >= (10, 1):
                log.warning("implicit INT8 (calibration cache) is deprecated since TensorRT 10.1; "
                            "prefer the Q/DQ model")
            if opts.calibrator is not None:
                config.int8_calibrator = opts.calibrator
            else:
                with open(opts.calib_cache, "rb") as f:
                    config.int8_calibrator = make_cache_calibrator(trt, f.read())
    if opts.dla_core is not None:
        n_dla = int(getattr(builder, "num_DLA_cores", 0))
        if not 0 <= opts.dla_core < n_dla:
            raise ValueError(f"--dla-core {opts.dla_core}: this device has {n_dla} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(opts.dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if opts.version_compatible:
        if version[:2] < (8, 6):
            raise ValueError(f"version-compatible engines need TensorRT 8.6 or newer (have {trt.__version__})")
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)

    # Scores are computed on the host in float64 from the graph's logits; what lies outside the
    # backbone (preprocessing, crop average, the probs/defect_score tail) stays FP32 in FP16 and INT8
    # builds, and is never quantized by a calibrator.
    pinned = pin_outside_backbone(trt, network, card) if precision != "fp32" else []
    if pinned:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    problems = score_path_problems(network, precision, card.graph.get("crops", "host") != "host", bool(pinned))
    if problems:
        raise RuntimeError(f"{onnx_path}: reduced precision would reach the defect score of this {precision} "
                           "engine: " + "; ".join(problems[:5]) + "; re-export the model with this nexedge")

    input_name = network.get_input(0).name
    check_profile_dims(network, shapes)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *shapes)
    if config.add_optimization_profile(profile) < 0:
        raise RuntimeError(f"TensorRT rejected the optimisation profile {[list(x) for x in shapes]} for input "
                           f"{input_name!r} (add_optimization_profile returned -1)")
    if mode == "implicit" and hasattr(config, "set_calibration_profile"):
        config.set_calibration_profile(profile)

    dla = dla_placement(network, config) if opts.dla_core is not None else None

    cache = attach_timing_cache(config, opts.timing_cache) if opts.timing_cache else None

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT {trt.__version__} failed to build {onnx_path} ({precision}); "
                           "see the TensorRT log above")
    if cache is not None:
        atomic_write_bytes(opts.timing_cache, bytes(config.get_timing_cache().serialize()))
    info = {"int8_mode": mode, "profile": [list(s) for s in shapes], "opt_batch": opt, "max_batch": mx,
            "build_seconds": round(time.perf_counter() - t0, 3), "input_name": input_name,
            "flags": sorted(_flag_names(trt, config)), "score_output": score_output(network),
            "pinned_fp32_layers": len(pinned)}
    if dla is not None:
        info["dla"] = dla
    return bytes(serialized), info


def _flag_names(trt: Any, config: Any) -> List[str]:
    names = ("FP16", "INT8", "GPU_FALLBACK", "VERSION_COMPATIBLE", "OBEY_PRECISION_CONSTRAINTS")
    return [n for n in names if hasattr(trt.BuilderFlag, n) and config.get_flag(getattr(trt.BuilderFlag, n))]


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


def dla_placement(network: Any, config: Any) -> Dict[str, Any]:
    """How many layers the builder can place on the DLA (IBuilderConfig.can_run_on_DLA, with the final
    profile and flags set); the rest fall back to the GPU. Warns when none do."""
    n = int(network.num_layers)
    gpu = [network.get_layer(i).name for i in range(n) if not config.can_run_on_DLA(network.get_layer(i))]
    on_dla = n - len(gpu)
    if on_dla == 0:
        log.warning("DLA core %s: none of the %d layers can run on the DLA; the engine runs on the GPU",
                    config.DLA_core, n)
    else:
        log.info("DLA core %s: %d of %d layers on the DLA", config.DLA_core, on_dla, n)
    return {"core": int(config.DLA_core), "layers": n, "layers_on_dla": on_dla, "gpu_fallback_layers": gpu[:20],
            "source": "IBuilderConfig.can_run_on_DLA"}


def build_engine(onnx_path: str, opts: BuildOptions, out_dir: str = "trt_engines", name: Optional[str] = None,
                 trt: Any = None, device: Optional[DeviceInfo] = None, force: bool = False,
                 runner: Any = None, data: Optional[str] = None, check: bool = True,
                 measure: bool = True) -> Tuple[str, bool]:
    """Build (or reuse) the engine for ``onnx_path``; returns (engine path, reused). A new engine's
    operating points are re-measured through ``runner(engine)`` (default: the TensorRT backend) when it
    runs here, else its card says they are the parent ONNX's and why (see nexedge.export.thresholds).

    An in-graph model whose card has a cascade gets its stage-1 (center-crop) engine built too
    (:func:`build_stage1_engine`), named in the engine card, and the band is re-measured on the pair.

    ``check``: run the static TensorRT lint (:mod:`nexedge.export.onnx_check`) for the installed
    version first, so a graph the parser would reject fails with every rule it breaks named."""
    if trt is None:
        try:
            import tensorrt as trt
        except ImportError:
            raise RuntimeError("build-engine needs TensorRT (import tensorrt failed); run it on the target "
                               "device, see trt_engines/README.md") from None
    check_precision(opts.precision)
    version = parse_version(trt.__version__)
    check_builder_api(trt, version)
    card = load_card(onnx_path)
    if card.data["artifact"]["kind"] != "onnx":
        raise ValueError(f"{onnx_path}: build-engine takes an ONNX model (card kind {card.data['artifact']['kind']})")
    mode = int8_mode(card.precision, opts.precision, bool(opts.calib_cache or opts.calibrator))
    check_dla(opts, opts.precision, mode, version, card)
    device = device or device_info()
    opt, mx = batch_limits(card, opts.max_batch, opts.opt_batch)
    shapes = profile_shapes(card, opt, mx, static=opts.dla_core is not None)
    key = build_key(card.sha256 or "", opts.precision, mode, shapes, opts, trt.__version__, device)
    name = name or os.path.splitext(os.path.basename(onnx_path))[0]
    path = os.path.join(out_dir, engine_filename(name, card.sha256 or "", opts.precision, mx, trt.__version__,
                                                 device, opts.dla_core))
    if not force and os.path.exists(path):
        try:
            cached = load_card(path)
            if (cached.data.get("provenance", {}).get("engine") or {}).get("key") == key:
                log.info("reusing %s (build key matches)", path)
                return path, True
            log.info("rebuilding %s: build key differs", path)
        except CardError as e:
            log.warning("rebuilding %s: %s", path, e)
    if check:
        from nexedge.export import onnx_check as oc

        try:
            import onnx  # noqa: F401  (a line-side Jetson install may lack it)
        except ImportError:
            log.warning("onnx is not installed: skipping the static TensorRT check (pip install onnx)")
        else:
            oc.require_clean(onnx_path, [oc.target_for_version(trt.__version__)], dla=opts.dla_core is not None,
                             what=onnx_path)
    blob, info = build_serialized(trt, onnx_path, card, opts, device)
    atomic_write_bytes(path, blob)
    ecard = card.derive("engine", precision=opts.precision)
    ecard.update_graph(max_batch=mx)
    ecard.update_provenance(engine=dict(info, key=key, tensorrt=trt.__version__, device=device.name,
                                        board=device.board, sm_count=device.sm_count))
    ecard.save_for(path, parent=onnx_path)
    log.info("built %s in %.1f s", path, info["build_seconds"])
    if card.cascade and card.graph.get("crops", "host") != "host":
        build_stage1_engine(onnx_path, card, path, opts, out_dir, trt, device, force, check)
    if measure:
        from nexedge.export.thresholds import remeasure_or_mark

        remeasure_or_mark(path, card, runner, data)
    return path, False


def build_stage1_engine(onnx_path: str, card: ModelCard, engine_path: str, opts: BuildOptions, out_dir: str,
                        trt: Any, device: DeviceInfo, force: bool, check: bool) -> Optional[str]:
    """Build the cascade's stage-1 engine from the center-crop ONNX the card names, with the same settings
    (FP16 when the stage-2 engine is INT8 but the center model has no INT8 of its own), and name it in the
    stage-2 engine's card. Returns its path, or None (warned; the daemon then runs full crops) when the
    center ONNX is not there."""
    from nexedge.runtime.cascade import CascadeError, stage1_path

    try:
        s1_onnx = stage1_path(onnx_path, card)
    except CascadeError as e:
        log.warning("cascade: %s; the engine runs full %s crops", e, card.runtime_crop_mode)
        return None
    if s1_onnx is None or not os.path.exists(s1_onnx):
        log.warning("cascade: stage-1 model %s not found beside %s; no stage-1 engine built, the daemon runs full "
                    "%s crops (export it with `nexedge export CKPT --crops %s --cascade`)", s1_onnx, onnx_path,
                    card.runtime_crop_mode, card.runtime_crop_mode)
        return None
    s1_card = load_card(s1_onnx)
    s1_opts = opts._replace(calibrator=None)
    if opts.precision == "int8" and s1_card.precision != "int8":
        # A calibration cache belongs to one model; the center model has no Q/DQ twin here.
        s1_opts = s1_opts._replace(precision="fp16", calib_cache=None)
        log.info("cascade: stage-1 engine from %s built FP16 (INT8 needs its own Q/DQ model)", s1_onnx)
    s1_path, _ = build_engine(s1_onnx, s1_opts, out_dir, trt=trt, device=device, force=force, check=check,
                              measure=False)
    ecard = load_card(engine_path)
    sec = ecard.cascade or {}
    sec["stage1"] = dict(sec.get("stage1") or {}, file=os.path.relpath(
        os.path.abspath(s1_path), os.path.dirname(os.path.abspath(engine_path))), precision=s1_opts.precision)
    ecard.set_cascade(sec)
    ecard.save_for(engine_path)
    log.info("cascade: stage-1 engine %s", s1_path)
    return s1_path


def describe(path: str) -> str:
    """One-line JSON summary of an engine card (for the CLI)."""
    card = load_card(path)
    eng = card.data["provenance"].get("engine", {})
    out = {"engine": path, "precision": card.precision, "int8_mode": eng.get("int8_mode"),
           "profile": eng.get("profile"), "tensorrt": eng.get("tensorrt"), "device": eng.get("device")}
    if eng.get("dla"):
        out["dla_layers"] = f"{eng['dla']['layers_on_dla']}/{eng['dla']['layers']}"
    src = card.ops_source
    out["operating_points"] = src.get("status") or "unknown"
    if src.get("not_measured_reason"):
        out["not_measured_reason"] = src["not_measured_reason"]
    if card.data.get("cascade"):
        sec = card.data["cascade"]
        out["cascade"] = {"status": sec.get("status"), "stage1": (sec.get("stage1") or {}).get("file")}
    return json.dumps(out)
