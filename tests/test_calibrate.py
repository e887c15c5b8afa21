"""Calibration sets, calibrator batch streams, INT8 Q/DQ models on a trained tiny model."""

import json
import os
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexedge.card import ModelCard, load_card
from nexedge.export import calibrate as cal

INP = {"color": "gray", "resize": [40, 40], "crop": [32, 32], "crop_mode": "ten"}
#: Stated INT8 tolerance on the trained tiny model (90 labelled toy images): per-image defect score
#: within 0.15 (mean within 0.03), AUC within 2 points, at most 10 % decisions flipped.
MAX_SCORE_DIFF, MEAN_SCORE_DIFF, MAX_AUC_POINTS, MAX_FLIPS = 0.15, 0.03, 2.0, 0.10


@given(st.dictionaries(st.sampled_from("abcdefg"), st.integers(0, 300), min_size=1), st.integers(1, 700))
@settings(max_examples=200, deadline=None)
def test_stratified_quota_properties(counts, n):
    q = cal.stratified_quota(counts, n)
    assert sum(q.values()) == min(n, sum(counts.values()))
    assert all(0 <= q[c] <= counts[c] for c in counts)


def test_stratified_quota_keeps_rare_classes():
    q = cal.stratified_quota({"good": 5000, "chip": 40, "scratch": 12}, 512)
    assert sum(q.values()) == 512 and q["chip"] >= 8 and q["scratch"] >= 8
    assert q["good"] > q["chip"] > q["scratch"] - 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.toy import train_toy_checkpoint, write_toy_dataset

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("cal")
    ckpt = train_toy_checkpoint(str(d / "toy.pt"), inp=dict(INP))
    data = write_toy_dataset(str(d / "data"), load_card(ckpt).input, {"train": 60, "val": 90})
    write_toy_dataset(data, load_card(ckpt).input, {"test": 90}, seed=7)  # the INT8 report's held-out split
    host = export_onnx(ckpt, crops="host", parity_data=data, parity_images=4, threads=1, data=data).path
    ten = export_onnx(ckpt, crops="ten", parity_data=data, parity_images=4, threads=1, data=data).path
    return {"dir": d, "ckpt": ckpt, "data": data, "host": host, "ten": ten}


def test_manifest_stratified_eval_geometry(setup, tmp_path):
    card = load_card(setup["host"])
    path = cal.build_manifest(setup["data"], "toy", card.input, n=30, out_root=str(tmp_path))
    assert path == str(tmp_path / "toy" / "manifest.json")
    m = json.load(open(path))
    assert m["n_images"] == 30 and m["per_class"] == {"chip": 10, "good": 10, "scratch": 10}
    assert all(e["path"].startswith("train" + os.sep + e["label"]) for e in m["images"])
    imgs, labels = cal.load_manifest_images(path, card.input)
    assert imgs.shape == (30, 40, 40, 1) and imgs.dtype == np.uint8 and len(labels) == 30
    other = dict(card.input, resize=[48, 48], crop=[32, 32])
    with pytest.raises(ValueError, match="made for input resize=\\[40, 40\\]"):
        cal.load_manifest_images(path, other)
    with pytest.raises(ValueError, match="plain folder name"):
        cal.build_manifest(setup["data"], "../x", card.input, out_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="split folder not found"):
        cal.build_manifest(setup["data"], "t2", card.input, split="nope", out_root=str(tmp_path))


def _imgs(n):
    from nexedge.export.toy import toy_images

    return toy_images(n, INP, seed=5)[0]


def test_ort_reader_feeds_model_input(setup):
    host, ten = load_card(setup["host"]), load_card(setup["ten"])
    r = cal.OrtCalibrationReader(_imgs(10), host, batch_images=4)
    shapes = []
    while True:
        b = r.get_next()
        if b is None:
            break
        shapes.append(b["input"].shape)
    assert shapes == [(40, 3, 32, 32), (40, 3, 32, 32), (20, 3, 32, 32)] and len(r) == 3
    r2 = cal.OrtCalibrationReader(_imgs(3), ten, batch_images=8)
    b = r2.get_next()
    assert b["images"].dtype == np.uint8 and b["images"].shape == (3, 40, 40, 1)


