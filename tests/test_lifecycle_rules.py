"""The statistics of automatic promotion and rollback (nexedge.serve.rules), against adversarial
candidates and simulated lines at realistic reject rates (0.2-5 %). No daemon: the daemon-level
behaviour is in test_lifecycle.py."""

import numpy as np
import pytest

from nexedge.serve import rules

RATES = (0.002, 0.006, 0.02, 0.05)


def _stream_matrix(active, cand, every=64):
    """Cumulative agreement matrices after every ``every`` frames of the two decision streams."""
    a, c = np.asarray(active, bool), np.asarray(cand, bool)
    cells = {("PASS", "PASS"): ~a & ~c, ("PASS", "REJECT"): ~a & c, ("REJECT", "PASS"): a & ~c,
             ("REJECT", "REJECT"): a & c}
    sums = {k: np.cumsum(v)[every - 1::every] for k, v in cells.items()}
    for i in range(len(sums[("PASS", "PASS")])):
        yield {k: int(v[i]) for k, v in sums.items()}


@pytest.mark.parametrize("rate", RATES)
def test_adversarial_candidates_are_never_promoted_and_a_twin_is(rate):
    """Checked after every 64 frames over 40,000 (sequential, as the shadow scorer checks it)."""
    rng = np.random.default_rng(int(rate * 1e4))
    n = 40_000
    active = rng.random(n) < rate
    rule = dict(min_frames=2000, max_disagreement=0.01, max_escape=0.05)
    candidates = {
        "always_pass": np.zeros(n, bool),
        "always_reject": np.ones(n, bool),
        "random_half": rng.random(n) < 0.5,
        "random_same_rate": rng.random(n) < rate,  # rejects as often as the active model, but other frames
        "misses_a_third": active & (rng.random(n) > 1 / 3),
    }
    for name, cand in candidates.items():
        for m in _stream_matrix(active, cand):
            ok, why = rules.promotion_verdict(m, **rule)
            assert not ok, (name, rate, m, why)
    promoted_at = None
    for i, m in enumerate(_stream_matrix(active, active)):
        if rules.promotion_verdict(m, **rule)[0]:
            promoted_at = (i + 1) * 64
            break
    assert promoted_at is not None
    # it needs 59 active REJECTs (none PASSed) for a 5 % bound, and at least min_frames frames
    assert int(active[:promoted_at].sum()) >= rules.rejects_needed(0.05) == 59
    assert promoted_at >= 2000


def test_the_old_rule_would_have_promoted_the_always_pass_candidate():
    """The attack of issue 29: 0.6 % rejects, 5,600 frames, a candidate scoring 0 on every frame."""
    m = {("PASS", "PASS"): 5566, ("PASS", "REJECT"): 0, ("REJECT", "PASS"): 34, ("REJECT", "REJECT"): 0}
    assert 34 / 5600 <= 0.01  # total disagreement alone lets it through
    ok, why = rules.promotion_verdict(m, min_frames=5000, max_disagreement=0.01, max_escape=0.05)
    assert not ok and "PASSed 34 of the 34" in why and "auto_promote_max_escape" in why
    ok, why = rules.promotion_verdict({("PASS", "PASS"): 6000}, 5000, 0.01, 0.05)
    assert not ok and "REJECTed none" in why  # no active REJECT seen: never promoted


def test_clopper_pearson_upper_matches_scipy():
    from scipy.stats import beta

    for k, n in ((1, 60), (3, 200), (10, 59), (0, 59), (5, 5)):
        want = 1.0 if k == n else beta.ppf(0.95, k + 1, n - k)
        assert rules.cp_upper(k, n) == pytest.approx(want, rel=1e-7)


@pytest.mark.parametrize("x,k,t,tail", [(7, 3600, 3600, 1e-4), (0, 200, 2000, 1e-3), (120, 20000, 2000, 2.5e-4),
                                        (9000, 180000, 180000, 1e-5), (2000, 2000, 200, 0.01)])
