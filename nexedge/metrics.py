"""Metrics of the report, for any class list with one negative ("good") class.

Positive = defect. Defect score = 1 - p(good). ROC via scikit-learn. FPR at
TPR >= t is the smallest FPR among ROC points with TPR >= t; its threshold is the
score threshold of that point (REJECT if score >= threshold). The one-sided 95%
Clopper-Pearson lower bound on TPR says what the number of validation defects
supports.

numpy at import; scikit-learn and scipy inside the functions that need them.
"""

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

DEFAULT_TPRS = (0.991, 0.993, 0.995, 0.997, 1.0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def clopper_pearson_lower(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound on a proportion with ``k`` successes of ``n``."""
    from scipy.stats import beta

    if n <= 0:
        return float("nan")
    if k < 0 or k > n:
        raise ValueError(f"successes {k} outside [0, {n}]")
    if k == 0:
        return 0.0
    return float(beta.ppf(1.0 - confidence, k, n - k + 1))


def _check_binary(y_defect: np.ndarray, scores: np.ndarray) -> None:
    if y_defect.shape != scores.shape or y_defect.ndim != 1:
        raise ValueError(f"labels {y_defect.shape} and scores {scores.shape} must be equal 1-D shapes")


def roc_auc(y_defect: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC (NaN when only one of good/defect is present)."""
    from sklearn.metrics import roc_auc_score

    y, s = np.asarray(y_defect, dtype=int), np.asarray(scores, dtype=float)
    _check_binary(y, s)
    if y.min(initial=0) == y.max(initial=0):
        return float("nan")
    return float(roc_auc_score(y, s))


def operating_point(y_defect: Sequence[int], scores: Sequence[float], target_tpr: float) -> Dict[str, Any]:
    """Threshold with TPR >= target and the smallest FPR, plus the TPR lower bound."""
    from sklearn.metrics import roc_curve

    y, s = np.asarray(y_defect, dtype=int), np.asarray(scores, dtype=float)
    _check_binary(y, s)
    n_def, n_good = int(y.sum()), int((y == 0).sum())
    if n_def == 0 or n_good == 0:
        raise ValueError(f"need both good and defect samples for an operating point (good {n_good}, defect {n_def})")
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    ok = np.flatnonzero((tpr >= target_tpr - 1e-12) & np.isfinite(thr))
    i = int(ok[np.argmin(fpr[ok])])  # first (highest-threshold) point of the smallest FPR
    k = int(round(tpr[i] * n_def))
    return {
        "target_tpr": float(target_tpr),
        "threshold": float(thr[i]),
        "tpr": float(tpr[i]),
        "fpr": float(fpr[i]),
        "tpr_lower95": clopper_pearson_lower(k, n_def),
        "n_defects": n_def,
        "n_good": n_good,
    }


def class_aucs(labels: Sequence[int], scores: Sequence[float], classes: Sequence[str],
               good_index: int) -> Dict[str, Dict[str, Any]]:
    """Per defect class: n and the AUC of good vs that class alone (NaN without both)."""
    y, s = np.asarray(labels, dtype=int), np.asarray(scores, dtype=float)
    good = y == good_index
    out: Dict[str, Dict[str, Any]] = {}
    for c, name in enumerate(classes):
        if c == good_index:
            continue
        mk = good | (y == c)
        out[name] = {"n": int((y == c).sum()), "auc": roc_auc((y[mk] == c).astype(int), s[mk])}
    return out


def operating_points(
    y_defect: Sequence[int], scores: Sequence[float], tprs: Sequence[float] = DEFAULT_TPRS
) -> List[Dict[str, Any]]:
    return [operating_point(y_defect, scores, t) for t in tprs]


def fpr_at_tprs(y_defect: Sequence[int], scores: Sequence[float], tprs: Sequence[float] = DEFAULT_TPRS) -> Dict[str, float]:
    """{"99.1": fpr, ...} (NaN where good or defect samples are missing)."""
    y = np.asarray(y_defect, dtype=int)
    if y.sum() == 0 or (y == 0).sum() == 0:
        return {tpr_key(t): float("nan") for t in tprs}
    return {tpr_key(op["target_tpr"]): op["fpr"] for op in operating_points(y, scores, tprs)}


def tpr_key(t: float) -> str:
    """0.991 -> "99.1", 1.0 -> "100"."""
    return f"{t * 100:.1f}".rstrip("0").rstrip(".")


def score_histogram(y_defect: Sequence[int], scores: Sequence[float], bins: int = 20) -> Dict[str, List]:
    """Counts of good and defect scores on ``bins`` equal bins of [0, 1] (card ``val_scores``)."""
    y, s = np.asarray(y_defect, dtype=int), np.clip(np.asarray(scores, dtype=float), 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, bins + 1)
    good, _ = np.histogram(s[y == 0], bins=edges)
    defect, _ = np.histogram(s[y == 1], bins=edges)
    return {"edges": [round(float(e), 9) for e in edges], "good": good.tolist(), "defect": defect.tolist()}


def binary_terms(logits: np.ndarray, good_index: int) -> Dict[str, np.ndarray]:
    """Per-sample log p(good), log p(defect) (log-sum-exp of the defect logits) and defect score."""
    lp = log_softmax(np.asarray(logits, dtype=np.float64))
    log_good = lp[:, good_index]
    others = np.delete(lp, good_index, axis=1)
    m = others.max(axis=1, keepdims=True)
    log_def = (m + np.log(np.exp(others - m).sum(axis=1, keepdims=True)))[:, 0]
    return {"log_good": log_good, "log_defect": log_def, "score": np.exp(log_def)}


def classification_report(
    logits: np.ndarray,
    labels: Sequence[int],
    classes: Sequence[str],
    good_index: int,
    tprs: Sequence[float] = DEFAULT_TPRS,
) -> Dict[str, Any]:
    """Per-class accuracy, CE loss, margin (logit of the given class minus the largest
    other), binary accuracy and loss; overall of each; AUC and FPR at the TPR list."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if z.ndim != 2 or z.shape[0] != y.shape[0] or z.shape[1] != len(classes):
        raise ValueError(f"logits {z.shape} do not match {y.shape[0]} labels and {len(classes)} classes")
    n = len(y)
    lp = log_softmax(z)
    rows = np.arange(n)
    ce = -lp[rows, y]
    correct = (z.argmax(axis=1) == y).astype(float)
    other = z.copy()
    other[rows, y] = -np.inf
    margin = z[rows, y] - other.max(axis=1)
    b = binary_terms(z, good_index)
    y_def = (y != good_index).astype(int)
    bin_loss = -np.where(y_def == 1, b["log_defect"], b["log_good"])
    bin_correct = ((b["score"] > 0.5).astype(int) == y_def).astype(float)

    def mean(a: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
        a = a if mask is None else a[mask]
        return float(a.mean()) if a.size else float("nan")

    per_class: Dict[str, Dict[str, float]] = {}
    for c, name in enumerate(classes):
        mk = y == c
        per_class[name] = {
            "n": int(mk.sum()),
            "acc": mean(correct, mk),
            "loss": mean(ce, mk),
            "margin": mean(margin, mk),
            "bin_acc": mean(bin_correct, mk),
            "bin_loss": mean(bin_loss, mk),
        }
    return {
        "n": n,
        "acc": mean(correct),
        "loss": mean(ce),
        "margin": mean(margin),
        "bin_acc": mean(bin_correct),
        "bin_loss": mean(bin_loss),
        "auc": roc_auc(y_def, b["score"]) if n else float("nan"),
        "fpr_at_tpr": fpr_at_tprs(y_def, b["score"], tprs) if n else {},
        "per_class": per_class,
    }


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and population std ignoring NaN (NaN when all are NaN)."""
    a = np.asarray([v for v in values if not (isinstance(v, float) and math.isnan(v))], dtype=float)
    if a.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std()), "n": int(a.size)}
