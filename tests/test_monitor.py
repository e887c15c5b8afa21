"""Shift monitor on controlled score/statistic streams (the synthetic-image test is further down)."""

import numpy as np
import pytest

from nexedge.serve.monitor import DEFAULT_LIMITS, ShiftMonitor, psi

EDGES = list(np.linspace(0.0, 1.0, 21))


def _card(good_scores, defect_scores, stats=None):
    good, _ = np.histogram(good_scores, bins=EDGES)
    defect, _ = np.histogram(defect_scores, bins=EDGES)
    return {
        "val_scores": {"edges": EDGES, "good": good.tolist(), "defect": defect.tolist()},
        "image_stats": stats
        or {"brightness": {"mean": 0.5, "std": 0.05}, "contrast": {"mean": 0.2, "std": 0.02},
            "sharpness": {"mean": 0.01, "std": 0.002}},
    }


def _stream(rng, n, p_defect=0.1, shift=0.0, bright=0.5):
    for _ in range(n):
        d = rng.random() < p_defect
        s = float(np.clip(rng.beta(8, 2) if d else rng.beta(1.2, 12) + shift, 0, 1))
        st = (rng.normal(bright, 0.05), rng.normal(0.2, 0.02), rng.normal(0.01, 0.002))
        yield s, ("REJECT" if s >= 0.5 else "PASS"), abs(s - 0.5) < 0.1, st


def _ref(rng, n=4000, p_defect=0.1):
    nd = int(n * p_defect)
    return rng.beta(1.2, 12, n - nd), rng.beta(8, 2, nd)


def test_psi_is_zero_for_same_and_large_for_shifted():
    a = np.array([100, 200, 300, 400])
    assert psi(a, a) == pytest.approx(0.0, abs=1e-12)
    assert psi(a[::-1], a) > 0.5


def test_in_distribution_stream_raises_nothing():
    rng = np.random.default_rng(0)
    mon = ShiftMonitor(_card(*_ref(rng)), window=300)
    alarms = []
    for s, dec, unc, st in _stream(rng, 3000):
        alarms += mon.observe("cam0", s, dec, unc, st)
    assert alarms == []
    snap = mon.snapshot()["cam0"]
    assert snap["frames"] == 3000 and snap["window"] == 300 and snap["alarms"] == []
    assert snap["values"]["psi"] < 0.1
    assert mon.audit_rate("cam0", 0.001) == 0.001


def test_score_shift_raises_psi_within_a_window_and_clears_after():
    rng = np.random.default_rng(1)
    mon = ShiftMonitor(_card(*_ref(rng)), window=300, limits={"uncertain_frac": None})
    for s, dec, unc, st in _stream(rng, 600):
        assert mon.observe("cam0", s, dec, unc, st) == []
    first = None
    for i, (s, dec, unc, st) in enumerate(_stream(rng, 600, shift=0.3)):
        if "psi" in mon.observe("cam0", s, dec, unc, st) and first is None:
            first = i
    assert first is not None and first < 300
    assert "psi" in mon.alarms("cam0")
    assert mon.audit_rate("cam0", 0.001) == pytest.approx(0.05)
    assert mon.snapshot()["cam0"]["raised_total"]["psi"] == 1
    for s, dec, unc, st in _stream(rng, 900):
        mon.observe("cam0", s, dec, unc, st)
    assert "psi" not in mon.alarms("cam0")  # hysteresis lets it clear once the window is back


def test_brightness_shift_raises_only_that_camera():
    rng = np.random.default_rng(2)
    mon = ShiftMonitor(_card(*_ref(rng)), window=200, min_frames=50)
    raised = {"a": [], "b": []}
    for (s, dec, unc, st), (s2, dec2, unc2, st2) in zip(_stream(rng, 400, bright=0.6), _stream(rng, 400)):
        raised["a"] += mon.observe("a", s, dec, unc, st)
        raised["b"] += mon.observe("b", s2, dec2, unc2, st2)
    assert raised["a"] == ["brightness"] and raised["b"] == []
    assert mon.snapshot()["a"]["values"]["brightness"] == pytest.approx(2.0, abs=0.3)


def test_missing_references_switch_statistics_off():
    mon = ShiftMonitor({}, window=20, min_frames=10, limits={"reject_rate": 0.5})
    out = []
    for _ in range(30):
        out += mon.observe("c", 0.9, "REJECT", False, (0.1, 0.1, 0.1))
    assert out == ["reject_rate"]
    v = mon.snapshot()["c"]["values"]
    assert v["psi"] is None and v["brightness"] is None and v["reject_rate"] == 1.0


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="unknown shift limit"):
        ShiftMonitor({}, limits={"psy": 0.2})
    with pytest.raises(ValueError, match="positive"):
        ShiftMonitor({}, limits={"psi": -1})
    with pytest.raises(ValueError, match="window"):
        ShiftMonitor({}, window=5)
    with pytest.raises(ValueError, match="image_stats"):
        ShiftMonitor({"image_stats": {"brightness": {"mean": 0.5, "std": 0.1}}})
    assert set(DEFAULT_LIMITS) >= {"psi", "brightness", "reject_rate", "uncertain_frac", "mean_score"}


def _synthetic(batch, n, seed, size=72):
    """Prepared frames of a synthetic production batch (class mix of the batch) and their image stats."""
    from nexedge.data.spec import default_weights
    from nexedge.data.synth import render_image
    from nexedge.preprocess import image_stats, prepare

    w = default_weights(batch)
    names = sorted(w)
    p = np.array([w[c] for c in names])
    rng = np.random.default_rng([seed, batch])
    out = []
    for i, c in enumerate(rng.choice(names, size=n, p=p / p.sum())):
        img, _ = render_image(str(c), (seed, batch, i), batch=batch)
        out.append((str(c), image_stats(prepare(img, {"color": "gray", "resize": [size, size]}))))
    return out


