"""Operating points that mean what the card says (issue 11): one precise defect score, thresholds
measured on the artifact that runs (ten-crop export, INT8, engine), card validation, weak points."""

import json
import logging
import os
import types

import numpy as np
import pytest

from nexedge import metrics
from nexedge import preprocess as pp
from nexedge.card import CardError, ModelCard, card_path_for, load_card, read_card
from nexedge.runtime import open_backend

torch = pytest.importorskip("torch")

INP = {"color": "gray", "resize": [40, 40], "crop": [32, 32], "crop_mode": "center"}


def _split_scores(artifact, root, split, backend=None):
    """Scores and is-defect of every image of ``root/split`` through ``backend`` (default: the daemon's
    own, nexedge.runtime.open_backend)."""
    from nexedge.export.thresholds import score_images, split_images

    card = load_card(artifact)
    paths, labels = split_images(root, split, card.classes)
    be = backend or open_backend(artifact)
    try:
        scores, _ = score_images(be, paths, card.input)
    finally:
        if backend is None:
            be.close()
    return scores, labels != card.good_index


def assert_reproduces(artifact, root, backend=None):
    """Each operating point's claimed TPR and FPR hold at its threshold on the split it was measured on."""
    card = load_card(artifact)
    src = card.ops_source
    assert src["status"] == "measured" and src["artifact_sha256"] == card.sha256
    scores, is_def = _split_scores(artifact, root, src["split"], backend)
    assert src["n_defects"] == int(is_def.sum()) and src["n_good"] == int((~is_def).sum())
    for op in card.operating_points:
        rej = scores >= op["threshold"]
        assert rej[is_def].mean() == pytest.approx(op["tpr"]) and rej[is_def].mean() >= op["target_tpr"] - 1e-9
        assert rej[~is_def].mean() == pytest.approx(op["fpr"])
    vs = card.data["val_scores"]
    assert sum(vs["good"]) == src["n_good"] and sum(vs["defect"]) == src["n_defects"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from nexedge.export.toy import train_toy_checkpoint, write_toy_dataset

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("ops")
    ckpt = train_toy_checkpoint(str(d / "toy.pt"), inp=dict(INP), steps=40)
    data = write_toy_dataset(str(d / "data"), load_card(ckpt).input, {"train": 45, "val": 60, "test": 45})
    return {"dir": d, "ckpt": ckpt, "data": data}


@pytest.fixture(scope="module")
def ten(toy):
    from nexedge.export.onnx_export import export_onnx

    return export_onnx(toy["ckpt"], crops="ten", max_batch=16, data=toy["data"], parity_data=toy["data"],
                       parity_images=4, threads=1)


# -- item 1: crop mode ---------------------------------------------------------

def test_ten_crop_export_measures_its_own_operating_points(toy, ten):
    card = ten.card
    assert load_card(toy["ckpt"]).ops_source["crop_mode"] == "center"
    assert ten.measured and card.ops_source["crop_mode"] == "ten" and card.ops_source["backend"] == "onnxruntime"
    assert card.crop_mode_mismatch() is None
    assert_reproduces(ten.path, toy["data"])


def test_daemon_refuses_thresholds_measured_with_another_crop_mode(toy, tmp_path, caplog):
    from nexedge.export.onnx_export import export_onnx
    from nexedge.serve import config as serve_config
    from nexedge.serve.daemon import Daemon
    from tests.support.daemon import base_config

    res = export_onnx(toy["ckpt"], str(tmp_path / "m.ten.onnx"), crops="ten", max_batch=8, parity_images=2,
                      threads=1)  # no labelled data: the card keeps the checkpoint's center-crop numbers
    d = Daemon(serve_config.from_dict(base_config(res.path, decision={"target_tpr": 1.0})))
    with pytest.raises(serve_config.ConfigError, match="crop mode 'center'.*allow_unmeasured"):
        d.setup()
    d.close_unserved()
    card = load_card(res.path)
    assert not res.measured and card.ops_source["status"] == "from_parent"
    assert "measured with crop mode 'center'" in card.crop_mode_mismatch()
    caplog.set_level(logging.INFO, logger="nexedge.serve")
    ok = Daemon(serve_config.from_dict(base_config(res.path, decision={"target_tpr": 1.0, "allow_unmeasured": True})))
    try:
        ok.setup()
        assert any("from parent (not re-measured)" in r.getMessage() for r in caplog.records)
        assert any("UNMEASURED" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    finally:
        ok.close_unserved()


# -- item 2: one precise score ---------------------------------------------------

def _affine_host_onnx(folder, a=10.0, b=-18.0):
    """A real ONNX host-crop model whose defect logit minus good logit is ``a * mean(x) + b``."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["m", "ax"], ["m2"]),
             helper.make_node("MatMul", ["m2", "W"], ["mw"]),
             helper.make_node("Add", ["mw", "B"], ["logits"])]
    inits = [helper.make_tensor("ax", TensorProto.INT64, [1], [1]),
             helper.make_tensor("W", TensorProto.FLOAT, [1, 2], [0.0, a]),
             helper.make_tensor("B", TensorProto.FLOAT, [2], [0.0, b])]
    g = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])], inits)
    path = os.path.join(folder, "affine.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    card = ModelCard.new(["good", "chip"], resize=(8, 8), crop=(8, 8), crop_mode="center", mean=(0.5,) * 3,
                         std=(0.5,) * 3, kind="onnx")
    card.data["graph"].update({"crops": "host", "input_name": "input", "output_names": ["logits"], "max_batch": 16})
    card.save_for(path)
    return path


def test_runtime_score_keeps_precision_near_zero(tmp_path):
    path = _affine_host_onnx(str(tmp_path))
    imgs = np.stack([np.full((8, 8, 1), v, np.uint8) for v in (0, 60, 127, 200, 255)])
    z = (imgs.reshape(5, -1).astype(np.float64) / 255 - 0.5) / 0.5
    d = 10.0 * z.mean(axis=1) - 18.0
    want = 1.0 / (1.0 + np.exp(-d))  # 1.4e-12 .. 3.4e-4
    with open_backend(path, intra_threads=1) as be:
        got = be.infer(imgs).defect_score
    assert np.all(got > 0)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # The trainer/card function gives the same numbers from the logits.
    logits = np.stack([np.zeros(5), d], axis=1)
    np.testing.assert_allclose(metrics.defect_score(logits, 0), want, rtol=1e-12)
    # A card threshold of 5e-8 (TPR 100 % at a low-scoring defect) is honoured at runtime.
    thr = float(want[2]) * 0.999
    assert (got >= thr).tolist() == [False, False, True, True, True]


def test_in_graph_defect_score_is_the_sum_of_defect_probabilities(tmp_path):
    from nexedge.export.graph import InGraphModel

    class Const(torch.nn.Module):
        def forward(self, x):
            n = x.shape[0]
            return torch.tensor([[0.0, -19.0, -21.0]]).repeat(n, 1)

    inp = {"resize": [8, 8], "crop": [6, 6], "mean": [0.5] * 3, "std": [0.5] * 3}
    m = InGraphModel(Const(), inp, "ten", 0).eval()
    probs, score, logits = m(torch.zeros(2, 8, 8, 1, dtype=torch.uint8))
    e = np.exp([-19.0, -21.0])
    want = e.sum() / (1.0 + e.sum())  # 6.4e-9
    assert float(score[0]) == pytest.approx(want, rel=1e-5)
    path = str(tmp_path / "g.onnx")
    torch.onnx.export(m, (torch.zeros(2, 8, 8, 1, dtype=torch.uint8),), path, dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["probs", "defect_score", "logits"],
                      dynamic_axes={"images": {0: "b"}, "probs": {0: "b"}, "defect_score": {0: "b"},
                                    "logits": {0: "b"}})
    import onnxruntime as ort

    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        None, {"images": np.zeros((2, 8, 8, 1), np.uint8)})
    assert float(out[1][0]) == pytest.approx(want, rel=1e-5)
    assert metrics.defect_score_from_probs(out[0], 0)[0] == pytest.approx(want, rel=1e-5)
    assert metrics.defect_score(out[2].astype(np.float64), 0)[0] == pytest.approx(want, rel=1e-5)  # what runtimes use


def test_decider_does_not_clamp_small_scores():
    from nexedge.serve.config import DecisionCfg, UncertainCfg
    from nexedge.serve.decide import Decider

    card = ModelCard.new(["good", "chip"])
    card.data["operating_points"] = [{"target_tpr": 1.0, "threshold": 5e-8}]
    dec = Decider(card, DecisionCfg(target_tpr=1.0), UncertainCfg(band=1.0, audit_fraction=0.0))
    assert dec.decide(1e-9) == ("PASS", False)  # log-odds 3.9 below the threshold: confident
    assert dec.decide(6e-8) == ("REJECT", True)
    assert dec.decide(0.0) == ("PASS", False) and dec.decide(1.0) == ("REJECT", False)


# -- item 3: INT8 and the done-means test --------------------------------------

@pytest.fixture(scope="module")
def int8(toy, ten, tmp_path_factory):
    from nexedge.export.int8 import run_calibration

    out = tmp_path_factory.mktemp("int8")
    return run_calibration(ten.path, toy["data"], name="t", n_images=30, targets=["ort"],
                           out_root=str(out / "calibrate"), out_dir=str(out), threads=1)


def test_int8_card_carries_its_own_operating_points_and_report_at_deployed_threshold(toy, ten, int8):
    path = int8.outputs["ort"]
    card = load_card(path)
    assert card.precision == "int8" and card.ops_source["status"] == "measured"
    assert card.ops_source["precision"] == "int8" and card.ops_source["split"] == "val"
    assert_reproduces(path, toy["data"])
    rep = card.data["metrics"]["int8_vs_fp32"]
    assert rep["split"] == "test" and rep["thresholds_from"] == {"fp32": "val", "int8": "val", "fp32_status": "measured"}
    dep = {d["target_tpr"]: d for d in rep["deployed"]}[1.0]
    assert dep["threshold_int8"] == card.operating_point(1.0)["threshold"]
    assert dep["threshold_fp32"] == load_card(ten.path).operating_point(1.0)["threshold"]
    # Escapes and overkill per class, counted independently here on the test split.
    s32, is_def = _split_scores(ten.path, toy["data"], "test")
    s8, _ = _split_scores(path, toy["data"], "test")
    assert dep["escapes_fp32"] == int((s32[is_def] < dep["threshold_fp32"]).sum())
    assert dep["escapes_int8"] == int((s8[is_def] < dep["threshold_int8"]).sum())
    assert dep["overkill_int8"] == int((s8[~is_def] >= dep["threshold_int8"]).sum())
    assert sum(r["int8"].get("escapes", 0) for r in dep["per_class"].values()) == dep["escapes_int8"]
    assert dep["per_class"]["good"]["fp32"]["overkill"] == dep["overkill_fp32"]
    flips = (s32 >= dep["threshold_fp32"]) != (s8 >= dep["threshold_int8"])
    assert dep["flip_fraction_good"] == pytest.approx(flips[~is_def].mean())
    assert dep["flip_fraction_defect"] == pytest.approx(flips[is_def].mean())
    from nexedge.export.cli import format_deployed, format_int8_line

    text = format_deployed(dep, rep)
    assert f"total escapes fp32 {dep['escapes_fp32']} int8 {dep['escapes_int8']}" in text
    assert any(line.split()[:2] == ["good", "overkill"] for line in text.splitlines())
    # each rate under its own name (not the larger one as "decisions flipped")
    assert (f"decisions that differ from fp32: {100 * dep['flip_fraction_defect']:.1f} % of defects, "
            f"{100 * dep['flip_fraction_good']:.1f} % of good") in text
    # the AUC delta comes with DeLong's paired interval, on the same test images
    y = is_def.astype(int)
    d = metrics.auc_difference(y, s32, s8)
    lo, hi = rep["auc_delta_ci95_points"]
    assert rep["auc_delta_points"] == pytest.approx(100 * d["delta"]) and lo <= rep["auc_delta_points"] <= hi
    assert (lo, hi) == pytest.approx((100 * d["lo"], 100 * d["hi"]))
    assert f"95 % CI {lo:+.2f} to {hi:+.2f}, DeLong paired, {rep['n_images']} images" in \
        format_int8_line("ort", path, rep)


def test_int8_report_refuses_the_threshold_split(toy, ten, tmp_path):
    from nexedge.export.int8 import run_calibration

    with pytest.raises(ValueError, match="not used to pick them"):
        run_calibration(ten.path, toy["data"], targets=["ort"], eval_split="val", out_root=str(tmp_path))


def _fake_trt_that_keeps_the_onnx():
    """The fake ``tensorrt`` of test_engine_logic whose 'engine' is the parsed ONNX bytes."""
    from test_engine_logic import _fake_trt

    trt, calls = _fake_trt()

    class Parser(trt.OnnxParser):
        def parse(self, data):
            calls["onnx"] = bytes(data)
            return super().parse(data)  # the faithful fake parser (network inputs and layers from the ONNX)

    def build(self, network, config):
        calls["builds"] += 1
        return b"FAKETRT" + calls["onnx"]

    trt.OnnxParser = Parser
    trt.Builder.build_serialized_network = build
    return trt


def _fake_trt_runner(tmp):
    """Opens a fake engine (ONNX bytes behind a prefix) with ONNX Runtime, under the engine's card."""
    from nexedge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    def open_fake(engine):
        blob = open(engine, "rb").read()
        assert blob.startswith(b"FAKETRT")
        onnx_path = os.path.join(tmp, os.path.basename(engine) + ".onnx")
        with open(onnx_path, "wb") as f:
            f.write(blob[len(b"FAKETRT"):])
        be = OnnxRuntimeBackend(onnx_path, card=load_card(engine), intra_threads=1, verify=False)
        be.name = "tensorrt (fake: onnxruntime)"
        return be

    return open_fake


def test_engine_measured_with_fake_trt_and_marked_when_it_cannot_run(toy, ten, tmp_path):
    from nexedge.export import cuda_device
    from nexedge.export.trt_build import build_engine
    from nexedge.export.trt_rules import BuildOptions

    trt = _fake_trt_that_keeps_the_onnx()
    dev = cuda_device.DeviceInfo("Orin", (8, 7))
    opts = BuildOptions(precision="fp16", timing_cache=str(tmp_path / "t.cache"))
    runner = _fake_trt_runner(str(tmp_path))
    path, _ = build_engine(ten.path, opts, out_dir=str(tmp_path / "e"), trt=trt, device=dev, runner=runner)
    card = load_card(path)
    assert card.data["artifact"]["kind"] == "engine" and card.ops_source["backend"] == "tensorrt (fake: onnxruntime)"
    assert_reproduces(path, toy["data"], backend=runner(path))

    def no_trt(engine):
        raise ImportError("No module named 'tensorrt'")

    path2, _ = build_engine(ten.path, opts._replace(precision="fp32"), out_dir=str(tmp_path / "e"), trt=trt,
                            device=dev, runner=no_trt)
    src = load_card(path2).ops_source
    assert src["status"] == "from_parent" and "tensorrt" in src["not_measured_reason"]
    assert src["crop_mode"] == "ten" and src["parent_status"] == "measured"
    assert "from parent (not re-measured)" in load_card(path2).ops_status_line()


# -- item 4: weak operating points ---------------------------------------------

def test_expected_escape_rate_is_the_rank_of_a_new_defect_among_the_validation_ones():
    assert metrics.expected_escape_rate({"tpr": 1.0, "n_defects": 53}) == pytest.approx(1 / 54)
    assert metrics.expected_escape_rate({"tpr": 51 / 53, "n_defects": 53}) == pytest.approx(3 / 54)
    assert metrics.expected_escape_rate({"tpr": 1.0}) is None  # a card older than n_defects
    # the figure holds for any score distribution: simulate validation + new defects drawn alike
    rng = np.random.default_rng(0)
    y = [0] * 40 + [1] * 20
    hits, trials = 0, 3000
    for _ in range(trials):
        s = np.r_[rng.random(40), rng.beta(0.5, 2.0, 21)]  # defects overlap the good ones heavily
        op = metrics.operating_point(y, s[:60], 1.0)
        hits += s[60] < op["threshold"]
    # (m+1)/(n+1) would be exact with the threshold on the weakest defect; placed below it (halfway
    # in log-odds to the next good score) the rate can only be lower
    assert 0.0 < hits / trials <= metrics.expected_escape_rate(op) + 0.01


def test_defects_needed_and_weak_points():
    assert metrics.defects_needed(1.0, 0.95) == 59
    assert metrics.clopper_pearson_lower(59, 59) >= 0.95 > metrics.clopper_pearson_lower(58, 58)
    assert metrics.defects_needed(0.95, 0.95) is None
    ops = metrics.operating_points([0] * 10 + [1] * 10, list(np.linspace(0, 0.4, 10)) + list(np.linspace(0.6, 1, 10)))
    weak = metrics.weak_points(ops)
    assert len(weak) == len(ops) and weak[0]["defects_needed"] == 59
    assert "rests on 10 validation defects" in weak[-1]["message"] and "0.741" in weak[-1]["message"]


def test_thresholds_cli_prints_weak_warning(toy, ten, capsys):
    from nexedge.cli import main

    assert main(["thresholds", ten.path, "--data", toy["data"], "--threads", "1"]) == 0
    out = capsys.readouterr().out
    n_def = load_card(ten.path).ops_source["n_defects"]
    assert "operating points measured on this artifact" in out
    assert f"WARNING: operating point TPR 100 % rests on {n_def} validation defects" in out
    assert "about 59 defects" in out


def test_daemon_warns_and_exports_the_tpr_lower_bound(tmp_path, caplog):
    from nexedge.serve import config as serve_config
    from nexedge.serve.daemon import Daemon
    from tests.support.daemon import base_config, build_tiny_onnx

    model = build_tiny_onnx(str(tmp_path))  # tpr_lower95 0.98 at TPR 100 %, 0.975 at 99.5 %
    caplog.set_level(logging.INFO, logger="nexedge.serve")
    d = Daemon(serve_config.from_dict(base_config(model, decision={"target_tpr": 1.0, "tpr_floor": 0.99})))
    try:
        d.setup()
        from prometheus_client import generate_latest

        text = generate_latest(d.metrics.registry).decode()
        assert "nexedge_threshold_tpr_lower95 0.98" in text and "nexedge_weak_operating_point 1.0" in text
        assert f"nexedge_threshold_expected_escape_rate {1 / 151!r}" in text  # TPR 100 % on 150 defects
        assert any(r.levelno == logging.WARNING and "WEAK OPERATING POINT" in r.getMessage() for r in caplog.records)
    finally:
        d.close_unserved()


def test_trainer_summary_and_eval_warn_on_weak_points(tmp_path, capsys):
    from nexedge.train.toydata import make_toy_imagefolder
    from nexedge.train.trainer import TrainConfig, train

    root = str(tmp_path / "data")
    make_toy_imagefolder(root, ("good", "scratch"), {"train": [6, 6], "val": [6, 5], "test": [4, 4]}, size=36)
    train(TrainConfig(data=root, out=str(tmp_path / "run"), arch="tiny", epochs=1, batch_size=4, resize=(36, 36),
                      crop=(32, 32), device="cpu", progress=False, plots=False, keep=1))
    out = capsys.readouterr().out
    assert "WARNING: operating point TPR 100 % rests on 5 validation defects" in out
    from nexedge.train.evaluate import run_evaluation

    run_evaluation([str(tmp_path / "run")], root, "test", ["center"], progress=False)
    assert "WARNING: test has 4 defect images" in capsys.readouterr().out


# -- item 5 (and issue 13 item 8): card validation --------------------------------

@pytest.mark.parametrize("bad", [float("inf"), 1.5, 0.0, -0.1, float("nan")])
def test_card_threshold_outside_0_1_is_refused(tmp_path, bad):
    card = ModelCard.new(["good", "chip"])
    card.data["operating_points"] = [{"target_tpr": 1.0, "threshold": 0.3}]
    path = tmp_path / "m.card.json"
    data = card.data
    data["operating_points"][0]["threshold"] = bad
    path.write_text(json.dumps(data))  # json writes Infinity / NaN, as a hand-edited card might
    with pytest.raises(CardError, match=r"operating_points\[0\]\.threshold.*\(0, 1\]"):
        read_card(str(path))


def test_card_monotone_points_and_histogram_counts():
    card = ModelCard.new(["good", "chip"])
    card.data["operating_points"] = [{"target_tpr": 0.99, "threshold": 0.1, "n_good": 3, "n_defects": 2},
                                     {"target_tpr": 1.0, "threshold": 0.2, "n_good": 3, "n_defects": 2}]
    with pytest.raises(CardError, match="threshold no higher"):
        card.validate()
    card.data["operating_points"][1]["threshold"] = 0.05
    card.validate()
    card.data["val_scores"] = {"edges": [0.0, 0.5, 1.0], "good": [2, 0], "defect": [0, 2]}
    with pytest.raises(CardError, match="val_scores.good.*2 scores.*measured on 3"):
        card.validate()
    card.data["val_scores"]["good"] = [2, 1]
    card.validate()


def test_daemon_refuses_card_with_infinite_threshold(tmp_path):
    from nexedge.serve import config as serve_config
    from nexedge.serve.daemon import Daemon
    from tests.support.daemon import base_config, build_tiny_onnx

    model = build_tiny_onnx(str(tmp_path))
    cp = card_path_for(model)
    data = json.load(open(cp))
    data["operating_points"][0]["threshold"] = float("inf")
    with open(cp, "w") as f:
        json.dump(data, f)
    d = Daemon(serve_config.from_dict(base_config(model, decision={"target_tpr": 1.0})))
    with pytest.raises(CardError, match="threshold"):
        d.setup()
    d.close_unserved()


# -- items 6-8: SAT ------------------------------------------------------------------

def test_sat_sync_all_reduces_on_the_training_device_nccl_like_fake_pg(monkeypatch):
    """A fake process group that, like NCCL, refuses tensors that are not on its device."""
    import torch.distributed as dist

    from nexedge.train.losses import SATLoss

    group_device = torch.device("cpu")  # the only device here; on a GPU box this is cuda:N
    seen = []

    def all_reduce(t, *a, **k):
        if t.device != group_device:
            raise RuntimeError(f"fake NCCL: tensors must be on {group_device}, got {t.device}")
        seen.append(t.device)
        t.mul_(2)  # two ranks with the same update

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    loss = SATLoss([0, 1, 1], 2, 0, alpha=0.5, es=0)
    loss(torch.tensor([[0.0, 2.0], [0.0, 2.0], [2.0, 0.0]]), torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]), 1)
    before = loss.soft.clone()
    loss.sync(group_device)
    assert seen == [group_device, group_device]
    torch.testing.assert_close(loss.soft, before)  # mean of two equal updates
    group_device = torch.device("meta")  # a group on another device than the tensors: refused, loudly
    with pytest.raises(RuntimeError, match="fake NCCL"):
        loss.touched[:] = True
        loss.sync(torch.device("cpu"))


