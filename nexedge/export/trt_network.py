"""Checks and edits on a parsed TensorRT network, given as duck-typed objects (the real ``tensorrt``
or a fake): parser errors, the profile against the input's dimensions, FP32 pinning of what lies
outside the backbone so reduced precision never reaches the defect score, and DLA placement."""

import logging
from typing import Any, Dict, List

from nexedge.card import ModelCard
from nexedge.export import BACKBONE_PREFIX

log = logging.getLogger(__name__)

def parser_errors(parser: Any) -> List[str]:
    return [str(parser.get_error(i)) for i in range(parser.num_errors)]


def format_parser_errors(onnx_path: str, errors: List[str]) -> str:
    lines = [f"TensorRT's ONNX parser rejected {onnx_path} with {len(errors)} error(s):"]
    lines += [f"  {i + 1}. {e}" for i, e in enumerate(errors)]
    return "\n".join(lines)


def check_profile_dims(network: Any, shapes: Any) -> None:
    """The profile's shapes must have the input's rank and its static dimensions (-1 = dynamic)."""
    inp = network.get_input(0)
    dims = tuple(int(d) for d in inp.shape)
    for s in shapes:
        if len(s) != len(dims) or any(d >= 0 and d != v for d, v in zip(dims, s)):
            raise ValueError(f"optimisation profile shape {tuple(s)} does not fit input {inp.name!r} of the ONNX "
                             f"model, dims {dims} (-1 = dynamic); the card's input geometry or crops do not match "
                             "the graph")


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
