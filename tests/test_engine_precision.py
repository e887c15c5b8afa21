"""Engine scores: FP16 and INT8 builds must not touch the precision of what reaches the defect score.

TensorRT is absent here. The fake builder (tests/support/trt_fakes.py) rounds the float outputs and weights
of every layer not pinned to FP32 to float16, as an FP16 engine stores them (values below 6e-8
flush to 0), and its engine runs under ONNX Runtime; so the decisions of a real tiny model's FP16
"engine" are compared with the fp32 ONNX model's at a threshold below 6e-8.
"""

import os

import numpy as np
import pytest

from nexedge.card import load_card
from nexedge.export import cuda_device, trt_network
from nexedge.export.trt_build import build_engine
from nexedge.export.trt_rules import BuildOptions
from tests.support.trt_fakes import fake_trt, use_fake_tensorrt

ORIN = cuda_device.DeviceInfo("Orin", (8, 7), 16, 61, "NVIDIA Jetson AGX Orin Developer Kit")
INP = {"color": "gray", "resize": [36, 36], "crop": [32, 32], "crop_mode": "ten"}
TARGET = 3e-8  # below FP16's smallest subnormal step (5.96e-8)


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A trained tiny model whose final layer is scaled and shifted so that the defect scores of 48
    images spread over about 1e-11 .. 1e-5 around 3e-8 (where TPR-100 % thresholds often lie), exported
    with in-graph TenCrop; and the images with their fp32 ONNX Runtime scores."""
    torch = pytest.importorskip("torch")
    from nexedge import metrics
    from nexedge import preprocess as pp
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.toy import toy_images, train_toy_checkpoint
    from nexedge.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from nexedge.runtime import open_backend

    folder = tmp_path_factory.mktemp("sharp")
    torch.set_num_threads(1)
    ck = train_toy_checkpoint(str(folder / "base.pt"), inp=dict(INP), steps=30)
    model, card = model_from_checkpoint(ck)
    imgs, _ = toy_images(48, INP, seed=5)
    with torch.no_grad():
        ml = pp.average_crops(model(torch.from_numpy(pp.host_batch(imgs, card.input, "ten"))).double().numpy(), 10)
    g = card.good_index

    def log_scores(k, delta):
        z = k * ml
        z[:, g] += delta
        return np.log(metrics.defect_score(z, g))

    k = 1.0
    while np.ptp(np.percentile(log_scores(k, 0.0), [10, 90])) < 10:  # spread: ~10 log units between deciles
        k *= 1.5
    lo, hi = -100.0, 100.0
    for _ in range(60):  # good-class bias that puts the median score at TARGET
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.median(log_scores(k, mid)) > np.log(TARGET) else (lo, mid)
    with torch.no_grad():
        model.fc.weight.mul_(k)
        model.fc.bias.mul_(k)
        model.fc.bias[g] += lo
    c = load_checkpoint(ck)
    sharp_ck = save_checkpoint(str(folder / "sharp.pt"), model, c["arch"], c["classes"], "good",
                               arch_kwargs=c["arch_kwargs"], card=card)
    onnx = export_onnx(sharp_ck, crops="ten", max_batch=8, parity_images=2, threads=1).path
    with open_backend(onnx, intra_threads=1) as be:
        ref = np.concatenate([be.infer(imgs[i:i + 8]).defect_score for i in range(0, len(imgs), 8)])
    return onnx, imgs, ref


def _threshold_below_fp16_step(ref):
    """The threshold below 6e-8 in the widest log-odds gap between two neighbouring scores of ``ref``."""
    s = np.sort(ref)
    lo = np.log(s)
    gaps = [(lo[i + 1] - lo[i], i) for i in range(len(s) - 1) if 3e-9 < s[i] and s[i + 1] < 5.9e-8]
    width, i = max(gaps)
    assert width > 0.2, f"no clear gap below 6e-8 in {s}"
    return float(np.sqrt(s[i] * s[i + 1]))


def _engine_scores(path, imgs):
    from nexedge.runtime import open_backend

    with open_backend(path) as be:
        return np.concatenate([be.infer(imgs[i:i + 8]).defect_score for i in range(0, len(imgs), 8)]), be


def _logit(p):
    return np.log(p) - np.log1p(-p)


@pytest.mark.parametrize("precision", ["fp16", "int8-implicit"])
def test_threshold_below_6e8_survives_an_fp16_engine_build_with_fake_tensorrt(sharp, tmp_path, monkeypatch,
                                                                              precision):
    """Issue 28 item 4: the engine scores from the graph's logits in float64 on the host, and the layers
    outside the backbone stay FP32: every decision at a threshold below 6e-8 equals the fp32 ONNX
    model's, and scores near it agree within 0.05 in log-odds."""
    onnx, imgs, ref = sharp
    thr = _threshold_below_fp16_step(ref)
    assert thr < 6e-8 and 0 < (ref >= thr).sum() < len(ref)
    trt, calls = fake_trt("8.5.2.2")
    use_fake_tensorrt(monkeypatch, trt)
    opts = BuildOptions(precision="fp16")
    if precision == "int8-implicit":
        cache = tmp_path / "cache.bin"
        cache.write_bytes(b"TRT-8502-EntropyCalibration2\n")
        opts = BuildOptions(precision="int8", calib_cache=str(cache))
    path, _ = build_engine(onnx, opts, out_dir=str(tmp_path), trt=trt, device=ORIN)
    assert calls["fp16_layers"] and all(n.startswith("/backbone/") for n in calls["fp16_layers"])
    if precision == "int8-implicit":  # the calibrator may quantize the backbone only
        assert calls["int8_quantizable"] and all(n.startswith("/backbone/") for n in calls["int8_quantizable"])
    assert {"/Cast", "/Mul", "/Softmax", "/ReduceMean", "/ReduceSum"} <= set(calls["pinned"])
    info = load_card(path).data["provenance"]["engine"]
    assert info["score_output"] == "logits" and "OBEY_PRECISION_CONSTRAINTS" in info["flags"]
    got, be = _engine_scores(path, imgs)
    assert be.graph_output == "logits"
    assert np.array_equal(got >= thr, ref >= thr)
    near = (ref > 1e-10) & (ref < 1e-5)
    assert near.sum() >= 20 and np.abs(_logit(got[near]) - _logit(ref[near])).max() < 0.05


