"""Metrics against hand-checked small cases."""

import math

import numpy as np
import pytest

pytest.importorskip("sklearn")

from nexedge import metrics  # noqa: E402

# good scores 0.1 0.2 0.3 0.4; defect scores 0.35 0.5 0.9
Y = np.array([0, 0, 0, 0, 1, 1, 1])
S = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.5, 0.9])


def test_auc_hand_checked():
    # defect 0.35 beats 3 of 4 goods, 0.5 and 0.9 beat all 4: 11 / 12
    assert metrics.roc_auc(Y, S) == pytest.approx(11 / 12)
    assert math.isnan(metrics.roc_auc([0, 0], [0.1, 0.2]))


def test_operating_points_hand_checked():
    op = metrics.operating_point(Y, S, 1.0)
    assert op["threshold"] == pytest.approx(0.35)  # lowest defect score
    assert op["fpr"] == pytest.approx(0.25)  # the good at 0.4 is rejected
    assert op["tpr"] == 1.0 and op["n_defects"] == 3 and op["n_good"] == 4
    assert op["tpr_lower95"] == pytest.approx(0.05 ** (1 / 3))  # k = n: alpha^(1/n)
    op = metrics.operating_point(Y, S, 0.6)
    assert op["threshold"] == pytest.approx(0.5) and op["fpr"] == 0.0 and op["tpr"] == pytest.approx(2 / 3)
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
