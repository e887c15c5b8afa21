"""`nexedge check-onnx`: the static TensorRT lint, its rules, and CI over everything nexedge exports.

The matrix test exports one architecture per layer family (MATRIX_ARCHS; a test checks that
the others add no layer type) in every crop flavour (host,
center, five, ten), fp32 and TensorRT Q/DQ INT8, once per (arch, flavour) into a
module-scoped cache, and requires every graph to pass the rules of TensorRT 8.5,
8.6 and 10. Tiny inputs (36x36, crop 32) and untrained weights keep it fast.

VGG19 (and its STN variant) is the exception: its 100M-parameter classifier made
each export + quantization 2-4 minutes on the shared 2-core box (8 of them: 23 min
of a 57 min suite run). Its fp32 host and TenCrop graphs are linted where
test_export already exports them; its ops are a subset of ResNet's (STN as in
resnet*_stn), and the Q/DQ rules depend on the quantizer settings, not the arch.
"""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from nexedge.export import onnx_check as oc  # noqa: E402
from nexedge.models import list_models  # noqa: E402

FLAVOURS = ("host", "center", "five", "ten")


@pytest.fixture(scope="module")
def exported(untrained_export):
    """(arch, flavour) -> {"fp32": path, "int8": TensorRT Q/DQ path}: the run-wide untrained exports
    of tests/conftest.py (36x36, crop 32; test_export checks their parity), each built once."""
    return lambda arch, flavour: untrained_export(arch, flavour, int8=True)


# One architecture per op family: resnet34/50 (and their STN variants) are the same op types as
# resnet18/_stn, Lite1/2 the same as Lite0 at other widths. Every architecture's fp32 host and
# TenCrop graphs are linted in test_export, so what the matrix adds (flavours x Q/DQ) is per family.
MATRIX_ARCHS = ("resnet18", "resnet18_stn", "resnet18_att2", "small_max", "tiny", "efficientnet_lite0")


def _matrix():
    for arch in list_models():
        if arch not in MATRIX_ARCHS:
            continue  # see above and the module docstring
        for flavour in FLAVOURS:
            for precision in ("fp32", "int8"):
                yield pytest.param(arch, flavour, precision, id=f"{arch}-{flavour}-{precision}")


@pytest.mark.parametrize("arch,flavour,precision", list(_matrix()))
def test_every_export_passes_tensorrt_lint(exported, arch, flavour, precision):
    """Items 1 and 2 can never come back silently: every graph nexedge exports parses on 8.5, 8.6, 10."""
    path = exported(arch, flavour)[precision]
    model = onnx.load(path)
    for target in oc.TARGETS:
        found = oc.check_onnx(model, target)
        assert not oc.errors(found), oc.format_findings(path, target, found)
    if flavour != "host":
        assert model.graph.node[0].op_type == "Cast" or all(
            n.op_type == "Cast" for n in model.graph.node if "images" in n.input)


def test_export_records_tensorrt_check_in_card(exported):
    from nexedge.card import load_card

    card = load_card(exported("tiny", "ten")["fp32"])
    assert card.data["provenance"]["export"]["tensorrt_check"] == {t: "ok" for t in oc.TARGETS}


def _io(name, t, shape):
    return helper.make_tensor_value_info(name, t, shape)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_lint_uint8_rules():
    """UINT8 into anything but a Cast is an error for every target (the old in-graph export)."""
    x = _io("images", TensorProto.UINT8, [1, 4, 4, 1])
    y = _io("y", TensorProto.FLOAT, [1, 1, 4, 4])
    old = _model([helper.make_node("Transpose", ["images"], ["t"], perm=[0, 3, 1, 2]),
                  helper.make_node("Cast", ["t"], ["y"], to=TensorProto.FLOAT)], [x], [y])
    new = _model([helper.make_node("Cast", ["images"], ["c"], to=TensorProto.FLOAT),
                  helper.make_node("Transpose", ["c"], ["y"], perm=[0, 3, 1, 2])], [x], [y])
    for t in oc.TARGETS:
        rules = {f.rule for f in oc.errors(oc.check_onnx(old, t))}
        assert rules == {"uint8"}, t
        assert not oc.check_onnx(new, t), t


