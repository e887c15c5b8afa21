"""Static TensorRT compatibility lint of an ONNX graph, without TensorRT.

``check_onnx(model, "trt8.6")`` returns the findings (errors and warnings) of
the documented onnx-tensorrt rules for that TensorRT release, so that CI on a
machine without a GPU catches graphs TensorRT's ONNX parser would reject.

Sources (the per-rule comments name which one):

* [OPS-x]  onnx-tensorrt ``docs/operators.md`` on the release branch for x
  (release/8.5-GA, release/8.6-GA, release/10.x): supported ops and their types.
* [IMP-x]  onnx-tensorrt ``ModelImporter.cpp`` / ``onnxOpImporters.cpp`` of that
  release: the parser's error messages quoted in the rule.
* [DT-8.5] TensorRT 8.5 C++ API, ``DataType::kUINT8``: "Use the IIdentityLayer to
  convert kUINT8 network-level inputs to {kFLOAT, kHALF} prior to use with other
  TensorRT layers" (onnx-tensorrt turns a Cast of the uint8 input into that layer;
  TensorRT issue 1503).
* [SM-x]   TensorRT support matrix of that release (tested ONNX opsets).
* [DLA-x]  TensorRT developer guide, "Working with DLA", of that release.

These were read from the sources named, not fetched at run time; where a rule is
uncertain it is a warning, not an error. An operator missing from a release's list is an
error: its parser has no importer for it. No TensorRT, onnx only.
"""

from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

TARGETS = ("trt8.5", "trt8.6", "trt10")

# ONNX TensorProto element types (onnx/onnx.proto).
FLOAT, UINT8, INT8, INT32, INT64, BOOL, FLOAT16, DOUBLE, BFLOAT16, FLOAT8E4M3FN, INT4 = (
    1, 2, 3, 6, 7, 9, 10, 11, 16, 17, 22)
TYPE_NAMES = {1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
              9: "BOOL", 10: "FLOAT16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 16: "BFLOAT16",
              17: "FLOAT8E4M3FN", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2", 20: "FLOAT8E5M2FNUZ", 21: "UINT4",
              22: "INT4"}

# Tensor types each release's parser imports [OPS-x, "Supported data types"]. UINT8 is listed
# but only for network inputs/outputs (separate rule). INT64 is cast to INT32 by 8.x [IMP-8.x warning
# "Your ONNX model has been generated with INT64 weights ... Attempting to cast down to INT32"].
# BF16, FP8 and INT4 arrive with TensorRT 9/10 [OPS-10].
TENSOR_TYPES: Dict[str, Set[int]] = {
    "trt8.5": {FLOAT, FLOAT16, INT8, INT32, INT64, BOOL, UINT8},
    "trt8.6": {FLOAT, FLOAT16, INT8, INT32, INT64, BOOL, UINT8},
    "trt10": {FLOAT, FLOAT16, BFLOAT16, INT8, INT32, INT64, BOOL, UINT8, FLOAT8E4M3FN, INT4},
}

# Input types of DequantizeLinear [IMP-8.x: "... only activation types allowed as input to this layer"
# when x is INT32, e.g. a bias quantized by onnxruntime's quantize_static; onnx-tensorrt issue 850,
# onnxruntime issues 14229/17738]. 10.x adds FP8 and INT4 [OPS-10: DequantizeLinear T1].
DQ_INPUT_TYPES: Dict[str, Set[int]] = {
    "trt8.5": {INT8},
    "trt8.6": {INT8},
    "trt10": {INT8, FLOAT8E4M3FN, INT4},
}

# Tested ONNX opsets [SM-x]: outside them a warning (the parser may still cope).
OPSETS: Dict[str, Tuple[int, int]] = {"trt8.5": (9, 17), "trt8.6": (9, 17), "trt10": (9, 20)}

# Operators with an importer in every release checked here [OPS-8.5, OPS-8.6, OPS-10]. An op not
# listed and not in UNSUPPORTED is reported as "not checked" (a warning), never as fine.
_COMMON_OPS = """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements GatherND Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample HardSigmoid HardSwish Hardmax
Identity If InstanceNormalization IsInf IsNaN LRN LSTM LeakyRelu Less LessOrEqual Log LogSoftmax Loop
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or PRelu Pad Pow QuantizeLinear RNN RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign Round
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze
Upsample Where Xor
""".split()
SUPPORTED_OPS: Dict[str, Set[str]] = {
    "trt8.5": set(_COMMON_OPS),
    # LayerNormalization (opset 17) gets a native importer in 8.6 [OPS-8.6].
    "trt8.6": set(_COMMON_OPS) | {"LayerNormalization"},
    # GroupNormalization (opset 18), AffineGrid (opset 20), Blackman/Hann/Hamming windows [OPS-10].
    "trt10": set(_COMMON_OPS) | {"LayerNormalization", "GroupNormalization", "AffineGrid", "BlackmanWindow",
                                  "HannWindow", "HammingWindow", "DFT"},
}
# Listed as unsupported ("N") in operators.md of every release checked here [OPS-8.5, OPS-8.6, OPS-10].
UNSUPPORTED = {"Bernoulli", "BitShift", "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger", "Det",
               "DynamicQuantizeLinear", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "Multinomial",
               "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul",
               "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
               "SequenceLength", "SplitToSequence", "StringNormalizer", "TfIdfVectorizer", "Unique"}


