"""INT8 Q/DQ ONNX models from an fp32 ONNX model, and the INT8-vs-FP32 report.

Two targets, both ``onnxruntime.quantization.quantize_static`` in QDQ format:

* ``tensorrt``: int8 activations and weights, both symmetric (zero points 0, which
  TensorRT's explicit quantization requires), per-channel weights.
* ``ort``: uint8 activations, int8 per-channel weights (U8S8) for ONNX Runtime on x86
  CPUs: VNNI/AVX-512 kernels make this ~3x faster than fp32, while S8S8 (the
  quantize_static default) is no faster on the dev box.

Both keep the sensitive tail in float: the final fully connected layer and
everything after it (crop averaging, softmax, defect score), and the spatial
transformer of ``*_stn`` models (a quantized sampling grid moves pixels). For in-graph-crop
models the preprocessing (cast, /255, mean/std, crops, flips) stays float too:
only nodes of the backbone (``/backbone/...``) are quantized, and the uint8
images feed calibration directly. Host-crop models are calibrated on the float
crops of the card's crop mode.
"""

import logging
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Set

import numpy as np

from nexedge.card import ModelCard
from nexedge.export import BACKBONE_PREFIX
from nexedge.metrics import DEFAULT_TPRS

log = logging.getLogger(__name__)

TARGETS = ("tensorrt", "ort")
#: Settings of the ``ort`` target that ``nexedge calibrate`` can vary (see :func:`ort_settings`).
ORT_DEFAULTS = {"activations": "u8", "weights": "s8", "per_channel": True, "reduce_range": False}
METHODS = ("minmax", "entropy", "percentile")
TAIL_STOP_OPS = ("Gemm", "MatMul")
#: Nodes of a spatial transformer (``STNNet.stn``): its affine grid (MatMul) and GridSample sampling
#: positions would snap to the INT8 grid (about 0.9 px at 224), so the whole STN stays float.
STN_MARK = "/stn/"


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"unknown INT8 target {target!r}; expected one of {', '.join(TARGETS)}")
    return target


def ort_settings(**overrides: Any) -> Dict[str, Any]:
    """The ``ort`` target's quantization settings: :data:`ORT_DEFAULTS` with ``overrides`` (None = keep).

    ``activations``/``weights``: ``u8`` or ``s8``; ``per_channel``: per-output-channel weight scales;
    ``reduce_range``: 7-bit weights (ORT's advice against pmaddubsw saturation on x86 without VNNI).
    """
    out = dict(ORT_DEFAULTS)
    for key, value in overrides.items():
        if key not in ORT_DEFAULTS:
            raise ValueError(f"unknown ORT quantization setting {key!r}; expected one of {', '.join(ORT_DEFAULTS)}")
        if value is not None:
            out[key] = value
    for key in ("activations", "weights"):
        if out[key] not in ("u8", "s8"):
            raise ValueError(f"{key} {out[key]!r}: expected u8 or s8")
    return out


def ort_label(settings: Dict[str, Any]) -> str:
    """``U8S8 per-channel`` style name of a settings dict."""
    s = ort_settings(**settings)
    return "{}{} {}{}".format(s["activations"].upper(), s["weights"].upper(),
                             "per-channel" if s["per_channel"] else "per-tensor",
                             ", reduce_range" if s["reduce_range"] else "")


def tail_nodes(graph: Any) -> List[str]:
    """Names of the nodes from the last Gemm/MatMul (the final FC) to the outputs, inclusive."""
    producer = {o: n for n in graph.node for o in n.output}
    seen: Set[str] = set()
    stack = [o.name for o in graph.output]
    tail: List[str] = []
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type != "Constant":
            tail.append(node.name)
        if node.op_type in TAIL_STOP_OPS:
            continue  # the final FC: keep it float, do not walk into the backbone
        stack.extend(node.input)
    return tail


def float_nodes(graph: Any, crops: str) -> List[str]:
    """Nodes quantize_static must leave in float: the tail, any spatial transformer, and for
    in-graph models everything outside the backbone (preprocessing, crops, averaging)."""
    keep = set(tail_nodes(graph))
    keep |= {n.name for n in graph.node if STN_MARK in n.name}
    if crops != "host":
        keep |= {n.name for n in graph.node if not n.name.startswith(BACKBONE_PREFIX)}
    return sorted(keep)