def test_batch3_after_batch2_raises_within_40_frames_batch2_alone_does_not():
    """Synthetic images (nexedge.data): batch 3 has different optics and camera. No trained model
    here, so scores are a fixed class-conditional stand-in (identical for both batches): the alarm
    has to come from the image statistics, checked against a reference of 80 separate batch-2 images."""
    ref = _synthetic(2, 80, seed=100)
    stats = np.array([s for _, s in ref])
    rng = np.random.default_rng(5)
    card = _card(*_ref(rng))
    card["image_stats"] = {n: {"mean": float(stats[:, j].mean()), "std": float(stats[:, j].std())}
                           for j, n in enumerate(("brightness", "contrast", "sharpness"))}
    b2, b3 = _synthetic(2, 120, seed=1), _synthetic(3, 60, seed=1)

    def feed(frames):
        mon = ShiftMonitor(card, window=60, min_frames=30)
        first = None
        for i, (cls, st) in enumerate(frames):
            s = float(rng.beta(1.2, 12) if cls == "good" else rng.beta(8, 2))
            if mon.observe("cam", s, "REJECT" if s >= 0.5 else "PASS", False, st) and first is None:
                first = i
        return first

    assert feed(b2) is None  # batch 2 alone, 120 frames: no alarm
    first = feed(b2[:60] + b3)
    assert first is not None and 60 <= first < 60 + 40


# -- issue 30 item 7: log-odds bins, a defect prior fitted to the line -----------------------------


def _logit_scores(rng, n, p_defect, good_shift=0.0):
    d = rng.random(n) < p_defect
    z = np.where(d, rng.normal(3.0, 2.0, n), rng.normal(-6.0 + good_shift, 1.5, n))
    return 1.0 / (1.0 + np.exp(-z))


def _trained_card(rng, n_good=300, n_defect=150):
    """A card's val_scores as training writes them (nexedge.metrics.score_histogram): a third defects."""
    from nexedge.metrics import score_histogram

    s = np.concatenate([_logit_scores(rng, n_good, 0.0), _logit_scores(rng, n_defect, 1.0)])
    return {"val_scores": score_histogram(np.r_[np.zeros(n_good, int), np.ones(n_defect, int)], s)}


def _feed(mon, scores, camera="cam"):
    first = None
    for i, s in enumerate(scores):
        if "psi" in mon.observe(camera, float(s), "REJECT" if s >= 0.04 else "PASS", False) and first is None:
            first = i
    return first


def test_a_line_at_1_percent_defects_does_not_alarm_against_a_validation_mix_of_a_third():
    """With the validation mix as the reference (40 % defects) and a line at 1 %, PSI minus chance had a
    median of 1.51 and never cleared. The prior is now fitted to the line's own frames."""
    rng = np.random.default_rng(11)
    mon = ShiftMonitor(_trained_card(rng), window=500)
    assert _feed(mon, _logit_scores(rng, 4000, 0.01)) is None
    v = mon.snapshot()["cam"]["values"]
    assert v["psi"] < 0.05 and 0.003 < v["defect_prior"] < 0.03, v


def test_log_odds_bins_see_a_drift_that_doubles_overkill():
    """With the right prior only 2 of 20 equal bins on [0, 1] held data and a drift that doubled overkill
    gave PSI 0.057: no alarm. In log-odds bins it is found within a few windows (bench_shift_scores.py
    measures how fast, and the false-alarm rate)."""
    shift = 0.41  # log-odds: 2 % of good parts over a threshold that passed 1 % (N(-6, 1.5))
    rng = np.random.default_rng(12)
    card = _trained_card(rng)
    mon = ShiftMonitor(card, window=500, defect_prior=0.01)
    steady = _feed(mon, _logit_scores(rng, 1500, 0.01))
    first = _feed(mon, _logit_scores(rng, 3000, 0.01, good_shift=shift))
    assert steady is None and first is not None, mon.snapshot()["cam"]["values"]
    old = dict(card["val_scores"])
    old.pop("logit")  # the same card without log-odds bins: PSI on [0, 1] does not see it
    mon = ShiftMonitor({"val_scores": old}, window=500, defect_prior=0.01)
    _feed(mon, _logit_scores(rng, 1500, 0.01))
    assert _feed(mon, _logit_scores(rng, 3000, 0.01, good_shift=shift)) is None


def test_defect_prior_is_a_rate_or_estimate_and_logit_counts_must_match():
    from nexedge.card import CardError, ModelCard
    from nexedge.serve import config as serve_config

    with pytest.raises(ValueError, match="defect_prior"):
        ShiftMonitor({}, defect_prior=1.5)
    for bad in ("often", 2, -0.1):
        with pytest.raises(serve_config.ConfigError, match="monitor.defect_prior"):
            serve_config.from_dict({"model": {"path": "m.onnx"}, "monitor": {"defect_prior": bad}})
    assert serve_config.monitor_prior(serve_config.from_dict({"model": {"path": "m.onnx"}, "monitor": {}}).monitor) == "estimate"
    assert serve_config.monitor_prior(serve_config.from_dict({"model": {"path": "m.onnx"}, "monitor": {"defect_prior": 0.01}})
                           .monitor) == 0.01
    card = ModelCard.new(["good", "bad"], resize=(8, 8), crop=(8, 8), crop_mode="center", color="gray", kind="onnx")
    card.data["val_scores"] = _trained_card(np.random.default_rng(0), 30, 10)["val_scores"]
    card.validate()
    card.data["val_scores"]["logit"]["good"][0] += 1
    with pytest.raises(CardError, match="val_scores.logit"):
        card.validate()