class Finding(NamedTuple):
    level: str  # "error" (the parser or builder rejects it) or "warning"
    rule: str
    where: str  # node or tensor name
    message: str


def onnx_attr(node: Any, name: str, default: Any = None) -> Any:
    """Value of attribute ``name`` of an ONNX node, or ``default`` when the node does not set it."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# Initializers above this many elements are handed to shape inference as typed graph inputs, without
# their data: inference reads the values of small shape-like inputs only (Reshape's shape, Slice's
# starts, Resize's scales, ...), never of weights, so the types it infers are the same and a VGG's
# 550 MB of weights is not serialized, re-parsed and copied back for every check.
_INFER_KEEPS_DATA_UP_TO = 1024


def _copy_fields(src: Any, dst: Any, skip: str = "") -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        target = getattr(dst, field.name)
        if hasattr(target, "extend"):  # repeated field
            target.extend(value)
        elif hasattr(target, "CopyFrom"):  # message field
            target.CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _without_weights(model: Any) -> Any:
    """Copy of ``model`` whose large initializers are typed graph inputs (dtype and dims, no data)."""
    import onnx

    lite = onnx.ModelProto()
    _copy_fields(model, lite, skip="graph")
    _copy_fields(model.graph, lite.graph, skip="initializer")
    g = lite.graph
    inputs = {i.name for i in g.input}
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        if n <= _INFER_KEEPS_DATA_UP_TO:
            g.initializer.append(init)
        elif init.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return lite


def tensor_types(model: Any) -> Dict[str, int]:
    """Element type of every tensor: graph I/O, initializers, shape-inferred values, Constant and Cast outputs."""
    import onnx

    lite = _without_weights(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(lite, strict_mode=False)
    except Exception:  # inference failing is not the parser's problem: fall back to what the file says
        inferred = model
    types: Dict[str, int] = {}
    g = inferred.graph
    for vi in list(model.graph.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    g = model.graph
    for init in g.initializer:
        types[init.name] = init.data_type
    for n in g.node:
        if n.op_type == "Constant":
            v = onnx_attr(n, "value")
            if v is not None and hasattr(v, "data_type"):
                types[n.output[0]] = v.data_type
        elif n.op_type == "Cast":
            types[n.output[0]] = int(onnx_attr(n, "to"))
    return types


def _constants(g: Any) -> Dict[str, Any]:
    """Name -> TensorProto for initializers and Constant-node outputs."""
    out = {i.name: i for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and onnx_attr(n, "value") is not None:
            out[n.output[0]] = onnx_attr(n, "value")
    return out


def _tname(t: Optional[int]) -> str:
    return TYPE_NAMES.get(int(t), str(t)) if t is not None else "unknown"


def check_onnx(model: Any, target: str, dla: bool = False) -> List[Finding]:
    """Findings for ``model`` (ModelProto or path) against TensorRT ``target`` (one of :data:`TARGETS`)."""
    import onnx

    _check_target(target)
    if isinstance(model, str):
        model = onnx.load(model)
    return _check(model, tensor_types(model), target, dla)


def check_targets(model: Any, targets: Iterable[str] = TARGETS, dla: bool = False) -> Dict[str, List[Finding]]:
    """{target: findings} for several targets; loads ``model`` (if a path) and infers its types once."""
    import onnx

    targets = list(targets)
    for t in targets:
        _check_target(t)
    if isinstance(model, str):
        model = onnx.load(model)
    types = tensor_types(model)
    return {t: _check(model, types, t, dla) for t in targets}


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown TensorRT target {target!r}; expected one of {', '.join(TARGETS)}")


def _check(model: Any, types: Dict[str, int], target: str, dla: bool) -> List[Finding]:
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    found: List[Finding] = []
    types = dict(types)  # the trt10 rule below retypes some outputs for this target only
    if target == "trt10":
        # ONNX types a QuantizeLinear without zero point UINT8; TensorRT 10's importer makes it INT8
        # [IMP-10 QuantDequantLinearHelper: no zero point -> INT8 zeros].
        for n in g.node:
            if n.op_type == "QuantizeLinear" and not (len(n.input) > 2 and n.input[2]):
                types[n.output[0]] = INT8
    consts = _constants(g)
    consumers: Dict[str, List[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_inputs = {i.name for i in g.input} - {i.name for i in g.initializer}
    graph_outputs = {o.name for o in g.output}

    # Opset [SM-x: tested ONNX opsets].
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    lo, hi = OPSETS[target]
    if opset is None or not lo <= opset <= hi:
        found.append(Finding("warning", "opset", "model", f"ONNX opset {opset} is outside the range "
                             f"{lo}-{hi} tested with {target}"))

    # Operators [OPS-x].
    for n in g.node:
        where = f"{n.name or n.output[0]} ({n.op_type})"
        if n.domain not in ("", "ai.onnx"):
            found.append(Finding("error", "op", where, f"custom domain {n.domain!r} needs a TensorRT plugin"))
        elif n.op_type in UNSUPPORTED:
            found.append(Finding("error", "op", where, f"{n.op_type} is not supported by {target}'s ONNX parser "
                                 "(onnx-tensorrt operators.md)"))
        elif n.op_type not in SUPPORTED_OPS[target]:
            # The parser fails on an op it has no importer for ("No importer registered for op: X") unless a
            # plugin of that name is loaded, which nexedge never does.
            found.append(Finding("error", "op", where, f"{n.op_type} has no importer in {target}'s ONNX parser "
                                 "(onnx-tensorrt operators.md); the parse would fail"))

    # Tensor types [OPS-x "Supported data types"]. DOUBLE weights are converted by 10.x's importer
    # but not by 8.x [IMP-8.x "Unsupported ONNX data type: DOUBLE (11)"].
    for name, t in sorted(types.items()):
        if t not in TENSOR_TYPES[target] and t != 0:
            level = "warning" if (target == "trt10" and t == DOUBLE and name in consts) else "error"
            found.append(Finding(level, "dtype", name, f"tensor type {_tname(t)} is not supported by {target}"))

    # UINT8 only at network inputs/outputs [IMP-8.6, IMP-10: "TensorRT does not support UINT8 types
    # for intermediate tensors"; OPS-8.6/10: "UINT8 is only supported as network input or output
    # tensor types"]. 8.5 takes a UINT8 input only into a Cast to FLOAT/FLOAT16 [DT-8.5].
    for name, t in sorted(types.items()):
        if t != UINT8:
            continue
        if name in graph_inputs:
            for c in consumers.get(name, []):
                ok = c.op_type == "Cast" and int(onnx_attr(c, "to")) in (FLOAT, FLOAT16)
                if not ok:
                    found.append(Finding("error", "uint8", f"{c.name} ({c.op_type})",
                                         f"UINT8 network input {name!r} feeds {c.op_type}; TensorRT takes a UINT8 "
                                         "input only into a Cast to FLOAT/FLOAT16 (cast first, then the other ops)"))
        elif name in graph_outputs and target != "trt8.5":
            continue
        else:
            found.append(Finding("error", "uint8", name, f"UINT8 intermediate tensor {name!r}: TensorRT does not "
                                 "support UINT8 types for intermediate tensors"))

    # Q/DQ [IMP-x QuantizeLinear/DequantizeLinear importers; OPS-x notes].
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = f"{n.name or n.output[0]} ({n.op_type})"
        if n.op_type == "DequantizeLinear":
            t = types.get(n.input[0])
            if t not in DQ_INPUT_TYPES[target]:
                found.append(Finding("error", "qdq-input", where,
                                     f"input {n.input[0]!r} is {_tname(t)}; {target}'s DequantizeLinear takes "
                                     f"{'/'.join(_tname(x) for x in sorted(DQ_INPUT_TYPES[target]))} only "
                                     "(only activation types allowed as input to this layer); "
                                     "quantize with QuantizeBias=False"))
        if not (len(n.input) > 2 and n.input[2]):
            if target in ("trt8.5", "trt8.6"):
                # [IMP-8.5, IMP-8.6 QuantDequantLinearHelper: ASSERT inputs.size() == 3, "This version of
                # TensorRT requires 3 inputs for the DequantizeLinear operator"]; 10.x defaults it (INT8).
                found.append(Finding("error", "qdq-zero-point", where, f"{target} needs the zero-point input "
                                     "(3 inputs: x, scale, zero point 0 of type INT8); this node has "
                                     f"{len([i for i in n.input if i])}"))
        else:
            zp = consts.get(n.input[2])
            if zp is None:
                found.append(Finding("error", "qdq-zero-point", where, "zero point is not a constant"))
            else:
                arr = numpy_helper.to_array(zp)
                if np.any(arr != 0):
                    found.append(Finding("error", "qdq-zero-point", where, "TensorRT only supports symmetric "
                                         f"quantization: the zero point must be all zeros, got {arr.ravel()[:4]}"))
                if n.op_type == "QuantizeLinear" and zp.data_type not in DQ_INPUT_TYPES[target]:
                    found.append(Finding("error", "qdq-input", where, f"quantizes to {_tname(zp.data_type)}; "
                                         f"{target} quantizes to INT8 only"))
        scale = consts.get(n.input[1])
        if scale is None:
            # 8.x requires build-time constant scales [IMP-8.x "scale must be an initializer"].
            if target != "trt10":
                found.append(Finding("error", "qdq-scale", where, "scale is not a constant initializer"))
            continue
        if len(scale.dims) == 1 and scale.dims[0] > 1:  # per-channel
            axis = int(onnx_attr(n, "axis", 1))
            if n.op_type == "DequantizeLinear" and n.input[0] not in consts and target != "trt10":
                # 8.x: per-channel only for weights (constant input) [OPS-8.x DequantizeLinear notes].
                found.append(Finding("error", "qdq-axis", where, "per-channel scale on an activation"))
            for c in consumers.get(n.output[0], []):
                if c.op_type in ("Conv", "ConvTranspose") and len(c.input) > 1 and c.input[1] == n.output[0]:
                    want = 0 if c.op_type == "Conv" else 1
                    if axis not in (want, want - 4):
                        found.append(Finding("error", "qdq-axis", where, f"per-channel axis {axis} on "
                                             f"{c.op_type} weights; TensorRT needs axis {want} "
                                             "(output channels)"))
        elif len(scale.dims) > 1:
            if target != "trt10":  # block quantization arrives in 10.x [OPS-10]
                found.append(Finding("error", "qdq-axis", where, "block-wise scale needs TensorRT 10"))

    # DLA [DLA-x]: static shapes only ("DLA does not support dynamic shapes": min, opt and max of the
    # profile must be equal) and, before TensorRT 10, no explicit (Q/DQ) quantization.
    if dla:
        for i in g.input:
            if i.name in graph_inputs:
                dims = i.type.tensor_type.shape.dim
                if any(d.dim_param or d.dim_value <= 0 for d in dims):
                    found.append(Finding("warning", "dla-shape", i.name, "dynamic input: DLA needs a static "
                                         "shape; build-engine builds a static profile at the max batch"))
        if target != "trt10" and any(n.op_type == "QuantizeLinear" for n in g.node):
            found.append(Finding("error", "dla-qdq", "model", f"{target} on DLA does not take explicit Q/DQ "
                                 "INT8 graphs; use the GPU, or implicit INT8 with a calibration cache"))
    return found


def errors(findings: Iterable[Finding]) -> List[Finding]:
    return [f for f in findings if f.level == "error"]


def format_findings(path: str, target: str, findings: List[Finding]) -> str:
    n_err = len(errors(findings))
    head = f"{path}: {target}: " + ("ok" if not findings else f"{n_err} error(s), {len(findings) - n_err} warning(s)")
    return "\n".join([head] + [f"  {f.level}: [{f.rule}] {f.where}: {f.message}" for f in findings])


def summary(model: Any, targets: Iterable[str] = TARGETS, dla: bool = False) -> Dict[str, Any]:
    """{target: "ok" | [error messages]} (warnings left out) for a card."""
    out: Dict[str, Any] = {}
    for t, found in check_targets(model, targets, dla).items():
        errs = errors(found)
        out[t] = "ok" if not errs else [f"[{e.rule}] {e.where}: {e.message}" for e in errs]
    return out


def target_for_version(version: str) -> str:
    """``"8.5.2.2"`` -> ``"trt8.5"``, ``"8.6.1"`` -> ``"trt8.6"``, ``"10.3.0"`` -> ``"trt10"``."""
    parts = str(version).split(".")
    major, minor = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    if major >= 10:
        return "trt10"
    return "trt8.6" if (major, minor) >= (8, 6) else "trt8.5"


def require_clean(path: str, targets: Iterable[str], dla: bool = False, what: str = "") -> None:
    """RuntimeError listing every error finding for ``targets``."""
    msgs = []
    for t, f in check_targets(path, targets, dla).items():
        if errors(f):
            msgs.append(format_findings(path, t, errors(f)))
    if msgs:
        raise RuntimeError((what + ": " if what else "") + "TensorRT compatibility check failed "
                           "(`nexedge check-onnx`):\n" + "\n".join(msgs))