def test_fake_fp16_builder_does_flush_unpinned_probabilities(sharp, tmp_path, monkeypatch):
    """The fake must break what TensorRT breaks, or the test above proves nothing: with the score taken
    from the graph's probabilities and nothing pinned (the build before issue 28), scores below 6e-8
    come out of the FP16 engine as 0 or on FP16's 5.96e-8 grid."""
    onnx, imgs, ref = sharp
    trt, calls = fake_trt("10.3.0.30")
    use_fake_tensorrt(monkeypatch, trt)
    monkeypatch.setattr(trt_network, "pin_outside_backbone", lambda trt, network, card: [])
    monkeypatch.setattr(trt_network, "score_path_problems", lambda *a: [])
    path, _ = build_engine(onnx, BuildOptions(precision="fp16"), out_dir=str(tmp_path), trt=trt,
                           device=ORIN)
    from nexedge.runtime import open_backend

    with open_backend(path) as be:
        be.graph_output = be.output_name = "probs"  # read the probabilities, as the runtime did
        got = np.concatenate([be.infer(imgs[i:i + 8]).defect_score for i in range(0, len(imgs), 8)])
    small = ref < 2.9e-8
    assert small.sum() >= 5 and (got[small] == 0).all()
    thr = _threshold_below_fp16_step(ref)
    assert not np.array_equal(got >= thr, ref >= thr)


def test_score_path_check_refuses_an_unpinned_softmax_with_fake_tensorrt(sharp, tmp_path, monkeypatch):
    """The build-time lint: an in-graph graph scored from probabilities whose softmax is not pinned
    (e.g. pinning skipped) does not build."""
    onnx, _, _ = sharp
    import onnx as onnx_lib

    m = onnx_lib.load(onnx)
    keep = [o for o in m.graph.output if o.name != "logits"]
    del m.graph.output[:]
    m.graph.output.extend(keep)  # a graph from before the logits output
    legacy = str(tmp_path / "legacy.onnx")
    onnx_lib.save(m, legacy)
    card = load_card(onnx)
    card.data["graph"]["output_names"] = ["probs", "defect_score"]
    card.save_for(legacy)
    trt, calls = fake_trt("10.3.0.30")
    monkeypatch.setattr(trt_network, "pin_outside_backbone", lambda trt, network, card: [])
    with pytest.raises(RuntimeError, match=r"reduced precision would reach the defect score.*/Softmax \(SOFTMAX\)"):
        build_engine(legacy, BuildOptions(precision="fp16"), out_dir=str(tmp_path), trt=trt, device=ORIN)
    assert calls["builds"] == 0
    monkeypatch.undo()
    use_fake_tensorrt(monkeypatch, trt)
    path, _ = build_engine(legacy, BuildOptions(precision="fp16"), out_dir=str(tmp_path), trt=trt,
                           device=ORIN)
    assert load_card(path).data["provenance"]["engine"]["score_output"] == "probs"
    assert "/Softmax" in calls["pinned"] and os.path.exists(path)
