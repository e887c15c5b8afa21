"""ONNX graph clean-up after export: zero Pad nodes folded into the Conv that follows them.

TensorFlow "same" padding (EfficientNet-Lite's stride-2 convolutions) pads one pixel more
at the end than at the start, which ``nn.Conv2d(padding=...)`` cannot say, so the model
pads explicitly and the exporter writes ``Pad -> Conv``. ONNX ``Conv`` takes asymmetric
``pads`` ([x1_begin, x2_begin, ..., x1_end, x2_end]), so a constant-zero Pad over the
spatial axes only is the same as adding its amounts to the Conv's own pads. Left in the
graph, the Pad stays float in a Q/DQ INT8 model (DequantizeLinear -> Pad -> QuantizeLinear
between two int8 convolutions) and costs more than the convolution it feeds on a CPU.
"""

from typing import Any, Dict, List, Optional, Set

import numpy as np

from nexedge.export.onnx_check import onnx_attr


def constant_value(graph: Any, name: str, opset: int) -> Optional[np.ndarray]:
    """The value of tensor ``name`` when it depends on constants only (initializers, Constant
    nodes and ops over them), else None; ``opset``: the graph's default-domain opset, with which
    those ops are evaluated."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    inits = {i.name: i for i in graph.initializer}
    if name in inits:
        return numpy_helper.to_array(inits[name])
    producer = {o: n for n in graph.node for o in n.output}
    graph_inputs = {i.name for i in graph.input} - set(inits)
    needed: Set[int] = set()
    seen: Set[str] = set()
    stack = [name]
    while stack:
        t = stack.pop()
        if not t or t in seen or t in inits:
            continue
        seen.add(t)
        if t in graph_inputs or t not in producer:
            return None  # depends on the model input (or on nothing we know)
        node = producer[t]
        needed.add(id(node))
        stack.extend(node.input)
    order = [n for n in graph.node if id(n) in needed]  # graph order is topological
    used = {i for n in order for i in n.input}
    sub = helper.make_graph(order, "const", [], [helper.make_tensor_value_info(name, 0, None)],
                            [inits[i] for i in sorted(used & set(inits))])
    model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", opset)])
    return np.asarray(ReferenceEvaluator(model).run(None, {})[0])


def fold_pads_into_conv(model: Any) -> int:
    """Fold every constant-zero, spatial-only ``Pad`` whose only consumer is a ``Conv`` (data
    input, ``auto_pad`` NOTSET) into that Conv's ``pads``; returns how many were folded.
    Anything else (reflect/edge mode, a non-zero fill, pads on batch or channels, pads that
    depend on the input, a Pad read by two nodes) is left as it is."""
    from onnx import helper

    from nexedge.export.quantize import prune_dead_nodes

    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:  # no default-domain opset: no standard Pad to fold
        return 0
    consumers: Dict[str, List[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    folded: Set[int] = set()
    for pad in [n for n in g.node if n.op_type == "Pad"]:
        out = pad.output[0]
        users = consumers.get(out, [])
        if out in outputs or len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != out:
            continue
        conv = users[0]
        mode = onnx_attr(pad, "mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant" or len(pad.input) > 3:
            continue  # opset 18 axes input: not produced by our exporter; leave it
        if onnx_attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        if len(pad.input) > 2 and pad.input[2]:
            fill = constant_value(g, pad.input[2], opset)
            if fill is None or np.any(fill != 0):
                continue
        amounts = constant_value(g, pad.input[1], opset) if len(pad.input) > 1 else None
        if amounts is None:
            continue
        amounts = amounts.astype(np.int64).ravel()
        rank = len(amounts) // 2
        begin, end = amounts[:rank], amounts[rank:]
        if rank < 3 or np.any(amounts < 0) or np.any(begin[:2]) or np.any(end[:2]):
            continue
        k = rank - 2
        old = [int(v) for v in (onnx_attr(conv, "pads") or [0] * (2 * k))]
        new = [old[i] + int(begin[2 + i]) for i in range(k)] + [old[k + i] + int(end[2 + i]) for i in range(k)]
        for a in [a for a in conv.attribute if a.name == "pads"]:
            conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        folded.add(id(pad))
    if folded:
        keep = [n for n in g.node if id(n) not in folded]
        del g.node[:]
        g.node.extend(keep)
        prune_dead_nodes(g)  # the Constant -> Cast chains that computed the amounts
    return len(folded)