def test_predictive_limits_are_the_exact_beta_binomial_quantiles(x, k, t, tail):
    from scipy.stats import betabinom

    lo, hi = rules.predictive_limits(x, k, t, tail)
    d = betabinom(t, x + 0.5, k - x + 0.5)
    if lo >= 0:
        assert d.cdf(lo) <= tail < d.cdf(lo + 1)
    else:
        assert d.pmf(0) > tail
    if hi <= t:
        assert d.sf(hi - 1) <= tail < d.sf(hi - 2)


class _Slot:
    def __init__(self, name):
        self.model_id = name


def _feed(chart, slot, rejects, batch=8):
    for i in range(0, len(rejects), batch):
        hit = chart.observe(slot, list(rejects[i:i + batch]))
        if hit is not None:
            return hit
    return None


def test_chart_lower_limit_fires_on_a_model_that_rejects_nothing():
    """0.6 % line: with 20,000 baseline frames a model rejecting nothing is rolled back within 2,000
    frames; with the 200 frames of the old default the lower limit cannot fire, and the chart says so."""
    old, new = _Slot("old"), _Slot("new")
    chart = rules.RollbackChart(baseline=20000, every=200, watch=2000, alpha=0.01)
    rng = np.random.default_rng(1)
    _feed(chart, old, rng.random(20000) < 0.006)
    armed = chart.arm(old, new, "new")
    assert armed["lower_fires_from"] is not None and armed["lower_fires_from"] <= 2000
    lo, _ = chart.limits(armed["baseline_rejects"], armed["baseline"])
    assert armed["lower_fires_from"] == 200 * (1 + min(j for j, v in enumerate(lo) if v >= 0))
    hit = _feed(chart, new, np.zeros(2000, bool))
    assert hit is not None and hit["rejects"] == 0 and hit["lo"] >= 0 and hit["slot"] is new
    assert hit["fallback"] is old and chart.armed is None

    small = rules.RollbackChart(baseline=200, every=200, watch=2000, alpha=0.01)
    _feed(small, old, np.arange(200) < 1)  # 1 reject in 200 (0.5 %)
    assert small.arm(old, new, "new")["lower_fires_from"] is None
    assert _feed(small, new, np.zeros(2000, bool)) is None


def test_chart_upper_limit_fires_at_the_first_check_on_an_always_reject_model():
    old, new = _Slot("old"), _Slot("new")
    chart = rules.RollbackChart(baseline=3600, every=200, watch=3600, alpha=0.01)
    _feed(chart, old, np.random.default_rng(2).random(3600) < 0.02)
    chart.arm(old, new, "new")
    hit = _feed(chart, new, np.ones(400, bool))
    assert hit is not None and hit["frames"] == 200 and hit["rejects"] >= hit["hi"]


def test_chart_judges_only_its_model_and_baselines_only_one_model():
    old, new, other = _Slot("old"), _Slot("new"), _Slot("other")
    chart = rules.RollbackChart(baseline=100, every=50, watch=200, alpha=0.05)
    _feed(chart, old, np.arange(100) % 10 == 0)
    assert chart.baseline_of(old) == (10, 100)
    assert chart.arm(old, new, "new") is not None
    assert _feed(chart, other, np.ones(96, bool)) is None  # decided by another model: not judged
    assert chart.armed is not None and chart.baseline_of(other) is None  # nor a baseline of 100 frames yet
    assert chart.baseline_of(old) is None  # a change of model started the baseline afresh


def test_false_rollbacks_per_change_stay_near_alpha_with_the_baseline_error_included():
    """Equal models, short baseline (the issue's 34 % case had K = 200): 2,000 simulated changes."""
    rng = np.random.default_rng(3)
    every, watch, k, alpha, p = 200, 2000, 200, 0.05, 0.02
    chart = rules.RollbackChart(baseline=k, every=every, watch=watch, alpha=alpha)
    trials = 2000
    x = rng.binomial(k, p, trials)
    cum = np.cumsum(rng.binomial(every, p, (trials, watch // every)), axis=1)
    cache = {}
    fired = 0
    for i in range(trials):
        if x[i] not in cache:
            cache[x[i]] = chart.limits(int(x[i]), k)
        lo, hi = (np.asarray(v) for v in cache[x[i]])
        fired += bool(((cum[i] <= lo) | (cum[i] >= hi)).any())
    assert fired / trials <= alpha + 0.015  # binomial noise of 2,000 trials: sd 0.005
