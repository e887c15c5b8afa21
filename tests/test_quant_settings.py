"""ONNX Runtime INT8 settings of `nexedge calibrate` (issue 16): defaults, validation, and the
TensorRT target's fixed Q/DQ format (no settings may reach it)."""

import pytest

from nexedge.export import quantize as qz


def test_ort_settings_defaults_are_u8s8_per_channel():
    assert qz.ort_settings() == {"activations": "u8", "weights": "s8", "per_channel": True, "reduce_range": False}
    assert qz.ort_settings(activations=None, reduce_range=None) == qz.ORT_DEFAULTS  # None keeps the default
    assert qz.ort_label({"weights": "u8", "per_channel": False}) == "U8U8 per-tensor"
    assert qz.ort_label({"reduce_range": True}) == "U8S8 per-channel, reduce_range"


def test_ort_settings_name_the_bad_value():
    with pytest.raises(ValueError, match="weights 'int4': expected u8 or s8"):
        qz.ort_settings(weights="int4")
    with pytest.raises(ValueError, match="unknown ORT quantization setting 'symmetric'"):
        qz.ort_settings(symmetric=True)


def test_tensorrt_target_refuses_ort_settings(tmp_path):
    from nexedge.card import ModelCard

    card = ModelCard.new(["good", "chip"])
    with pytest.raises(ValueError, match="tensorrt target"):
        qz.quantize_model(str(tmp_path / "x.onnx"), str(tmp_path / "y.onnx"), card, None, "tensorrt",
                          ort={"reduce_range": True})


def test_calibrate_cli_passes_the_settings():
    import argparse

    from nexedge.cli import build_parser
    from nexedge.export.cli import configure_calibrate

    p = argparse.ArgumentParser()
    configure_calibrate(p)
    a = p.parse_args(["m.onnx", "--data", "d", "--quant-kw", "ort_weights=u8", "--quant-kw", "per_tensor=true",
                      "--quant-kw", "reduce_range=true"])
    assert (a.ort_weights, a.per_tensor, a.reduce_range, a.ort_activations) == ("u8", True, True, None)
    assert not a.quantize_stem  # the stem stays float unless asked
    assert p.parse_args(["m.onnx", "--data", "d", "--quant-kw", "quantize_stem=true"]).quantize_stem
    # the retired flags still work through nexedge's parser
    a = build_parser().parse_args(["calibrate", "m.onnx", "--data", "d", "--ort-weights", "u8", "--per-tensor",
                                   "--reduce-range"])
    assert (a.ort_weights, a.per_tensor, a.reduce_range, a.ort_activations) == ("u8", True, True, None)
    assert build_parser().parse_args(["calibrate", "m.onnx", "--data", "d", "--quantize-stem"]).quantize_stem


def test_prune_dead_nodes_drops_unread_constants_and_keeps_the_graph_working():
    """quantize_static leaves unread Constant nodes behind (66 in EfficientNet-Lite0); ORT warns for each."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    const = helper.make_tensor("c", TensorProto.FLOAT, [1], [2.0])
    nodes = [
        helper.make_node("Constant", [], ["k"], value=const),
        helper.make_node("Mul", ["x", "k"], ["y"]),
        helper.make_node("Constant", [], ["dead1"], value=const),  # read only by another dead node
        helper.make_node("Neg", ["dead1"], ["dead2"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              initializer=[numpy_helper.from_array(np.ones(1, np.float32), "unread")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert qz.prune_dead_nodes(model.graph) == 2
    assert [n.op_type for n in model.graph.node] == ["Constant", "Mul"]
    assert not model.graph.initializer
    assert qz.prune_dead_nodes(model.graph) == 0
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.array([3.0], np.float32)})[0].tolist() == [6.0]
