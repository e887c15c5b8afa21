"""Metrics against hand-checked small cases."""

import math

import numpy as np
import pytest

from nexedge import metrics

# good scores 0.1 0.2 0.3 0.4; defect scores 0.35 0.5 0.9
Y = np.array([0, 0, 0, 0, 1, 1, 1])
S = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.5, 0.9])


def test_auc_hand_checked():
    # defect 0.35 beats 3 of 4 goods, 0.5 and 0.9 beat all 4: 11 / 12
    assert metrics.roc_auc(Y, S) == pytest.approx(11 / 12)
    assert math.isnan(metrics.roc_auc([0, 0], [0.1, 0.2]))


def test_operating_points_hand_checked():
    op = metrics.operating_point(Y, S, 1.0)
    # halfway in log-odds between the lowest defect (0.35) and the next lower score (good 0.3)
    assert op["threshold"] == pytest.approx(metrics.expit((metrics.logit(0.35) + metrics.logit(0.3)) / 2))
    assert 0.3 < op["threshold"] < 0.35 and op["weakest_caught"] == 0.35
    assert op["fpr"] == pytest.approx(0.25)  # the good at 0.4 is rejected
    assert op["tpr"] == 1.0 and op["n_defects"] == 3 and op["n_good"] == 4
    assert op["tpr_lower95"] == pytest.approx(0.05 ** (1 / 3))  # k = n: alpha^(1/n)
    op = metrics.operating_point(Y, S, 0.6)
    assert 0.4 < op["threshold"] < 0.5 and op["fpr"] == 0.0 and op["tpr"] == pytest.approx(2 / 3)
    # REJECT if score >= threshold reproduces the operating point
    rej = S >= metrics.operating_point(Y, S, 1.0)["threshold"]
    assert rej[Y == 1].all() and rej[Y == 0].mean() == pytest.approx(0.25)


def test_fpr_at_tprs_keys():
    d = metrics.fpr_at_tprs(Y, S)
    assert list(d) == ["99.1", "99.3", "99.5", "99.7", "100"]
    assert all(v == pytest.approx(0.25) for v in d.values())
    assert all(math.isnan(v) for v in metrics.fpr_at_tprs([0, 0], [0.1, 0.2]).values())
    with pytest.raises(ValueError, match="need both good and defect"):
        metrics.operating_point([0, 0], [0.1, 0.2], 1.0)


def test_clopper_pearson():
    assert metrics.clopper_pearson_lower(10, 10) == pytest.approx(0.05 ** 0.1)
    assert metrics.clopper_pearson_lower(0, 10) == 0.0
    # 700 validation defects all found: TPR >= 99.57 % at 95 % confidence
    assert metrics.clopper_pearson_lower(700, 700) == pytest.approx(0.99573, abs=1e-5)
    lo = metrics.clopper_pearson_lower(95, 100)
    assert 0.89 < lo < 0.95
    with pytest.raises(ValueError):
        metrics.clopper_pearson_lower(11, 10)


def test_histogram():
    h = metrics.score_histogram(Y, S, bins=4)
    assert h["edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert h["good"] == [2, 2, 0, 0] and h["defect"] == [0, 1, 1, 1]


def test_classification_report_hand_checked():
    classes = ["a", "good", "b"]
    logits = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.5], [1.0, 0.0, 0.0]])
    labels = np.array([0, 1, 2, 1])
    r = metrics.classification_report(logits, labels, classes, good_index=1)
    assert r["per_class"]["a"]["acc"] == 1.0 and r["per_class"]["a"]["margin"] == pytest.approx(1.0)
    assert r["per_class"]["b"]["acc"] == 0.0 and r["per_class"]["b"]["margin"] == pytest.approx(-0.5)
    assert r["per_class"]["good"]["acc"] == 0.5
    assert r["per_class"]["good"]["margin"] == pytest.approx((3.0 + -1.0) / 2)
    assert r["acc"] == pytest.approx(0.5)
    # binary: p(defect) = p(a) + p(b); image 2 (label b) has p(good) = e / (1 + e + e^.5) < .5 -> defect: correct
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pdef = p[:, 0] + p[:, 2]
    assert r["bin_acc"] == pytest.approx(np.mean([pdef[0] > .5, pdef[1] < .5, pdef[2] > .5, pdef[3] < .5]))
    bl = -np.log([pdef[0], p[1, 1], pdef[2], p[3, 1]])
    assert r["bin_loss"] == pytest.approx(bl.mean())
    ce = -np.log(p[np.arange(4), labels])
    assert r["loss"] == pytest.approx(ce.mean())
    assert r["auc"] == pytest.approx(metrics.roc_auc([1, 0, 1, 0], pdef))