def test_sat_updates_each_sample_once_per_epoch_under_balanced_sampling():
    from nexedge.train.losses import SATLoss

    loss = SATLoss([0, 1], 2, 0, alpha=0.5, es=0)
    logits = torch.tensor([[0.0, 0.0]] * 4)
    idx = torch.tensor([1, 1, 1, 0])  # a rare sample drawn three times in one batch
    loss(logits, torch.tensor([1, 1, 1, 0]), idx, epoch=1)
    loss(logits[:2], torch.tensor([1, 1]), torch.tensor([1, 1]), epoch=1)  # and again later in the epoch
    torch.testing.assert_close(loss.soft[1], torch.tensor([0.25, 0.75]))  # one update: 0.5*[0,1] + 0.5*[.5,.5]
    loss(logits[:1], torch.tensor([1]), torch.tensor([1]), epoch=2)
    torch.testing.assert_close(loss.soft[1], torch.tensor([0.375, 0.625]))


def test_mislabels_falls_back_to_model_for_never_updated_sat_labels(tmp_path, monkeypatch):
    from nexedge.train import mislabels as ml

    paths = ["train/good/a.png", "train/good/b.png", "train/scratch/c.png"]
    monkeypatch.setattr("nexedge.runs.resolve_artifact", lambda run: str(tmp_path / "x.pt"))
    monkeypatch.setattr("nexedge.card.load_card", lambda *a, **k: types.SimpleNamespace(input={"crop_mode": "center"}))
    monkeypatch.setattr("nexedge.train.evaluate.score_checkpoint", lambda *a, **k: {
        "classes": ["good", "scratch"], "good_index": 0, "labels": np.array([0, 0, 1]), "paths": paths,
        "center": np.array([0.9, 0.1, 0.2])})
    np.savez(tmp_path / "sat_state.npz", paths=np.array(paths), classes=np.array(["good", "scratch"]),
             loss=np.array("sat"), soft=np.array([[1.0, 0.0], [0.7, 0.3], [1.0, 0.0]]),
             weights=np.array([1.0, 0.7, 1.0]))
    res = ml.rank_mislabels(str(tmp_path), str(tmp_path), progress=False)
    rows = {r["path"]: r for r in res["rows"]}
    assert rows[os.path.normpath(paths[0])]["source"] == "model"  # one-hot: never updated
    assert rows[os.path.normpath(paths[0])]["suspicion"] == pytest.approx(0.9)
    assert rows[os.path.normpath(paths[1])]["source"] == "sat"
    assert rows[os.path.normpath(paths[2])]["suspicion"] == pytest.approx(0.8)  # p(good) = 1 - score
    assert res["rows"][0]["path"] == os.path.normpath(paths[0])


