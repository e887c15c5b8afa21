"""Cascade TenCrop: the measured band, the plan with real ONNX Runtime sessions (host-crop and
in-graph flavours), RECHECK for band frames stage 2 cannot decide, the daemon end to end, and the
TensorRT host-crop path with the fakes of tests/support/trt_fakes.py (no GPU here)."""

import contextlib
import os
import sys

import numpy as np
import pytest

from nexedge import metrics
from nexedge import preprocess as pp
from nexedge.card import load_card
from nexedge.runtime import cascade as cc
from nexedge.runtime import open_backend
from nexedge.runtime.base import BackendError
from tests.support.daemon import running_config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny model trained on toy images, exported host-crop (TenCrop) and in-graph TenCrop, both
    with their cascade band measured on a labelled val split."""
    import torch

    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.toy import train_toy_checkpoint, write_toy_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cascade")
    inp = {"color": "gray", "resize": [36, 36], "crop": [28, 28], "crop_mode": "ten"}
    ckpt = train_toy_checkpoint(str(root / "m.pt"), inp=dict(inp), steps=12, n_val=30, arch_kwargs={"width": 8})
    data = write_toy_dataset(str(root / "data"), load_card(ckpt).input, {"val": 60})
    host = export_onnx(ckpt, crops="host", parity_images=2, threads=1, max_batch=16, data=data, cascade=True).path
    ten = export_onnx(ckpt, crops="ten", parity_images=2, threads=1, max_batch=16, data=data, cascade=True).path
    other = train_toy_checkpoint(str(root / "other.pt"), inp=dict(inp), steps=1, n_val=6, seed=5,
                                 arch_kwargs={"width": 8})
    return {"ckpt": ckpt, "data": data, "host": host, "ten": ten, "other": other, "root": str(root)}


def _val(data, card):
    from nexedge.export.parity import read_image
    from nexedge.export.thresholds import split_images

    paths, labels = split_images(data, "val", card.classes)
    return np.stack([pp.prepare(read_image(p), card.input) for p in paths]), labels


def _run(plan, images, n=8):
    outs = [plan.infer(images[i : i + n]) for i in range(0, len(images), n)]
    return (np.concatenate([o.defect_score for o in outs]), np.concatenate([o.stage for o in outs]),
            sum((o.recheck for o in outs), []))


def test_find_band_is_the_narrowest_that_agrees_then_widened():
    rng = np.random.default_rng(0)
    s_full = rng.random(500) ** 3
    s1 = np.clip(s_full + rng.normal(0, 0.05, 500), 1e-9, 1 - 1e-9)
    t = 0.2
    b0 = cc.find_band(s1, s_full, t, margin=0.0)
    assert b0["agreement"] == 1.0 and b0["lo"] <= t <= b0["hi"]
    rej = s_full >= t
    assert b0["lo"] == s1[rej].min() and b0["hi"] == s1[~rej].max()
    # one step narrower on either side and some frame is decided differently
    assert (cc.cascade_decisions(s1, s_full, t, np.nextafter(b0["lo"], 1), b0["hi"]) != rej).any()
    assert (cc.cascade_decisions(s1, s_full, t, b0["lo"], np.nextafter(b0["hi"], 0)) != rej).any()
    b1 = cc.find_band(s1, s_full, t, margin=1.0, y_defect=rej.astype(int))
    assert b1["lo"] < b0["lo"] and b1["hi"] > b0["hi"] and b1["agreement"] == 1.0
    assert b1["stage2_fraction"] >= b0["stage2_fraction"] and b1["escapes_cascade"] == b1["escapes_full"] == 0
    assert metrics.logit_exact(np.float64(b1["hi"])) == pytest.approx(metrics.logit_exact(np.float64(b0["hi"])) + 1.0)
    with pytest.raises(ValueError, match="margin"):
        cc.find_band(s1, s_full, t, margin=-1)


def test_held_out_agreement_is_leave_one_out_and_bounds_the_disagreement():
    """Each image decided by the band refitted without it (checked against a brute-force refit); the
    in-sample agreement is 1 by construction, the held-out one is not, and the margin buys some of it."""
    rng = np.random.default_rng(4)
    s_full = rng.random(120) ** 2
    s1 = np.clip(s_full + rng.normal(0, 0.08, 120), 1e-6, 1 - 1e-6)
    t = 0.3
    for margin in (0.0, 0.5):
        ho = cc.held_out_agreement(s1, s_full, t, margin)
        brute_dis = brute_to_pass = 0
        for i in range(120):
            keep = np.arange(120) != i
            b = cc.find_band(s1[keep], s_full[keep], t, margin)
            d = bool(cc.cascade_decisions(s1[i:i + 1], s_full[i:i + 1], t, b["lo"], b["hi"])[0])
            brute_dis += d != (s_full[i] >= t)
            brute_to_pass += (s_full[i] >= t) and not d
        assert (ho["disagree"], ho["reject_to_pass"]) == (brute_dis, brute_to_pass)
        assert ho["disagreement_upper"] > ho["disagree"] / 120
    band = cc.find_band(s1, s_full, t, margin=0.5)
    assert band["agreement"] == 1.0
    assert band["held_out_margin0"]["disagree"] > 0  # margin 0: the band's own edge images flip when held out
    assert band["held_out"]["disagree"] <= band["held_out_margin0"]["disagree"]
    assert band["held_out"]["disagreement_upper"] == pytest.approx(
        cc._cp_upper(band["held_out"]["disagree"], 120, 0.95))


def test_stage1_route_never_passes_a_band_or_nan_score():
    s1 = np.array([0.01, 0.3, 0.5, 0.7, 0.99, np.nan])
    route = cc.stage1_route(s1, 0.3, 0.7)
    assert route.tolist() == [0, -1, -1, -1, 1, -1]


@pytest.mark.parametrize("flavour", ["host", "ten"])
def test_card_band_reproduces_full_tencrop_on_val(models, flavour):
    """The band in the card, run by the plan on real ORT sessions, gives full TenCrop's decision on every
    val image at every operating point, with the recorded stage-2 share."""
    path = models[flavour]
    card = load_card(path)
    sec = card.data["cascade"]
    assert sec["status"] == "measured" and sec["artifact_sha256"] == card.sha256
    assert (sec["stage1"]["file"] is None) == (flavour == "host")
    images, _ = _val(models["data"], card)
    full = open_backend(path, intra_threads=1)
    s_full = np.concatenate([full.infer(images[i : i + 8]).defect_score for i in range(0, len(images), 8)])
    for op in card.operating_points:
        band = cc.band_for(card, float(op["threshold"]))
        assert band["agreement"] == 1.0
        ho = band["held_out"]  # what a new image can expect: leave-one-out, with its upper bound
        assert ho["method"] == "leave-one-out" and ho["n_images"] == len(images) and ho["disagreement_upper"] > 0
        assert band["held_out_margin0"]["margin_logit"] == 0.0
        plan = cc.make_plan(full, path, float(op["threshold"]), "on", intra_threads=1)
        score, stage, rechecks = _run(plan, images)
        assert rechecks == [None] * len(images)
        t = float(op["threshold"])
        np.testing.assert_array_equal(score >= t, s_full >= t)
        assert (stage == 2).mean() == pytest.approx(band["stage2_fraction"])
        vs = plan.monitor_card().data["val_scores"]  # the shift monitor's reference under this plan
        assert sum(vs["good"]) + sum(vs["defect"]) == len(images)
        s2 = stage == 2  # band frames carry full TenCrop's own score
        np.testing.assert_allclose(score[s2], s_full[s2], rtol=1e-5, atol=1e-12)
        if plan.own_stage1:
            plan.stage1.close()
    full.close()


def test_band_frames_get_recheck_when_stage2_fails_or_is_late(models):
    path = models["host"]
    card = load_card(path)
    images, _ = _val(models["data"], card)
    images = images[:8]
    full = open_backend(path, intra_threads=1)
    s1 = full.crop_view("center").infer(images).defect_score
    lo, hi = float(np.sort(s1)[2]), float(np.sort(s1)[5])  # 4 band frames, 2 final PASS, 2 final REJECT
    band = {"lo": lo, "hi": hi, "threshold": (lo + hi) / 2}

    class Failing:
        def __init__(self, inner):
            self.inner, self.calls = inner, []
            for a in ("card", "crops", "crop_mode", "max_batch", "input_shape", "name"):
                setattr(self, a, getattr(inner, a))

        def infer(self, x):
            self.calls.append(len(x))
            raise BackendError("injected stage-2 failure")

        def close(self):
            pass

    stage2 = Failing(full)
    plan = cc.CascadePlan(full.crop_view("center"), stage2, band, own_stage1=False)
    res = plan.infer(images)
    in_band = (s1 >= lo) & (s1 <= hi)
    assert stage2.calls == [int(in_band.sum())]  # one stage-2 batch of the band frames only
    for i in range(8):
        if in_band[i]:
            assert res.recheck[i] == "backend_error" and np.isnan(res.defect_score[i]) and res.stage[i] == 0
        else:
            assert res.recheck[i] is None and res.stage[i] == 1 and res.defect_score[i] == s1[i]
    # late: the measured stage-2 time says the deadline would pass first
    plan2 = cc.CascadePlan(full.crop_view("center"), full, band, own_stage1=False, clock=lambda: 100.0)
    plan2.s_per_image = 1.0
    res2 = plan2.infer_frames(images, [100.5] * 4 + [1e9] * 4)
    for i in range(8):
        if in_band[i] and i < 4:
            assert res2.recheck[i] == "deadline_passed" and res2.stage[i] == 0
        elif in_band[i]:
            assert res2.recheck[i] is None and res2.stage[i] == 2
        else:
            assert res2.stage[i] == 1
    full.close()


def test_one_slow_stage2_call_does_not_disable_stage2(models):
    """Two stage-2 stalls (a paused process) make the estimate say "too late" for band frames with a
    0.1 s deadline; once reprobe_s passed, stage 2 runs anyway on one band frame, is measured fast
    again, and band frames are decided from then on (they used to be RECHECK deadline_passed for good)."""
    import time

    path = models["host"]
    images, _ = _val(models["data"], load_card(path))
    images = images[:8]
    full = open_backend(path, intra_threads=1)
    s1 = full.crop_view("center").infer(images).defect_score
    lo, hi = float(np.sort(s1)[2]), float(np.sort(s1)[5])
    band = (s1 >= lo) & (s1 <= hi)

    class Stalling:
        def __init__(self, inner, stall_calls):
            self.inner, self.calls, self.stall_calls = inner, 0, stall_calls
            for a in ("card", "crops", "crop_mode", "max_batch", "input_shape", "name"):
                setattr(self, a, getattr(inner, a))

        def warmup(self, n=2):
            self.inner.warmup(n)

        def infer(self, x):
            self.calls += 1
            if self.calls in self.stall_calls:
                time.sleep(0.6)
            return self.inner.infer(x)

        def close(self):
            pass

    stage2 = Stalling(full, {2, 3})  # call 1 is the warm-up's
    plan = cc.CascadePlan(full.crop_view("center"), stage2, {"lo": lo, "hi": hi, "threshold": (lo + hi) / 2},
                          own_stage1=False)
    plan.warmup(1)
    plan.reprobe_s = 0.3
    far = [time.monotonic() + 1e6] * 8
    for _ in range(2):
        assert plan.infer_frames(images, far).recheck == [None] * 8  # decided, slowly

    def near():
        return plan.infer_frames(images, [time.monotonic() + 0.1] * 8).recheck

    late = ["deadline_passed"] * int(band.sum())
    assert [r for r, b in zip(near(), band) if b] == late  # the estimate says late
    time.sleep(plan.reprobe_s)
    assert [r for r, b in zip(near(), band) if b] == [None] + late[1:]  # stage 2 re-measured on one band frame
    assert plan.reprobes == 1 and plan._backoff == 1  # ... on time
    assert near() == [None] * 8 and near() == [None] * 8  # and the estimate is back to the measured cost

    # a stage 2 that really is too slow (0.5 s per call on this plan's clock) costs one probe frame per
    # wait, and each probe that confirms it doubles the wait
    now = [0.0]

    class Slow(Stalling):
        def infer(self, x):
            now[0] += 0.5
            return self.inner.infer(x)

    slow = cc.CascadePlan(full.crop_view("center"), Slow(full, set()), dict(plan.band), own_stage1=False,
                          clock=lambda: now[0])
    for _ in range(3):
        slow._measured(1.0)
    probes = []
    for _ in range(7):
        now[0] += 1.0
        rechecks = slow.infer_frames(images, [now[0] + 0.1] * 8).recheck
        probes.append(sum(r is None for r, b in zip(rechecks, band) if b))
    assert probes == [1, 0, 1, 0, 0, 0, 1] and slow._backoff == 8  # waits of 1, 2 and 4 s, then 8
    full.close()


def test_ingraph_stage1_is_tied_by_the_card(models, tmp_path):
    """The in-graph stage-1 model is the one the card names (sha256); another one is refused."""
    import shutil

    from nexedge.card import card_path_for
    from nexedge.export.onnx_export import export_onnx

    ten = models["ten"]
    card = load_card(ten)
    assert card.data["cascade"]["stage1"]["file"].endswith(".center.onnx")
    folder = tmp_path / "copy"
    folder.mkdir()
    for p in (ten, os.path.join(os.path.dirname(ten), card.data["cascade"]["stage1"]["file"])):
        shutil.copy(p, folder)
        shutil.copy(card_path_for(p), folder)
    mine = str(folder / os.path.basename(ten))
    be = open_backend(mine, intra_threads=1)
    thr = float(card.operating_points[0]["threshold"])
    assert cc.make_plan(be, mine, thr, "on", intra_threads=1) is not None
    wrong = export_onnx(models["other"], out=str(tmp_path / "w.center.onnx"), crops="center", parity_images=2,
                        threads=1).path
    s1 = str(folder / card.data["cascade"]["stage1"]["file"])
    shutil.copy(wrong, s1)
    shutil.copy(card_path_for(wrong), card_path_for(s1))
    with pytest.raises(cc.CascadeError, match="not the stage-1 model"):
        cc.make_plan(be, mine, thr, "on", intra_threads=1)
    assert cc.make_plan(be, mine, thr, "auto", intra_threads=1) is None  # auto: full TenCrop, logged
    with pytest.raises(cc.CascadeError, match="no cascade band for threshold"):
        cc.make_plan(be, mine, 0.123456, "on", intra_threads=1)
    be.close()


def test_derived_card_band_is_from_parent_until_remeasured(models, tmp_path):
    import shutil

    from nexedge.card import card_path_for
    from nexedge.export.thresholds import measure_artifact

    card = load_card(models["host"])
    child = card.derive("onnx", precision="int8")
    assert child.data["cascade"]["status"] == "from_parent"
    path = str(tmp_path / "child.onnx")
    shutil.copy(models["host"], path)
    child.save_for(path)
    be = open_backend(path, intra_threads=1)
    thr = float(card.operating_points[0]["threshold"])
    with pytest.raises(cc.CascadeError, match="not measured on this artifact"):
        cc.make_plan(be, path, thr, "on")
    be.close()
    m = measure_artifact(path, models["data"], "val", backend_options={"intra_threads": 1})  # re-measures it
    assert m.card.data["cascade"]["status"] == "measured" and os.path.exists(card_path_for(path))


def _config(path, mode, warmup=1, threshold=None):
    from tests.support.daemon import base_config

    raw = base_config(path)
    raw["model"].update(cascade=mode, warmup=warmup)
    if threshold is not None:
        raw["decision"] = {"threshold": threshold}
    return raw


@contextlib.contextmanager
def _running(path, mode, backend=None, threshold=None):
    with running_config(_config(path, mode, 0 if backend is not None else 1, threshold), backend) as d:
        yield d


def test_daemon_cascade_verdicts_match_full_tencrop(models):
    """The daemon with model.cascade on: every verdict's decision is full TenCrop's on the val images."""
    from nexedge.serve.client import CameraClient

    path = models["host"]
    card = load_card(path)
    images, _ = _val(models["data"], card)
    images = images[:24]
    full = open_backend(path, intra_threads=1)
    thr = float(card.operating_point(1.0)["threshold"])
    want = full.infer(images[:12]).defect_score.tolist() + full.infer(images[12:]).defect_score.tolist()
    full.close()
    with _running(path, "on") as d:
        assert d.models.active.backend.name.startswith("cascade(")
        with CameraClient(d.endpoints["frames"], "cam") as cam:
            got = [cam.infer(im[..., 0]) for im in images]
    assert [g["decision"] for g in got] == ["REJECT" if s >= thr else "PASS" for s in want]


class _FailingStage2:
    def __init__(self, inner):
        self.inner = inner
        for a in ("card", "crops", "crop_mode", "max_batch", "input_shape", "name"):
            setattr(self, a, getattr(inner, a))

    def warmup(self, n=2):
        pass

    def infer(self, x):
        raise BackendError("injected stage-2 failure")

    def close(self):
        self.inner.close()


def test_daemon_answers_recheck_for_band_frames_stage2_cannot_decide(models):
    """Through the daemon's worker: band frames whose stage 2 fails get RECHECK backend_error, never
    the PASS/REJECT of stage 1; frames outside the band keep their stage-1 verdict."""
    from nexedge.serve.client import CameraClient

    path = models["host"]
    card = load_card(path)
    images, _ = _val(models["data"], card)
    images = images[:8]
    full = open_backend(path, intra_threads=1)
    s1 = full.crop_view("center").infer(images).defect_score
    lo, hi = float(np.sort(s1)[2]), float(np.sort(s1)[5])
    thr = (lo + hi) / 2
    plan = cc.CascadePlan(full.crop_view("center"), _FailingStage2(full), {"lo": lo, "hi": hi, "threshold": thr},
                          own_stage1=False)
    with _running(path, "off", backend=plan, threshold=thr) as d:
        with CameraClient(d.endpoints["frames"], "cam") as cam:
            got = [cam.infer(im[..., 0]) for im in images]
    for s, g in zip(s1, got):
        if lo <= s <= hi:
            assert (g["decision"], g["reason"]) == ("RECHECK", "backend_error")
        else:
            assert g["decision"] == ("REJECT" if s > hi else "PASS")


def test_daemon_cascade_on_without_band_fails_at_startup(tmp_path):
    from nexedge.serve import config as serve_config
    from nexedge.serve.daemon import Daemon
    from tests.support.daemon import build_tiny_onnx

    path = build_tiny_onnx(str(tmp_path))
    d = Daemon(serve_config.from_dict(_config(path, "on")))
    with pytest.raises(cc.CascadeError, match="no cascade section"):
        d.setup()
    d.close_unserved()
    with pytest.raises(serve_config.ConfigError, match="model.cascade"):
        serve_config.from_dict(_config(path, "maybe"))


def test_cascade_host_engine_uses_a_crop_view_fake_trt(tmp_path, monkeypatch, pycuda_fake):
    """TensorRT host-crop engine (fakes of tests/support/trt_fakes.py: no GPU here): stage 1 is a center-crop view
    of the same engine (closing it frees nothing), band frames go to stage 2 as one batch."""
    from tests.support.trt_fakes import DataType, fake_tensorrt
    from tests.support.trt_fakes import fake_engine_file as _engine

    drv = pycuda_fake
    calls = []

    def require(call):
        drv.require(call)
        calls.append(call)

    trt = fake_tensorrt(drv.mem, require, in_dtype=DataType.FLOAT, image_shape=(3, 32, 32), in_name="input", out_names=("logits",),
                        profile=(1, 10, 40))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    path = _engine(tmp_path, crops="host")
    be = open_backend(path)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (4, 36, 36, 1), dtype=np.uint8)
    s1 = be.crop_view("center").infer(imgs).defect_score
    lo, hi = np.sort(s1)[1], np.sort(s1)[2]  # two band frames, one final each side
    thr = float((lo + hi) / 2)
    be.card.data["operating_points"] = [{"target_tpr": 1.0, "threshold": thr}]
    be.card.data["cascade"] = {"status": "measured", "artifact_sha256": be.card.sha256, "stage1": {"file": None},
                               "bands": [{"threshold": thr, "lo": float(lo), "hi": float(hi)}]}
    plan = cc.make_plan(be, path, thr, "on")
    assert plan is not None and plan.stage1.k == 1 and plan.stage2.k == 5 and not plan.own_stage1
    n_exec = calls.count("enqueueV3")
    res = plan.infer(imgs)
    in_band = (s1 >= lo) & (s1 <= hi)
    assert in_band.sum() == 2
    assert calls.count("enqueueV3") - n_exec == 2  # stage 1 on all four, stage 2 on the two band frames
    assert ((res.stage == 2) == in_band).all()
    plan.stage1.close()  # a view: the engine's buffers stay
    assert be.infer(imgs).probs.shape == (4, 3)
    plan.close()


def test_thresholds_cli_and_bench_run_the_cascade(models, tmp_path, capsys):
    """`nexedge thresholds --cascade --cascade-margin` rewrites the band; `nexedge bench --cascade` runs the plan."""
    import shutil

    from nexedge.bench import runner
    from nexedge.card import card_path_for
    from nexedge.cli import main

    path = str(tmp_path / "m.onnx")
    shutil.copy(models["host"], path)
    shutil.copy(card_path_for(models["host"]), card_path_for(path))
    assert main(["thresholds", path, "--data", models["data"], "--cascade", "--cascade-margin", "0.25",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    sec = load_card(path).data["cascade"]
    assert "cascade (measured" in out and sec["margin_logit"] == 0.25
    assert all(b["agreement"] == 1.0 for b in sec["bands"])
    doc = runner.bench_model(path, batches=(4,), iterations=2, warmup=1, threads=1, cascade=1.0)
    row = doc["results"][-1]
    assert row["plan"].startswith("cascade(") and 0.0 <= row["stage2_fraction"] <= 1.0 and row["images"] == 8


def test_card_refuses_a_band_that_does_not_hold_its_threshold(models):
    from nexedge.card import CardError, ModelCard

    card = load_card(models["host"])
    data = dict(card.data, cascade=dict(card.data["cascade"]))
    data["cascade"]["bands"] = [dict(data["cascade"]["bands"][0], lo=0.9, threshold=0.5, hi=0.95)]
    with pytest.raises(CardError, match=r"cascade.bands\[0\].*lo <= threshold <= hi"):
        ModelCard(data).validate()