def test_binary_terms_match_direct_sum():
    z = np.random.default_rng(0).normal(size=(6, 5)) * 10
    b = metrics.binary_terms(z, 2)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(b["score"], 1 - p[:, 2], atol=1e-12)


def test_mean_std_and_keys():
    assert metrics.mean_std([0.1, 0.3, float("nan")]) == {"mean": pytest.approx(0.2), "std": pytest.approx(0.1), "n": 2}
    assert metrics.tpr_key(0.991) == "99.1" and metrics.tpr_key(1.0) == "100"


def test_threshold_strictly_below_the_weakest_caught_defect_survives_rescoring_noise():
    # The defect at 0.041926680 must still REJECT when a rescore (another batch size) moves it
    # by 1e-7 relative: the threshold sits halfway in log-odds to the next lower (good) score.
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.001, 0.01, 0.02, 0.041926680, 0.5])
    op = metrics.operating_point(y, s, 1.0)
    assert 0.02 < op["threshold"] < 0.041926680
    assert 0.041926680 * (1 - 1e-6) >= op["threshold"]
    # tiny scores keep their precision: the point lies between 1e-12 and 1e-9 in log-odds
    op = metrics.operating_point([0, 1, 1], [1e-12, 1e-9, 0.9], 1.0)
    assert op["threshold"] == pytest.approx(math.sqrt(1e-12 * 1e-9), rel=1e-3)


def test_ties_resolve_to_the_higher_tpr():
    # equal FPR at cut 0.6 and 0.5: the lower cut catches one more defect at no cost in FPR
    y = np.array([0, 0, 1, 1, 1])
    s = np.array([0.1, 0.7, 0.5, 0.6, 0.9])
    op = metrics.operating_point(y, s, 0.6)
    assert op["tpr"] == 1.0 and op["fpr"] == 0.5 and 0.1 < op["threshold"] < 0.5
    # a good and a defect on the same score: both sides of the tie are REJECTed
    op = metrics.operating_point([0, 1, 0], [0.3, 0.3, 0.1], 1.0)
    assert op["tpr"] == 1.0 and op["fpr"] == 0.5 and 0.1 < op["threshold"] < 0.3


def test_threshold_with_nothing_below_or_only_zeros_below_stays_positive_and_near():
    op = metrics.operating_point([1, 0, 1], [0.2, 0.5, 0.9], 1.0)  # the weakest defect is the lowest score
    assert 0 < op["threshold"] < 0.2 and op["threshold"] > 1e-4 and op["fpr"] == 1.0
    op = metrics.operating_point([0, 1], [0.0, 1e-20], 1.0)
    assert 0 < op["threshold"] < 1e-20
    op = metrics.operating_point([0, 1, 1], [0.3, 1.0, 1.0], 1.0)  # scores of exactly 1
    assert 0.3 < op["threshold"] < 1.0
    with pytest.raises(ValueError, match="target TPR"):
        metrics.operating_point(Y, S, 0.0)


def test_operating_point_reproduces_its_rates_at_its_threshold_on_random_data():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(4, 60))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = np.round(rng.random(n), int(rng.integers(1, 4)))  # rounding makes ties
        for t in metrics.DEFAULT_TPRS + (0.5,):
            if not (s[y == 1] > 0).any():
                continue
            op = metrics.operating_point(y, s, t)
            rej = s >= op["threshold"]
            assert rej[y == 1].mean() == pytest.approx(op["tpr"]) and rej[y == 0].mean() == pytest.approx(op["fpr"])
            # no cut reaches the target with a smaller FPR, nor catches more defects at the same FPR
            for c in np.unique(s[s > 0]):
                r = s >= c
                if r[y == 1].mean() >= t - 1e-12:
                    assert r[y == 0].mean() >= op["fpr"] - 1e-12
                    if r[y == 0].mean() == op["fpr"]:
                        assert r[y == 1].mean() <= op["tpr"] + 1e-12