# -- item 9: attention ----------------------------------------------------------------

def test_attention_global_feature_cancels_except_in_dot_compat():
    from nexedge.models.attention import AttentionEstimator

    torch.manual_seed(0)
    l = torch.randn(2, 8, 4, 4)  # noqa: E741
    g1, g2 = torch.randn(2, 16), torch.randn(2, 16)
    for compat in ("concat", "add"):
        att = AttentionEstimator(8, 16, compat)
        torch.testing.assert_close(att(l, g1)[1], att(l, g2)[1])  # g cancels in the softmax
    dot = AttentionEstimator(8, 16, "dot")
    assert (dot(l, g1)[1] - dot(l, g2)[1]).abs().max() > 1e-3
    g = g1.clone().requires_grad_(True)
    dot(l, g)[0].sum().backward()
    assert g.grad.abs().max() > 1e-3


# -- item 10: STN stays float in INT8 -----------------------------------------------

def test_int8_keeps_the_stn_float(tmp_path):
    import onnx

    from nexedge.export.calibrate import OrtCalibrationReader
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.quantize import quantize_model
    from nexedge.export.toy import toy_images, train_toy_checkpoint

    inp = {"color": "gray", "resize": [28, 28], "crop": [24, 24], "crop_mode": "center"}
    ck = train_toy_checkpoint(str(tmp_path / "s.pt"), arch="resnet18_stn", inp=inp, steps=2, n_val=12,
                              arch_kwargs={"input_size": [24, 24]})
    onnx_path = export_onnx(ck, crops="host", parity_images=2, threads=1).path
    card = load_card(onnx_path)
    imgs, _ = toy_images(8, card.input)
    out = str(tmp_path / "s.int8.onnx")
    quantize_model(onnx_path, out, card, OrtCalibrationReader(imgs, card), "ort")
    g = onnx.load(out).graph
    stn = [n for n in g.node if "/stn/" in n.name]
    assert any(n.op_type == "GridSample" for n in stn) and any(n.op_type == "MatMul" for n in stn)
    consumers = {i for n in g.node if n.op_type == "DequantizeLinear" for i in n.output}
    assert not any(i in consumers for n in stn for i in n.input), "an STN node reads a dequantized tensor"