def _qdq_model(bias_type=TensorProto.INT32, zp=0, zp_type=TensorProto.INT8, axis=0):
    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.int8), "w")
    ws = numpy_helper.from_array(np.full(2, 0.1, np.float32), "ws")
    wz = numpy_helper.from_array(np.zeros(2, np.int8), "wz")
    b = helper.make_tensor("b", bias_type, [2], [1, 2])
    bs = numpy_helper.from_array(np.full(2, 0.01, np.float32), "bs")
    s = numpy_helper.from_array(np.array(0.02, np.float32), "s")
    z = helper.make_tensor("z", zp_type, [], [zp])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=axis),
             helper.make_node("DequantizeLinear", ["b", "bs"], ["bd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["y"])]
    return _model(nodes, [_io("x", TensorProto.FLOAT, [1, 1, 4, 4])], [_io("y", TensorProto.FLOAT, [1, 2, 4, 4])],
                  [w, ws, wz, b, bs, s, z])


def test_lint_qdq_rules():
    """INT32 DequantizeLinear input (quantized bias), non-zero / uint8 zero points, wrong per-channel axis."""
    for t in oc.TARGETS:
        found = oc.errors(oc.check_onnx(_qdq_model(), t))
        # 8.x also asserts 3 inputs on the bias DequantizeLinear (no zero point given).
        want = ["qdq-input"] if t == "trt10" else ["qdq-input", "qdq-zero-point"]
        assert [f.rule for f in found] == want and "'b' is INT32" in found[0].message
    assert {f.rule for f in oc.errors(oc.check_onnx(_qdq_model(zp=3), "trt10"))} >= {"qdq-zero-point"}
    bad_type = oc.errors(oc.check_onnx(_qdq_model(zp_type=TensorProto.UINT8), "trt8.6"))
    assert any("UINT8" in f.message for f in bad_type)
    assert any(f.rule == "qdq-axis" for f in oc.errors(oc.check_onnx(_qdq_model(axis=1), "trt8.5")))


def test_types_are_inferred_on_a_copy_without_the_weights():
    """Shape inference sees large weights as typed inputs (no data) and still infers every type it did on
    the whole model; small initializers it reads values from (Reshape's shape) keep their data."""
    w = numpy_helper.from_array(np.ones((64, 48), np.int8), "w")  # 3072 elements: left out of the copy
    nodes = [helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
             helper.make_node("Reshape", ["x", "shape"], ["xr"]),
             helper.make_node("MatMul", ["xr", "wd"], ["h"]),
             helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT16)]
    m = _model(nodes, [_io("x", TensorProto.FLOAT, [2, 4, 16])], [_io("y", TensorProto.FLOAT16, [2, 48])],
               [w, numpy_helper.from_array(np.array(0.1, np.float32), "ws"),
                numpy_helper.from_array(np.array(0, np.int8), "wz"),
                numpy_helper.from_array(np.array([2, 64], np.int64), "shape")])
    lite = oc._without_weights(m)
    assert [i.name for i in lite.graph.initializer] == ["ws", "wz", "shape"]
    assert "w" in [i.name for i in lite.graph.input] and len(lite.SerializeToString()) < 1000
    full = onnx.shape_inference.infer_shapes(m, strict_mode=True).graph
    want = {v.name: v.type.tensor_type.elem_type for v in list(full.input) + list(full.output) + list(full.value_info)}
    want.update({i.name: i.data_type for i in m.graph.initializer})
    assert oc.tensor_types(m) == want and want["xr"] == TensorProto.FLOAT and want["wd"] == TensorProto.FLOAT
    assert oc.check_targets(m) == {t: oc.check_onnx(m, t) for t in oc.TARGETS}
    assert m.graph.initializer[0].raw_data  # the caller's model keeps its weights


def test_lint_ops_types_opset_and_dla():
    x, y = _io("x", TensorProto.FLOAT, ["batch", 4]), _io("y", TensorProto.FLOAT, ["batch", 4])
    m = _model([helper.make_node("Unique", ["x"], ["y"])], [x], [y])
    assert any(f.rule == "op" and "Unique" in f.message for f in oc.errors(oc.check_onnx(m, "trt10")))
    ln = _model([helper.make_node("LayerNormalization", ["x", "g"], ["y"])], [x], [y],
                [numpy_helper.from_array(np.ones(4, np.float32), "g")])
    assert any(f.level == "error" and f.rule == "op" for f in oc.check_onnx(ln, "trt8.5"))  # no importer in 8.5
    assert not oc.check_onnx(ln, "trt8.6")
    d = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)], [x],
               [_io("y", TensorProto.DOUBLE, ["batch", 4])])
    assert any(f.rule == "dtype" and "DOUBLE" in f.message for f in oc.errors(oc.check_onnx(d, "trt8.6")))
    r = _model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=21)
    assert [f.rule for f in oc.check_onnx(r, "trt8.6")] == ["opset"] and not oc.check_onnx(r, "trt10") == []
    dla = oc.check_onnx(r, "trt10", dla=True)
    assert any(f.rule == "dla-shape" for f in dla)
    assert any(f.rule == "dla-qdq" for f in oc.errors(oc.check_onnx(_qdq_model(bias_type=TensorProto.INT8),
                                                                  "trt8.6", dla=True)))
    with pytest.raises(ValueError, match="unknown TensorRT target 'trt7'; expected one of trt8.5, trt8.6, trt10"):
        oc.check_onnx(r, "trt7")
    assert [oc.target_for_version(v) for v in ("8.5.2.2", "8.6.1", "10.3.0", "10.13")] == [
        "trt8.5", "trt8.6", "trt10", "trt10"]