def test_auc_and_bounds_match_sklearn_and_scipy():
    sk = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(2, 300))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = np.round(rng.random(n), int(rng.integers(1, 5)))
        assert metrics.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    for k, n in [(1, 1), (1, 2), (5, 7), (52, 53), (95, 100), (990, 1000), (1, 5000), (4999, 5000)]:
        want = 0.05 ** (1 / n) if k == n else stats.beta.ppf(0.05, k, n - k + 1)
        assert metrics.clopper_pearson_lower(k, n) == pytest.approx(want, rel=1e-9, abs=1e-12)
    for a, b, x in [(0.5, 0.5, 0.3), (3.0, 200.0, 0.01), (2000.0, 3.0, 0.999), (1.0, 1.0, 0.25)]:
        sp = pytest.importorskip("scipy.special")
        assert metrics.betainc(a, b, x) == pytest.approx(sp.betainc(a, b, x), rel=1e-10, abs=1e-14)


def test_metrics_module_imports_without_sklearn_or_scipy():
    import subprocess
    import sys

    code = ("import sys\n"
            "class B:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('sklearn', 'scipy', 'torch'):\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, B())\n"
            "from nexedge import metrics\n"
            "ops = metrics.operating_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])\n"
            "print(metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), ops[-1]['tpr_lower95'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) == pytest.approx(0.75) and float(out[1]) == pytest.approx(0.05 ** 0.5)


def test_two_logits_one_for_thresholds_one_for_decisions():
    """``logit`` is finite everywhere (thresholds and their gaps are numbers); ``logit_exact`` keeps
    0 and 1 at -inf/+inf and agrees with it inside (0, 1), for numbers and arrays alike."""
    import math

    assert metrics.logit(0.0) == pytest.approx(-744.44, abs=0.01) and math.isfinite(metrics.logit(1.0))
    assert metrics.logit_exact(0.0) == -math.inf and metrics.logit_exact(1.0) == math.inf
    assert isinstance(metrics.logit_exact(0.25), float)
    arr = metrics.logit_exact(np.array([0.0, 5e-324, 0.25, 1.0]))
    assert arr[0] == -np.inf and arr[-1] == np.inf and np.isfinite(arr[1])
    for p in (5e-324, 1e-9, 0.25, 0.5, 1 - 1e-9):
        assert metrics.logit_exact(p) == pytest.approx(metrics.logit(p), rel=1e-12)
        assert metrics.logit_exact(np.float64(p)) == pytest.approx(float(metrics.logit_exact(np.array([p]))[0]),
                                                                   rel=1e-15)
        assert metrics.expit(metrics.logit_exact(p)) == pytest.approx(p, rel=1e-9)


def test_delong_paired_difference_hand_checked():
    y = [1, 1, 0, 0]
    d = metrics.auc_difference(y, [0.9, 0.4, 0.5, 0.1], [0.9, 0.6, 0.5, 0.1])
    # AUCs 0.75 and 1; structural components give var = 0.125/2 + 0.125/2
    assert d["delta"] == pytest.approx(0.25) and d["se"] == pytest.approx(0.125 ** 0.5)
    assert d["lo"] == pytest.approx(0.25 - 1.959964 * 0.125 ** 0.5, abs=1e-5)
    same = metrics.auc_difference(y, [0.9, 0.4, 0.5, 0.1], [0.9, 0.4, 0.5, 0.1])
    assert same["delta"] == 0 and same["se"] == 0
    rng = np.random.default_rng(0)
    yy = rng.integers(0, 2, 300)
    a = rng.normal(0, 1, 300) + yy
    b = a + rng.normal(0, 0.3, 300)
    d = metrics.auc_difference(yy, a, b)
    assert d["delta"] == pytest.approx(metrics.roc_auc(yy, b) - metrics.roc_auc(yy, a))
    assert d["lo"] < d["delta"] < d["hi"] and 0 < d["se"] < 0.05