def test_calibration_batch_stream_fixed_shapes(setup):
    host = load_card(setup["host"])
    s = cal.CalibrationBatchStream(_imgs(10), host, batch_images=4)
    assert s.batch_size == 40 and s.shape == (40, 3, 32, 32) and s.used == 8
    batches = [s.next_batch(), s.next_batch(), s.next_batch()]
    assert batches[2] is None and all(b.flags["C_CONTIGUOUS"] and b.shape == s.shape for b in batches[:2])
    s.reset()
    np.testing.assert_array_equal(s.next_batch(), batches[0])
    ten = load_card(setup["ten"])
    g = cal.CalibrationBatchStream(_imgs(5), ten, batch_images=5)
    assert g.batch_size == 5 and g.dtype == np.uint8 and g.nbytes == 5 * 40 * 40
    with pytest.raises(ValueError, match="fewer than one batch"):
        cal.CalibrationBatchStream(_imgs(3), ten, batch_images=4)


def test_entropy_calibrator_with_fake_tensorrt(setup, tmp_path):
    """Our calibrator logic around TensorRT's base class (TensorRT itself is absent here)."""

    class FakeBase:
        def __init__(self):
            self.base_init = True

    class FakeCuda:
        def __init__(self):
            self.copies, self.allocs = [], []

        def malloc(self, n):
            self.allocs.append(n)
            return 0xBEEF

        def htod(self, ptr, arr):
            self.copies.append((ptr, arr.copy()))

        def sync(self):
            pass

        def active(self):
            import contextlib

            return contextlib.nullcontext()

    fake_trt = types.SimpleNamespace(IInt8EntropyCalibrator2=FakeBase)
    cuda = FakeCuda()
    stream = cal.CalibrationBatchStream(_imgs(9), load_card(setup["host"]), batch_images=4)
    cache = tmp_path / "cache.bin"
    c = cal.make_entropy_calibrator(fake_trt, stream, str(cache), cuda=cuda)
    assert c.base_init and c.get_batch_size() == 40 and cuda.allocs == [stream.nbytes]
    assert c.get_batch(["input"]) == [0xBEEF] and c.get_batch(["input"]) == [0xBEEF]
    assert c.get_batch(["input"]) is None
    assert [a.shape for _, a in cuda.copies] == [(40, 3, 32, 32)] * 2
    assert c.read_calibration_cache() is None
    c.write_calibration_cache(memoryview(b"TRT-8601-EntropyCalibration2\n"))
    assert c.read_calibration_cache() == b"TRT-8601-EntropyCalibration2\n"


@pytest.fixture(scope="module")
def int8(setup):
    from nexedge.export.int8 import run_calibration

    out = {}
    for flavour in ("host", "ten"):
        out[flavour] = run_calibration(setup[flavour], setup["data"], n_images=60, out_root=str(setup["dir"] / "c"),
                                       threads=1)
    return out


def _zero_points(model):
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]