def test_cli_check_onnx(exported, tmp_path, capsys):
    from nexedge.cli import main

    good = exported("tiny", "ten")["int8"]
    assert main(["check-onnx", good]) == 0
    out = capsys.readouterr().out
    assert all(f"{good}: {t}: ok" in out for t in oc.TARGETS)
    bad = tmp_path / "bad.onnx"
    onnx.save(_qdq_model(), str(bad))
    assert main(["check-onnx", str(bad), "--target", "trt8.5"]) == 1
    out = capsys.readouterr().out
    assert "trt8.5: 2 error(s)" in out and "[qdq-input]" in out and "only activation types" in out
    assert "[qdq-zero-point]" in out  # 8.5 asserts 3 inputs on the bias DequantizeLinear too
    assert main(["check-onnx", str(bad), "--target", "trt9"]) == 1
    assert "unknown TensorRT target 'trt9'" in capsys.readouterr().err


def test_matrix_covers_every_architecture_module_type():
    """Leaving an architecture out of the matrix is only sound while its layer types are
    covered there: a new architecture with a new layer type fails here until it joins."""
    from nexedge.models import create_model

    def module_types(arch):
        try:
            model = create_model(arch, 3, input_size=[32, 32])
        except TypeError:
            model = create_model(arch, 3)
        return {type(m) for m in model.modules() if not list(m.children())}

    covered = set().union(*(module_types(a) for a in MATRIX_ARCHS))
    for arch in list_models():
        if arch not in MATRIX_ARCHS and not arch.startswith("vgg"):  # VGG: module docstring
            missing = module_types(arch) - covered
            assert not missing, f"{arch} has layer types {missing} that the lint matrix never exports"


def _two_input_qdq():
    """x -> QuantizeLinear(x, s) -> DequantizeLinear(q, s) -> Relu: Q/DQ without zero points."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    return helper.make_model(helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q"),
         helper.make_node("DequantizeLinear", ["q", "s"], ["d"], name="dq"),
         helper.make_node("Relu", ["d"], ["y"], name="relu")], "g", [x], [y], [s]),
        opset_imports=[helper.make_opsetid("", 17)])


def test_lint_requires_the_zero_point_input_before_tensorrt_10():
    """Issue 28 item 8: onnx-tensorrt 8.5/8.6 assert 3 inputs on Q/DQ; 10.x defaults the zero point to
    INT8 (so its DequantizeLinear input is INT8, not ONNX's UINT8 default)."""
    from nexedge.export import onnx_check as oc

    m = _two_input_qdq()
    for target in ("trt8.5", "trt8.6"):
        errs = [f for f in oc.errors(oc.check_onnx(m, target)) if f.rule == "qdq-zero-point"]
        assert {f.where for f in errs} == {"q (QuantizeLinear)", "dq (DequantizeLinear)"}, errs
        assert "needs the zero-point input (3 inputs" in errs[0].message
    assert not oc.errors(oc.check_onnx(m, "trt10")), oc.check_onnx(m, "trt10")


def test_fake_parser_follows_each_release_on_two_input_qdq():
    """The fake parser must reject what 8.5/8.6 reject (3 inputs asserted) and accept what 10.x accepts
    (a 2-input Q is INT8, so its DequantizeLinear takes it)."""
    from tests.support.trt_fakes import fake_parse_errors

    data = _two_input_qdq().SerializeToString()
    for version in ((8, 5), (8, 6)):
        assert any("requires 3 inputs" in e for e in fake_parse_errors(data, version))
    assert fake_parse_errors(data, (10, 3)) == []


def test_unknown_op_is_an_error_and_require_clean_refuses_it(tmp_path):
    """Issue 28 item 8: an operator with no importer fails the parse; it was only a warning, and
    require_clean (build-engine, calibrate) ignored warnings."""
    import onnx
    from onnx import TensorProto, helper

    from nexedge.export import onnx_check as oc

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    m = helper.make_model(helper.make_graph([helper.make_node("Mish", ["x"], ["y"], name="mish")], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 18)])
    path = str(tmp_path / "mish.onnx")
    onnx.save(m, path)
    for target in oc.TARGETS:
        errs = oc.errors(oc.check_onnx(m, target))
        assert any(f.rule == "op" and "Mish has no importer" in f.message for f in errs), target
    with pytest.raises(RuntimeError, match="Mish has no importer in trt10"):
        oc.require_clean(path, ["trt10"])
