"""Export clean-up: zero Pads folded into Conv pads (nexedge.export.fold)."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from nexedge.export.fold import fold_pads_into_conv  # noqa: E402


def _pad_conv(mode="constant", fill=None, pads=(0, 0, 0, 0, 0, 0, 1, 1), second_reader=False):
    """x -> Pad (amounts from a Constant -> Cast chain, as torch writes F.pad) -> Conv 3x3 stride 2."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 2, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Constant", [], ["p32"], value=numpy_helper.from_array(np.array(pads, np.int32))),
        helper.make_node("Cast", ["p32"], ["pads"], to=TensorProto.INT64),
    ]
    pad_in = ["x", "pads"]
    if fill is not None:
        nodes.append(helper.make_node("Constant", [], ["fill"], value=numpy_helper.from_array(np.array(fill, np.float32))))
        pad_in.append("fill")
    nodes += [helper.make_node("Pad", pad_in, ["xp"], mode=mode),
              helper.make_node("Conv", ["xp", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])]
    if second_reader:
        nodes.append(helper.make_node("Relu", ["xp"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 2, 9, 9]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                          outputs, [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_asymmetric_zero_pad_becomes_conv_pads_with_identical_output():
    x = np.random.default_rng(1).normal(size=(1, 2, 8, 8)).astype(np.float32)
    model = _pad_conv()
    before = _run(model, x)[0]
    assert fold_pads_into_conv(model) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Conv"], ops  # the Pad and its Constant -> Cast chain are gone
    conv = model.graph.node[0]
    assert conv.input[0] == "x"
    assert list(helper.get_attribute_value(next(a for a in conv.attribute if a.name == "pads"))) == [0, 0, 1, 1]
    after = _run(model, x)[0]
    assert before.shape == after.shape == (1, 4, 4, 4)
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("kw", [{"mode": "reflect"}, {"fill": 1.0}, {"pads": (0, 1, 0, 0, 0, 0, 1, 1)},
                                {"second_reader": True}], ids=["reflect", "nonzero-fill", "channel-pad", "shared"])
def test_pads_that_are_not_a_conv_zero_border_stay(kw):
    x = np.random.default_rng(2).normal(size=(1, 2, 8, 8)).astype(np.float32)
    model = _pad_conv(**kw)
    if "pads" in kw:  # a channel pad changes the Conv's input channels: give it weights that fit
        w = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    before = _run(model, x)
    assert fold_pads_into_conv(model) == 0
    assert "Pad" in [n.op_type for n in model.graph.node]
    for a, b in zip(before, _run(model, x)):
        np.testing.assert_array_equal(a, b)


def test_zero_fill_given_explicitly_is_folded():
    model = _pad_conv(fill=0.0)
    x = np.random.default_rng(3).normal(size=(1, 2, 8, 8)).astype(np.float32)
    before = _run(model, x)[0]
    assert fold_pads_into_conv(model) == 1
    np.testing.assert_array_equal(before, _run(model, x)[0])


def test_exported_lite0_has_no_pad_left(tmp_path):
    """EfficientNet-Lite's TF "same" Pads used to stay float between INT8 convolutions (issue 16's
    profile: DequantizeLinear/Pad/QuantizeLinear ~250 ms of Lite0's TenCrop INT8 time)."""
    pytest.importorskip("torch")
    import torch

    from nexedge.card import ModelCard
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.toy import CLASSES
    from nexedge.models import create_model
    from nexedge.models.checkpoint import save_checkpoint

    torch.set_num_threads(1)
    model = create_model("efficientnet_lite0", len(CLASSES), input_size=[32, 32]).eval()
    card = ModelCard.new(CLASSES, resize=(36, 36), crop=(32, 32), crop_mode="center", color="gray")
    ckpt = save_checkpoint(str(tmp_path / "l0.pt"), model, "efficientnet_lite0", CLASSES, "good",
                           arch_kwargs={"input_size": [32, 32]}, card=card)
    res = export_onnx(ckpt, crops="center", parity_images=2, max_batch=2, threads=1)
    ops = [n.op_type for n in onnx.load(res.path).graph.node]
    assert "Pad" not in ops and ops.count("Conv") == 49
    assert res.parity["max_abs_diff"] <= 1e-4, res.parity