@pytest.mark.parametrize("flavour", ["host", "ten"])
def test_int8_models_load_and_agree_with_fp32(setup, int8, flavour):
    from nexedge.export.quantize import compare_int8
    from nexedge.export.toy import toy_images
    from nexedge.runtime import open_backend

    res = int8[flavour]
    assert set(res.outputs) == {"tensorrt", "ort"}
    for target, path in res.outputs.items():
        card = load_card(path)  # sha256 verified
        assert card.precision == "int8" and card.data["parent"]["sha256"] == load_card(setup[flavour]).sha256
        q = card.graph["quantization"]
        assert q["target"] == target and q["calibration"]["n_images"] == 60
        assert card.ops_source["status"] == "measured" and card.ops_source["split"] == "val"
        rep = card.data["metrics"]["int8_vs_fp32"]
        assert rep["n_images"] == 90 and rep["split"] == "test"  # not the split that picked the thresholds
        assert abs(rep["auc_delta_points"]) <= MAX_AUC_POINTS
        assert rep["max_abs_score_diff"] <= MAX_SCORE_DIFF and rep["mean_abs_score_diff"] <= MEAN_SCORE_DIFF
        assert max(max(f["flip_fraction_good"], f["flip_fraction_defect"]) for f in rep["deployed"]) <= MAX_FLIPS
        assert set(rep["fpr_at_tpr_int8"]) == {"99.1", "99.3", "99.5", "99.7", "100"}
        # Fresh images, through open_backend like the daemon.
        imgs, labels = toy_images(30, INP, seed=11)
        with open_backend(setup[flavour], intra_threads=1) as a, open_backend(path, intra_threads=1) as b:
            again = compare_int8(a, b, imgs, [["good", "chip", "scratch"][i] for i in labels],
                                 load_card(setup[flavour]), card)
        assert again["max_abs_score_diff"] <= MAX_SCORE_DIFF


def test_int8_quantization_layout(setup, int8):
    import onnx

    from nexedge.export.quantize import BACKBONE_PREFIX

    trt = onnx.load(int8["host"].outputs["tensorrt"])
    assert all(np.all(z == 0) and z.dtype == np.int8 for z in _zero_points(trt))  # symmetric int8
    # TensorRT's DequantizeLinear takes INT8 only: no INT32 (quantized bias) inputs, and the static
    # TensorRT lint passes for every release.
    from nexedge.export import onnx_check as oc

    for flavour in ("host", "ten"):
        m = onnx.load(int8[flavour].outputs["tensorrt"])
        types = oc.tensor_types(m)
        assert {types[n.input[0]] for n in m.graph.node if n.op_type == "DequantizeLinear"} == {oc.INT8}
        assert all(not oc.errors(oc.check_onnx(m, t)) for t in oc.TARGETS)
    ort_ = onnx.load(int8["host"].outputs["ort"])
    assert {z.dtype for z in _zero_points(ort_)} == {np.dtype(np.uint8)}  # U8S8 activations
    for model in (trt, ort_):
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        inits = {i.name: i for i in model.graph.initializer}
        w_scales = [inits[n.input[1]] for n in dq if n.input[0] in inits and inits[n.input[0]].data_type == 3]
        assert w_scales and all(len(s.dims) == 1 and s.dims[0] > 1 for s in w_scales)  # per-channel weights
        gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
        # Final FC kept float: float weight and bias initializers, its output not re-quantized.
        assert all(inits[i].data_type == 1 for i in gemm.input[1:])
        assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear" and gemm.output[0] in n.input]
    # In-graph model: preprocessing and averaging stay float; only the backbone is quantized.
    g = onnx.load(int8["ten"].outputs["ort"]).graph
    producers = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.name.startswith(BACKBONE_PREFIX):
            continue
        assert all(getattr(producers.get(i), "op_type", "") != "DequantizeLinear" for i in n.input), n.name
    assert g.input[0].type.tensor_type.elem_type == 2  # still uint8 images in


def test_card_validation_rejects_tampered_int8(int8):
    from nexedge.card import CardError
    from nexedge.runtime import open_backend

    path = int8["host"].outputs["ort"]
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CardError, match="artifact.sha256"):
        open_backend(path)


def test_calibrate_rejects_non_fp32_and_unknown_target(setup, int8, tmp_path):
    from nexedge.export.int8 import run_calibration

    with pytest.raises(ValueError, match="fp32 ONNX"):
        run_calibration(int8["ten"].outputs["tensorrt"], setup["data"], out_root=str(tmp_path))
    with pytest.raises(ValueError, match="unknown INT8 target 'tflite'; expected one of tensorrt, ort"):
        run_calibration(setup["ten"], setup["data"], targets=["tflite"], out_root=str(tmp_path))
    with pytest.raises(RuntimeError, match="--trt-cache needs TensorRT"):
        run_calibration(setup["ten"], setup["data"], n_images=8, targets=["ort"], eval_split=None,
                        trt_cache=True, out_root=str(tmp_path), out_dir=str(tmp_path))