def stem_nodes(graph: Any, exclude: Sequence[str] = ()) -> List[str]:
    """The backbone's stem: Conv nodes whose input is at least half the resolution of the first
    conv's input (EfficientNet-Lite: the stem and the stride-2 block's convs at full and half
    resolution, 5 of 49; ResNet: conv1). Quantizing them cost most of INT8's ranking; keeping
    them float costs 15-22 % of ONNX Runtime's INT8 TenCrop speed on an AVX2 CPU
    (benchmarks/results/int8_stem.md). Without inferred shapes, or when that would be more
    than a quarter of the convs, the first conv alone."""
    shapes = {v.name: v.type.tensor_type.shape for v in list(graph.value_info) + list(graph.input)}

    def height(name: str) -> Optional[int]:
        sh = shapes.get(name)
        if sh is None or len(sh.dim) != 4 or not sh.dim[2].HasField("dim_value"):
            return None
        return int(sh.dim[2].dim_value)

    skip = set(exclude)
    convs = [n for n in graph.node if n.op_type == "Conv" and n.name not in skip]
    if not convs:
        return []
    ref = height(convs[0].input[0])
    if ref is None:
        return [convs[0].name]
    stem = [n.name for n in convs if (height(n.input[0]) or 0) * 2 >= ref]
    # a small net that works at full resolution throughout keeps only its first conv float
    return stem if len(stem) * 4 <= len(convs) else [convs[0].name]


def fold_identity_initializers(model: Any) -> int:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer; returns how many.

    The TorchScript exporter de-duplicates equal constants (e.g. the all-zero conv biases of
    an untrained net after BatchNorm folding) and feeds them through Identity nodes; the
    quantizer then leaves those biases float and ONNX Runtime cannot fuse QLinearConv.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    keep, n = [], 0
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(arr.copy(), node.output[0]))
            n += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return n