# -- item 11: resize mode ------------------------------------------------------------

def test_resize_short_keeps_aspect_ratio_and_is_carried_by_the_card():
    img = np.zeros((40, 80), np.uint8)
    img[:, 20:60] = 255  # a centred square: stays square with short, squashed with stretch
    short = pp.prepare(img, {"color": "gray", "resize": [20, 20], "resize_mode": "short"})
    stretch = pp.prepare(img, {"color": "gray", "resize": [20, 20]})
    assert short.shape == stretch.shape == (20, 20, 1)
    assert (short[:, :, 0] > 127).all()  # the center 40x40 -> all white
    assert (stretch[:, :3, 0] < 128).all() and (stretch[:, 8:12, 0] > 127).all()
    card = ModelCard.new(["good", "chip"], resize_mode="short")
    assert card.input["resize_mode"] == "short"
    card.data["input"]["resize_mode"] = "crop"
    with pytest.raises(CardError, match="resize_mode"):
        card.validate()
    with pytest.raises(ValueError, match="resize mode 'crop'"):
        pp.prepare(img, {"color": "gray", "resize": [20, 20], "resize_mode": "crop"})


# -- demo: claimed TPR beside what the line delivered ----------------------------------

def test_demo_recap_puts_claimed_tpr_beside_measured_on_test(tmp_path):
    from nexedge.demo.run import deployed_claim_line
    from tests.support.daemon import build_tiny_onnx

    model = build_tiny_onnx(str(tmp_path))  # card: TPR 1.0 claimed, lower bound 0.98, 150 val defects
    stream = {"binary": {"defect": {"PASS": 1, "REJECT": 19, "RECHECK": 0},
                         "good": {"PASS": 36, "REJECT": 4, "RECHECK": 0}}}
    line = deployed_claim_line({"model": model}, stream)
    assert "claimed TPR 100.0% (95% lower bound 98.0%" in line
    assert "on test: TPR 95.0% FPR 10.0% (20 defect, 40 good" in line


