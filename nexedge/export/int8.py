"""``nexedge calibrate``: calibration set -> Q/DQ INT8 models (+ TensorRT cache) -> report in the cards."""

import logging
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

from nexedge.card import load_card, sha256_file
from nexedge.export import calibrate as cal
from nexedge.export import quantize as qz

log = logging.getLogger(__name__)

SUFFIX = {"tensorrt": "int8-trt", "ort": "int8-ort"}


class CalibrationResult(NamedTuple):
    manifest: str
    outputs: Dict[str, str]  # target -> int8 onnx path
    reports: Dict[str, Dict[str, Any]]
    trt_cache: Optional[str]


def int8_path(fp32_path: str, target: str, out_dir: Optional[str] = None) -> str:
    """``m.ten.onnx`` -> ``m.ten.int8-trt.onnx`` (beside it, or in ``out_dir``)."""
    stem = os.path.splitext(os.path.basename(fp32_path))[0]
    return os.path.join(out_dir or os.path.dirname(os.path.abspath(fp32_path)), f"{stem}.{SUFFIX[target]}.onnx")


def trt_cache_path(manifest: str, onnx_sha256: str, trt_version: str) -> str:
    """``calibrate/<name>/cache.<onnx sha8>.trt<version>.bin`` (git-ignored)."""
    return os.path.join(os.path.dirname(manifest), f"cache.{onnx_sha256[:8]}.trt{trt_version}.bin")


