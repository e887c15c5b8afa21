"""ONNX (fp32 or Q/DQ INT8) -> TensorRT engine, for TensorRT 8.5/8.6 (JetPack 5/6.0) and 10.x.

:func:`build_serialized` drives whatever ``tensorrt`` module it is given (the real one on a GPU
box, a fake in tests); :func:`build_engine` names the engine, reuses a cached one whose build key
matches, writes its card and re-measures its operating points. The TensorRT-free rules live in
:mod:`~nexedge.export.trt_rules`, names and keys in :mod:`~nexedge.export.trt_names`, the network
checks in :mod:`~nexedge.export.trt_network`, the device in :mod:`~nexedge.export.cuda_device`.
"""

import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from nexedge.card import CardError, ModelCard, atomic_write_bytes, load_card
from nexedge.export import cuda_device, trt_network
from nexedge.export.cuda_device import DeviceInfo
from nexedge.export.trt_names import build_key, engine_filename
from nexedge.export.trt_rules import (
    BuildOptions,
    batch_limits,
    check_builder_api,
    check_dla,
    check_precision,
    int8_mode,
    network_flags,
    parse_version,
    profile_shapes,
)

log = logging.getLogger(__name__)

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


def build_serialized(trt: Any, onnx_path: str, card: ModelCard, opts: BuildOptions,
                     device: Optional[DeviceInfo] = None) -> Tuple[bytes, Dict[str, Any]]:
    """Parse, configure and build; returns (serialized engine, build info)."""
    version = parse_version(trt.__version__)
    check_builder_api(trt, version)
    precision = check_precision(opts.precision)
    device = device or cuda_device.device_info()
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
    errors = trt_network.parser_errors(parser)
    if not ok or errors:
        msg = trt_network.format_parser_errors(onnx_path, errors or ["parse() returned False without errors"])
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
    pinned = trt_network.pin_outside_backbone(trt, network, card) if precision != "fp32" else []
    if pinned:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    in_graph = card.graph.get("crops", "host") != "host"
    problems = trt_network.score_path_problems(network, precision, in_graph, bool(pinned))
    if problems:
        raise RuntimeError(f"{onnx_path}: reduced precision would reach the defect score of this {precision} "
                           "engine: " + "; ".join(problems[:5]) + "; re-export the model with this nexedge")

    input_name = network.get_input(0).name
    trt_network.check_profile_dims(network, shapes)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *shapes)
    if config.add_optimization_profile(profile) < 0:
        raise RuntimeError(f"TensorRT rejected the optimisation profile {[list(x) for x in shapes]} for input "
                           f"{input_name!r} (add_optimization_profile returned -1)")
    if mode == "implicit" and hasattr(config, "set_calibration_profile"):
        config.set_calibration_profile(profile)

    dla = trt_network.dla_placement(network, config) if opts.dla_core is not None else None

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
            "flags": sorted(_flag_names(trt, config)), "score_output": trt_network.score_output(network),
            "pinned_fp32_layers": len(pinned)}
    if dla is not None:
        info["dla"] = dla
    return bytes(serialized), info


def _flag_names(trt: Any, config: Any) -> List[str]:
    names = ("FP16", "INT8", "GPU_FALLBACK", "VERSION_COMPATIBLE", "OBEY_PRECISION_CONSTRAINTS")
    return [n for n in names if hasattr(trt.BuilderFlag, n) and config.get_flag(getattr(trt.BuilderFlag, n))]


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
    device = device or cuda_device.device_info()
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