def _escape_op(n=35, tpr=1.0):
    return {"target_tpr": 1.0, "threshold": 0.1, "tpr": tpr, "fpr": 0.2, "n_defects": n, "n_good": 86,
            "tpr_lower95": metrics.clopper_pearson_lower(int(round(tpr * n)), n)}


def test_format_points_prints_the_95_bound_beside_the_expected_escape_rate():
    from nexedge.export.thresholds import format_points

    card = ModelCard.new(["good", "chip"])
    card.data["operating_points"] = [_escape_op()]
    text = format_points(card)
    # 35 defects all caught: 1/36 = 2.8 % on average over validation draws, at most 8.2 % for this threshold
    assert "new defect escapes: expected / 95% bound" in text and "2.8 % / 8.2 %" in text
    assert "not a promise for this one threshold" in text


def test_selection_warning_when_val_picked_the_checkpoint_and_set_its_threshold():
    from nexedge.export.thresholds import format_points

    card = ModelCard.new(["good", "chip"])
    card.data["operating_points"] = [_escape_op()]
    card.data["operating_points_source"] = {"status": "measured", "split": "val", "crop_mode": "center"}
    card.data["provenance"] = {"select": "val_auc", "best_of_run": "ckpt_e004.pt"}
    assert "the split that also picked this checkpoint" in card.selection_warning()
    assert "WARNING: the operating points were measured on 'val'" in format_points(card)
    for prov, split in (({"select": "last", "best_of_run": "ckpt_e005.pt"}, "val"),
                        ({"select": "val_auc", "best_of_run": "ckpt_e004.pt"}, "holdout")):
        card.data["provenance"] = prov
        card.data["operating_points_source"]["split"] = split
        assert card.selection_warning() is None


def test_promise_check_says_whether_test_escapes_fit_the_bound():
    op = _escape_op(332)  # the tiles' train+val defects under --cv: bound 0.9 %
    assert metrics.promise_check(0, 40, op)["within"]
    assert metrics.promise_check(1, 40, op)["within"]  # P(>= 1 of 40 at 0.9 %) = 0.30
    assert not metrics.promise_check(3, 40, op)["within"]
    assert metrics.binomial_tail(1, 40, 0.009) == pytest.approx(1 - (1 - 0.009) ** 40)
    assert metrics.promise_check(0, 0, op) is None