def test_cli_calibrate(setup, tmp_path, capsys):
    from nexedge.cli import main

    rc = main(["calibrate", setup["host"], "--data", setup["data"], "--images", "12", "--targets", "ort",
               "--calib-root", str(tmp_path / "calibrate"), "--out-dir", str(tmp_path), "--eval-images", "30"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ort: " in out and "AUC fp32" in out
    assert load_card(str(tmp_path / "toy.host.int8-ort.onnx")).precision == "int8"


def test_int8_card_is_valid_modelcard(int8):
    card = load_card(int8["ten"].outputs["ort"])
    assert isinstance(card, ModelCard) and card.graph["crops"] == "ten"


def test_check_dq_inputs_int8_rejects_quantized_bias():
    """quantize_model's guard: an INT32 DequantizeLinear input (ORT's default QuantizeBias) is refused."""
    from onnx import TensorProto, helper

    from nexedge.export.quantize import check_dq_inputs_int8

    b = helper.make_tensor("b", TensorProto.INT32, [2], [1, 2])
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["b", "s"], ["y"], name="bias_dq")], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [b, s])
    with pytest.raises(RuntimeError, match="1 DequantizeLinear node.*bias_dq on 'b' \\(INT32\\).*INT8 only"):
        check_dq_inputs_int8(helper.make_model(g))


def test_int8_stem_stays_float(setup, tmp_path):
    # quantizing the stem cost EfficientNet-Lite0 most of its INT8 ranking (benchmarks/results/
    # int8_stem.md): the first conv reads float weights, later convs int8 ones. Its own calibration:
    # another test here tampers with the shared fixture's INT8 files.
    import onnx

    from nexedge.export.int8 import run_calibration

    outputs = []
    for flavour in ("host", "ten"):
        res = run_calibration(setup[flavour], setup["data"], n_images=20, out_root=str(tmp_path / "c"),
                              out_dir=str(tmp_path), eval_split=None, threads=1)
        outputs += list(res.outputs.items())
    for target, path in outputs:
        m = onnx.load(path)
        stem = load_card(path).graph["quantization"]["float_stem"]
        assert stem, target
        inits = {i.name for i in m.graph.initializer}
        convs = {n.name: n for n in m.graph.node if n.op_type == "Conv"}
        assert all(convs[s].input[1] in inits for s in stem)  # a float initializer, not a DequantizeLinear output
        assert any(n.input[1] not in inits for k, n in convs.items() if k not in stem), target


def test_stem_nodes_are_the_convs_at_full_and_half_resolution():
    from onnx import TensorProto, helper

    from nexedge.export.quantize import stem_nodes

    sizes = [64, 32, 32, 32] + [16] * 6 + [8] * 6
    nodes, vis = [], []
    for i, h in enumerate(sizes):
        nodes.append(helper.make_node("Conv", [f"x{i}", f"w{i}"], [f"x{i + 1}"], name=f"conv{i}"))
        vis.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["n", 8, h, h]))
    g = helper.make_graph(nodes, "g", vis[:1], [helper.make_tensor_value_info("x16", TensorProto.FLOAT, None)],
                          value_info=vis[1:])
    assert stem_nodes(g) == ["conv0", "conv1", "conv2", "conv3"]
    assert stem_nodes(g, exclude=["conv0"]) == ["conv1"]  # from conv1 (32 px) on, 12 convs >= 16 px: too many
    g2 = helper.make_graph(nodes[:3], "g", vis[:1], [helper.make_tensor_value_info("x3", TensorProto.FLOAT, None)])
    assert stem_nodes(g2) == ["conv0"]  # no inferred shapes: the first conv alone