def run_calibration(
    onnx_path: str,
    data_root: str,
    name: Optional[str] = None,
    n_images: int = 512,
    split: str = "train",
    eval_split: Optional[str] = "test",
    thresholds_split: str = "val",
    eval_images: int = 0,
    targets: Sequence[str] = ("tensorrt", "ort"),
    method: str = "minmax",
    out_root: str = "calibrate",
    out_dir: Optional[str] = None,
    rebuild: bool = False,
    trt_cache: bool = False,
    seed: int = 0,
    threads: Optional[int] = None,
    force: bool = False,
    ort: Optional[Dict[str, Any]] = None,
    float_stem: bool = True,
) -> CalibrationResult:
    """Calibrate the fp32 ONNX ``onnx_path`` (card verified) on ``data_root/<split>``, measure each
    INT8 model's own operating points on ``thresholds_split`` and report INT8 beside FP32 at the
    deployed thresholds on ``eval_split`` (which must differ from ``thresholds_split``).

    ``ort``: settings of the ``ort`` target (:func:`nexedge.export.quantize.ort_settings`);
    ``float_stem``: leave the stem convolutions in float (:func:`nexedge.export.quantize.stem_nodes`).
    Refuses a data set whose classes differ from the model's, a calibration set made from
    another data set (unless ``rebuild``), and existing INT8 outputs (unless ``force``)."""
    from nexedge.export.parity import read_images_skipping
    from nexedge.export.thresholds import measure_artifact
    from nexedge.preprocess import prepare
    from nexedge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    for t in targets:
        qz.check_target(t)
    if trt_cache:
        _require_tensorrt()  # fail before the slow part
    if eval_split and eval_split == thresholds_split:
        raise ValueError(f"--report-kw eval_split={eval_split!r} is the split the thresholds are picked on; the INT8 report "
                         "needs a split not used to pick them (e.g. test)")
    card = load_card(onnx_path)
    if card.data.get("cv"):
        raise ValueError(f"{onnx_path} is a fold ensemble: its thresholds come from out-of-fold scores of the fp32 "
                         "fold models, which an INT8 model would not reproduce and which cannot be re-measured on "
                         "train or val; deploy the fp32 ensemble")
    if card.data["artifact"]["kind"] != "onnx" or card.precision != "fp32":
        raise ValueError(f"{onnx_path}: calibrate takes an fp32 ONNX model (card says "
                         f"{card.data['artifact']['kind']}/{card.precision})")
    check_classes(card.classes, data_root, [split] + ([eval_split] if eval_split else [])
                  + ([thresholds_split] if os.path.isdir(os.path.join(data_root, thresholds_split)) else []))
    existing = [int8_path(onnx_path, t, out_dir) for t in targets if os.path.exists(int8_path(onnx_path, t, out_dir))]
    if existing and not force:
        raise ValueError(f"{', '.join(existing)} already exist(s); --force to replace, or --out-dir for another folder")
    name = name or os.path.splitext(os.path.basename(onnx_path))[0]
    manifest = os.path.join(out_root, name, "manifest.json")
    if os.path.exists(manifest) and not rebuild:
        made_from = cal.read_calibration_manifest(manifest).get("data_root")
        if made_from and os.path.abspath(made_from) != os.path.abspath(data_root):
            raise ValueError(f"calibration set {manifest} was made from {made_from}, not {os.path.abspath(data_root)}; "
                             "--rebuild to replace it or --name for a new one")
    if rebuild or not os.path.exists(manifest):
        cal.build_manifest(data_root, name, card.input, n=n_images, split=split, seed=seed, out_root=out_root)
    else:
        log.info("reusing calibration manifest %s (--rebuild to make a new one)", manifest)
    images, _ = cal.load_manifest_images(manifest, card.input, data_root)
    m = cal.read_calibration_manifest(manifest)
    calibration = {"manifest": manifest, "n_images": len(images), "split": m["split"],
                   "per_class": m["per_class"], "manifest_sha256": sha256_file(manifest)}

    eval_imgs, eval_labels = None, []
    if eval_split:
        per_class = cal.class_folders(data_root, eval_split)
        paths: List[str] = []
        for cls in sorted(per_class):
            chosen = per_class[cls] if not eval_images else per_class[cls][: max(1, eval_images // len(per_class))]
            paths += chosen
            eval_labels += [cls] * len(chosen)
        import numpy as np

        raw, kept = read_images_skipping([os.path.join(data_root, p) for p in paths])
        eval_labels = [eval_labels[i] for i in kept]
        eval_imgs = np.stack([prepare(im, card.input) for im in raw])

    outputs, reports = {}, {}
    for target in targets:
        out = int8_path(onnx_path, target, out_dir)
        reader = cal.OrtCalibrationReader(images, card)
        quant = qz.quantize_model(onnx_path, out, card, reader, target, method,
                                  ort=ort if target == "ort" else None, float_stem=float_stem)
        if target == "tensorrt":
            _check_for_tensorrt(out)
        icard = qz.int8_card(card, quant, None, calibration)
        icard.save_for(out, parent=onnx_path)
        # The INT8 model's own operating points, through the backend that runs it (ONNX Runtime).
        if os.path.isdir(os.path.join(data_root, thresholds_split)):
            icard = measure_artifact(out, data_root, thresholds_split,
                                     backend_options={"intra_threads": threads}).card
        else:
            icard.mark_ops_from_parent(f"no {thresholds_split}/ split under {data_root} to measure on")
            icard.save_for(out)
            log.warning("%s: operating points copied from the fp32 model, NOT re-measured (no %s/ split)",
                        out, thresholds_split)
        report = None
        if eval_imgs is not None:
            with OnnxRuntimeBackend(onnx_path, card=card, intra_threads=threads) as a, \
                    OnnxRuntimeBackend(out, card=icard, intra_threads=threads, verify=False) as b:
                report = qz.compare_int8(a, b, eval_imgs, eval_labels, card, icard)
            report["split"] = eval_split
            icard.update_metrics(int8_vs_fp32=report)
            icard.save_for(out)
        outputs[target], reports[target] = out, report or {}
        log.info("wrote %s (%s)", out, target)

    cache = None
    if trt_cache:
        cache = build_trt_cache(onnx_path, card, images, manifest)
    return CalibrationResult(manifest, outputs, reports, cache)


def _check_for_tensorrt(path: str) -> None:
    """The TensorRT Q/DQ model must pass `nexedge check-onnx` for every TensorRT release; else it is removed."""
    from nexedge.export import onnx_check as oc

    try:
        oc.require_clean(path, oc.TARGETS, what=path)
    except RuntimeError:
        os.unlink(path)
        raise


def check_classes(model_classes: Sequence[str], data_root: str, splits: Sequence[str]) -> None:
    """The data set's class folders (with images) must be the model's classes: calibrating or reporting
    on other classes would give an INT8 model and an accuracy report that mean nothing."""
    for split in splits:
        have = sorted(cal.class_folders(data_root, split))
        if have != sorted(model_classes):
            raise ValueError(f"{os.path.join(data_root, split)} has classes {have} but the model was trained on "
                             f"{list(model_classes)}; calibrate on the model's own data set")


def _require_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeError("--trt-cache needs TensorRT (import tensorrt failed); run it on the target "
                           "(Jetson) or use the Q/DQ model, which needs no cache") from None
    from nexedge.export import trt_rules

    trt_rules.check_builder_api(trt, trt_rules.parse_version(trt.__version__))  # TensorRT 11 has no calibrators
    return trt


def build_trt_cache(onnx_path: str, card: Any, images: Any, manifest: str, batch_images: int = 8) -> str:
    """Entropy-calibrate with TensorRT (implicit quantization, TensorRT <= 10) and keep the cache."""
    trt = _require_tensorrt()
    from nexedge.export import trt_build, trt_rules

    stream = cal.CalibrationBatchStream(images, card, batch_images)
    path = trt_cache_path(manifest, card.sha256, trt.__version__)
    calibrator = cal.make_entropy_calibrator(trt, stream, path)
    # TensorRT calibrates at the profile's opt shape: make it the calibration batch.
    opts = trt_rules.BuildOptions(precision="int8", max_batch=max(card.graph.get("max_batch") or 1, batch_images),
                                  opt_batch=batch_images, calibrator=calibrator)
    trt_build.build_serialized(trt, onnx_path, card, opts)
    if not os.path.exists(path):
        raise RuntimeError(f"TensorRT finished but wrote no calibration cache at {path}")
    return path