def prune_dead_nodes(graph: Any) -> int:
    """Drop nodes nothing reads (and initializers nothing reads); returns how many nodes went.

    quantize_static leaves the Constant nodes of shape arithmetic it folded (EfficientNet-Lite's "same"
    padding leaves 66), and ONNX Runtime logs a warning for each on every session it opens."""
    def used() -> set:
        return {i for n in graph.node for i in n.input} | {o.name for o in graph.output}

    dropped = 0
    while True:
        live = used()
        dead = [n for n in graph.node if not any(o in live for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
        dropped += len(dead)
    live = used()
    for init in [t for t in graph.initializer if t.name not in live]:
        graph.initializer.remove(init)
    return dropped


def _prepared_input(fp32_path: str, tmpdir: str) -> str:
    """Copy of the model with Identity-of-initializer folded and shapes inferred (no graph
    optimisation, so node names survive for the exclusion lists)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(fp32_path)
    fold_identity_initializers(model)
    folded = os.path.join(tmpdir, "folded.onnx")
    onnx.save(model, folded)
    out = os.path.join(tmpdir, "pre.onnx")
    quant_pre_process(folded, out, skip_optimization=True)
    return out


def quantize_model(fp32_path: str, out_path: str, card: ModelCard, reader: Any, target: str,
                   method: str = "minmax", ort: Optional[Dict[str, Any]] = None,
                   float_stem: bool = True) -> Dict[str, Any]:
    """Write the Q/DQ INT8 model for ``target``; returns the quantization description for the card.

    ``float_stem``: leave the stem's convolutions (:func:`stem_nodes`) in float.

    ``ort``: settings of the ``ort`` target (:func:`ort_settings`); the TensorRT target has none to
    vary (symmetric int8, per-channel, float biases are what TensorRT's Q/DQ parser takes)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    check_target(target)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    if target == "tensorrt" and ort:
        raise ValueError("ORT quantization settings were given for the tensorrt target, whose Q/DQ format "
                         "TensorRT fixes (symmetric int8, per-channel); use them with --targets ort")
    osets = ort_settings(**(ort or {}))
    per_channel, reduce_range = True, False
    with tempfile.TemporaryDirectory() as tmp:
        pre = _prepared_input(fp32_path, tmp)
        graph = onnx.load(pre).graph
        keep, tail = float_nodes(graph, card.graph["crops"]), tail_nodes(graph)
        stem = stem_nodes(graph, keep) if float_stem else []
        keep = sorted(set(keep) | set(stem))
        if target == "tensorrt":
            # QuantizeBias False: quantize_static's default leaves INT32 biases behind DequantizeLinear,
            # which TensorRT's parser rejects (DequantizeLinear takes INT8 in 8.x; INT8/FP8/INT4 in 10.x;
            # onnx-tensorrt issue 850, onnxruntime issues 14229, 17738). TensorRT fuses the float bias into
            # the INT8 conv itself; NVIDIA's ORT-based quantizer passes the same option.
            act, extra = QuantType.QInt8, {"ActivationSymmetric": True, "WeightSymmetric": True,
                                           "QuantizeBias": False}
        else:
            types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
            act, wt = types[osets["activations"]], types[osets["weights"]]
            per_channel, reduce_range = bool(osets["per_channel"]), bool(osets["reduce_range"])
            extra = {"WeightSymmetric": osets["weights"] == "s8"}
        # MinMax keeps only per-batch ReduceMin/ReduceMax outputs: small. (CalibMaxIntermediateOutputs
        # would bound entropy/percentile memory, but ORT 1.32 discards the chunks it clears.)
        reader.rewind()
        quantize_static(
            pre,
            out_path,
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=act,
            weight_type=QuantType.QInt8 if target == "tensorrt" else wt,
            nodes_to_exclude=keep,
            calibrate_method=methods[method],
            extra_options=extra,
        )
    model = onnx.load(out_path)
    if prune_dead_nodes(model.graph):
        onnx.save(model, out_path)
    onnx.checker.check_model(model)
    n_q = sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")
    if n_q == 0:
        raise RuntimeError(f"{out_path}: quantize_static inserted no QuantizeLinear nodes; nothing was quantized")
    if target == "tensorrt":
        check_symmetric(model)
        check_dq_inputs_int8(model)
    if target == "tensorrt":
        acts, weights = "int8 symmetric", "int8 symmetric per-channel"
    else:
        acts = {"u8": "uint8 asymmetric", "s8": "int8 asymmetric"}[osets["activations"]]
        weights = "{} {}{}".format({"u8": "uint8 asymmetric", "s8": "int8 symmetric"}[osets["weights"]],
                                   "per-channel" if per_channel else "per-tensor",
                                   ", 7-bit (reduce_range)" if reduce_range else "")
    return {
        "target": target,
        "format": "QDQ",
        "activations": acts,
        "weights": weights,
        **({"ort_settings": osets} if target == "ort" else {}),
        "method": method,
        "quantize_nodes": n_q,
        "float_nodes": len(keep),
        "float_stem": stem,
        "float_tail": tail,
    }


def check_symmetric(model: Any) -> None:
    """Raise unless every QuantizeLinear/DequantizeLinear zero point is 0 (TensorRT's requirement)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            zp = inits.get(n.input[2])
            if zp is not None and np.any(numpy_helper.to_array(zp) != 0):
                raise RuntimeError(f"node {n.name}: zero point {numpy_helper.to_array(zp)} is not 0; "
                                   "TensorRT Q/DQ must be symmetric")


def check_dq_inputs_int8(model: Any) -> None:
    """Raise unless every DequantizeLinear input is INT8: TensorRT 8.x's DequantizeLinear takes INT8 only
    ("only activation types allowed as input to this layer" for an INT32 bias), 10.x adds FP8/INT4 only."""
    from nexedge.export.onnx_check import INT8, TYPE_NAMES, tensor_types

    types = tensor_types(model)
    bad = [(n.name, n.input[0], types.get(n.input[0])) for n in model.graph.node
           if n.op_type == "DequantizeLinear" and types.get(n.input[0]) != INT8]
    if bad:
        name, inp, t = bad[0]
        raise RuntimeError(f"{len(bad)} DequantizeLinear node(s) take non-INT8 input, e.g. {name} on {inp!r} "
                           f"({TYPE_NAMES.get(t, t)}); TensorRT's DequantizeLinear takes INT8 only")


def decisions_by_class(scores: np.ndarray, labels: Sequence[str], card: ModelCard, threshold: float
                       ) -> Dict[str, Dict[str, Any]]:
    """Per class at ``threshold``: images, escapes (defect -> PASS) or overkill (good -> REJECT)."""
    lab = np.asarray(labels)
    out: Dict[str, Dict[str, Any]] = {}
    for cls in sorted(set(lab.tolist())):
        s = scores[lab == cls]
        if cls == card.good_class:
            out[cls] = {"n": int(s.size), "overkill": int((s >= threshold).sum())}
        else:
            out[cls] = {"n": int(s.size), "escapes": int((s < threshold).sum())}
    return out


def compare_int8(fp32_backend: Any, int8_backend: Any, images: np.ndarray, labels: Sequence[str],
                 fp32_card: ModelCard, int8_card_: ModelCard, tprs: Sequence[float] = DEFAULT_TPRS,
                 batch: int = 16) -> Dict[str, Any]:
    """INT8 vs FP32 on a labelled split that did not pick the thresholds: AUC, FPR at each TPR, and
    at each deployed operating point (each model at its own card's threshold) the escapes and
    overkill per class and the decision flips among good and among defect images."""
    from nexedge import metrics

    def scores(be: Any) -> np.ndarray:
        n = min(batch, be.max_batch)
        return np.concatenate([np.asarray(be.infer(images[i : i + n]).defect_score, np.float64)
                               for i in range(0, len(images), n)])

    s32, s8 = scores(fp32_backend), scores(int8_backend)
    good = np.array([lab == fp32_card.good_class for lab in labels])
    y = (~good).astype(int)
    deployed = []
    for op8 in int8_card_.operating_points:
        try:
            op32 = fp32_card.operating_point(float(op8["target_tpr"]))
        except ValueError:
            continue
        t32, t8 = float(op32["threshold"]), float(op8["threshold"])
        d32, d8 = s32 >= t32, s8 >= t8
        flip = d32 != d8
        c32, c8 = decisions_by_class(s32, labels, fp32_card, t32), decisions_by_class(s8, labels, fp32_card, t8)
        deployed.append({
            "target_tpr": float(op8["target_tpr"]),
            "threshold_fp32": t32,
            "threshold_int8": t8,
            "escapes_fp32": int((~d32 & ~good).sum()),
            "escapes_int8": int((~d8 & ~good).sum()),
            "overkill_fp32": int((d32 & good).sum()),
            "overkill_int8": int((d8 & good).sum()),
            "tpr_fp32": float(d32[~good].mean()) if (~good).any() else float("nan"),
            "tpr_int8": float(d8[~good].mean()) if (~good).any() else float("nan"),
            "fpr_fp32": float(d32[good].mean()) if good.any() else float("nan"),
            "fpr_int8": float(d8[good].mean()) if good.any() else float("nan"),
            "flip_fraction_good": float(flip[good].mean()) if good.any() else float("nan"),
            "flip_fraction_defect": float(flip[~good].mean()) if (~good).any() else float("nan"),
            "per_class": {c: {"fp32": c32[c], "int8": c8[c]} for c in c32},
        })
    both = bool(y.min(initial=0) != y.max(initial=0))
    auc32 = metrics.roc_auc(y, s32) if both else float("nan")
    auc8 = metrics.roc_auc(y, s8) if both else float("nan")
    diff = metrics.auc_difference(y, s32, s8) if both else {"lo": float("nan"), "hi": float("nan"),
                                                             "se": float("nan")}
    return {
        "n_images": int(len(images)),
        "n_defects": int(y.sum()),
        "n_good": int(good.sum()),
        "thresholds_from": {"fp32": fp32_card.ops_source.get("split"), "int8": int8_card_.ops_source.get("split"),
                            "fp32_status": fp32_card.ops_source.get("status")},
        "auc_fp32": auc32,
        "auc_int8": auc8,
        "auc_delta_points": 100.0 * (auc8 - auc32),
        # DeLong's paired 95 % interval: on a test split of a few hundred images a delta of tenths of a
        # point is usually inside it
        "auc_delta_ci95_points": [100.0 * diff["lo"], 100.0 * diff["hi"]],
        "auc_delta_se_points": 100.0 * diff["se"],
        "fpr_at_tpr_fp32": metrics.fpr_at_tprs(y, s32, tprs),
        "fpr_at_tpr_int8": metrics.fpr_at_tprs(y, s8, tprs),
        "deployed": deployed,
        "max_abs_score_diff": float(np.abs(s32 - s8).max()),
        "mean_abs_score_diff": float(np.abs(s32 - s8).mean()),
    }


def int8_card(fp32_card: ModelCard, quant: Dict[str, Any], report: Optional[Dict[str, Any]],
              calibration: Dict[str, Any]) -> ModelCard:
    """The INT8 model's card: derived from the fp32 ONNX card, precision int8."""
    card = fp32_card.derive("onnx", precision="int8")
    card.update_graph(quantization=dict(quant, calibration=calibration))
    if report is not None:
        card.update_metrics(int8_vs_fp32=report)
    return card
