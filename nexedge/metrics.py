"""Metrics of the report, for any class list with one negative ("good") class.

Positive = defect. Defect score = the summed probability of the defect classes,
computed by :func:`defect_score` (the one definition that the trainer, the card,
``nexedge eval``, the runtime and the exported graph share). It equals
``1 - p(good)`` but keeps its precision near 0, where ``1 - p(good)`` in float32
is exactly 0 below about 6e-8. FPR at TPR >= t is the smallest FPR among ROC
points with TPR >= t (ties resolve to the higher TPR); its threshold lies strictly
below the weakest defect it must catch, halfway in log-odds to the next lower score
(REJECT if score >= threshold), so a rescore that moves that defect by rounding noise
still REJECTs it. The one-sided 95% Clopper-Pearson lower bound on TPR says what the
number of validation defects supports.

numpy and the standard library only (no scikit-learn, scipy or torch): the daemon
and ``nexedge thresholds`` on a Jetson's line install import this module (Python 3.8).
"""

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

#: TPR targets of the report (operating points in every card), as fractions.
DEFAULT_TPRS = (0.991, 0.993, 0.995, 0.997, 1.0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def defect_score(logits: np.ndarray, good_index: int) -> np.ndarray:
    """Defect score per row of ``logits`` (N x C): the sum of the defect classes' softmax
    probabilities, ``exp(logsumexp(defect logits) - logsumexp(all logits))`` in float64.

    Never computed as ``1 - p(good)``: that difference is exactly 0 in float32 for scores
    below about 6e-8, where the TPR 100 % operating point often lies.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or not 0 <= good_index < z.shape[1] or z.shape[1] < 2:
        raise ValueError(f"logits of shape {z.shape} with good class {good_index}: expected N x C, C >= 2")
    return np.exp(_logsumexp(np.delete(z, good_index, axis=1)) - _logsumexp(z))


#: How the crops of one image become its score: ``mean`` averages the crops' logits, then
#: softmax (the report's way); ``max`` takes the crop with the highest defect score (its
#: probabilities and score), so a defect seen by one crop is not diluted by the others.
AGGREGATES = ("mean", "max")


def aggregate_crops(logits: np.ndarray, good_index: int, aggregate: str = "mean") -> Tuple[np.ndarray, np.ndarray]:
    """Per-crop logits N x K x C -> (class probabilities N x C, defect score N, float64) by
    ``aggregate`` (:data:`AGGREGATES`). With ``max`` the probabilities are those of the crop
    with the highest defect score, so the score is always the sum of their defect classes."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 3 or z.shape[1] < 1:
        raise ValueError(f"crop logits of shape {z.shape}: expected N x K x C")
    n, k, c = z.shape
    if aggregate == "mean":
        m = z.mean(axis=1)
        return np.exp(log_softmax(m)), defect_score(m, good_index)
    if aggregate == "max":
        s = defect_score(z.reshape(n * k, c), good_index).reshape(n, k)
        j = s.argmax(axis=1)
        rows = np.arange(n)
        return np.exp(log_softmax(z[rows, j])), s[rows, j]
    raise ValueError(f"unknown crop aggregate {aggregate!r}; expected one of {', '.join(AGGREGATES)}")


def defect_score_from_probs(probs: np.ndarray, good_index: int) -> np.ndarray:
    """The same score from class probabilities (outputs of in-graph-crop models): the sum
    of the defect classes' probabilities, in float64 (each one is precise near 0)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or not 0 <= good_index < p.shape[1]:
        raise ValueError(f"probabilities of shape {p.shape} with good class {good_index}: expected N x C")
    return np.delete(p, good_index, axis=1).sum(axis=1)


def _betacf(a: float, b: float, x: float, max_iter: int = 100_000) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta ({a}, {b}, {x}) did not converge")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 (scipy.special.betainc)."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of the Beta(a, b) distribution (scipy.stats.beta.ppf), by bisection."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile level {q} outside [0, 1]")
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clopper_pearson_lower(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound on a proportion with ``k`` successes of ``n``."""
    if n <= 0:
        return float("nan")
    if k < 0 or k > n:
        raise ValueError(f"successes {k} outside [0, {n}]")
    if k == 0:
        return 0.0
    alpha = 1.0 - confidence
    if k == n:
        return float(alpha ** (1.0 / n))
    return float(beta_ppf(alpha, k, n - k + 1))


def expected_escape_rate(op: Dict[str, Any]) -> Optional[float]:
    """Average chance that a new defect, drawn like the validation defects, escapes ``op``.

    A point that misses m of n validation defects puts its threshold below the (m+1)-th
    lowest defect score; a new defect exchangeable with them ranks anywhere among the n+1
    with equal chance, so it escapes with probability at most (m+1)/(n+1), whatever the
    model (it is below that only by the margin under the weakest caught defect). This is a
    mean over validation draws, not a bound for one deployed threshold: for that, read
    1 - ``tpr_lower95``. None when the point lacks ``tpr`` or ``n_defects``. A fold ensemble's
    point carries ``escape_factor`` (nexedge.export.ensemble): its rule's price for carrying the
    fold models' average to the ensemble, applied here and in :func:`escape_bound`.
    """
    n, tpr = op.get("n_defects"), op.get("tpr")
    if not n or tpr is None:
        return None
    missed = int(round((1.0 - float(tpr)) * int(n)))
    return min(1.0, _escape_factor(op) * (missed + 1) / (int(n) + 1))


def _escape_factor(op: Dict[str, Any]) -> float:
    f = op.get("escape_factor")
    if f is None:
        return 1.0
    if not float(f) >= 1.0:
        raise ValueError(f"operating point escape_factor {f!r}: expected a number >= 1")
    return float(f)


def escape_bound(op: Dict[str, Any]) -> Optional[float]:
    """What the point guarantees with 95 % confidence for its one threshold: the escape rate is at
    most ``escape_factor * (1 - tpr_lower95)`` (the factor 1 unless the card is a fold ensemble's;
    None when the point lacks the bound)."""
    lb = op.get("tpr_lower95")
    return None if lb is None else min(1.0, _escape_factor(op) * (1.0 - float(lb)))


def escape_text(op: Dict[str, Any], n_new: Optional[int] = None) -> str:
    """One phrase for logs and reports: the expected escape rate beside its 95 % bound (and, with
    ``n_new``, the escapes both mean among that many new defects)."""
    esc, bound = expected_escape_rate(op), escape_bound(op)
    if esc is None and bound is None:
        return "escape rate unknown (the operating point lacks its defect count)"
    parts = []
    if esc is not None:
        parts.append(f"expected escape rate {100 * esc:.2f} % (mean over validation draws, (missed + 1) / "
                     f"(defects + 1))")
    if bound is not None:
        parts.append(f"at most {100 * bound:.2f} % with 95 % confidence (1 - TPR lower bound)")
    text = ", ".join(parts)
    if n_new:
        text += "; in {} new defects: {} expected{}".format(
            n_new, "-" if esc is None else f"{esc * n_new:.1f}",
            "" if bound is None else f", at most {bound * n_new:.1f} at the bound")
    return text


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how surprising ``k`` escapes of ``n`` defects are when the
    escape rate is ``p`` (1 for k <= 0)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return betainc(float(k), float(n - k + 1), float(p))


def promise_check(escapes: int, n_defects: int, op: Dict[str, Any], confidence: float = 0.95
                  ) -> Optional[Dict[str, Any]]:
    """Whether ``escapes`` of ``n_defects`` new defects fit what ``op`` promises (escape rate at most
    1 - ``tpr_lower95``): ``p_value`` = P(that many or more | the promised rate), ``within`` when it is
    at least 1 - ``confidence``. None when the point has no bound or there are no defects."""
    bound = escape_bound(op)
    if bound is None or not n_defects:
        return None
    p = binomial_tail(int(escapes), int(n_defects), bound)
    return {"escapes": int(escapes), "n_defects": int(n_defects), "promised_rate": bound, "p_value": p,
            "within": bool(p >= 1.0 - confidence)}


def _check_binary(y_defect: np.ndarray, scores: np.ndarray) -> None:
    if y_defect.shape != scores.shape or y_defect.ndim != 1:
        raise ValueError(f"labels {y_defect.shape} and scores {scores.shape} must be equal 1-D shapes")


def roc_auc(y_defect: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC (NaN when only one of good/defect is present); tied scores count one half."""
    y, s = np.asarray(y_defect, dtype=int), np.asarray(scores, dtype=float)
    _check_binary(y, s)
    n_def = int(y.sum())
    n_good = y.size - n_def
    if n_def == 0 or n_good == 0:
        return float("nan")
    if np.isnan(s).any():
        raise ValueError(f"{int(np.isnan(s).sum())} scores are NaN")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank, ties share their mean rank
    rank_sum = float(mid_rank[inverse.reshape(-1)][y == 1].sum())
    return (rank_sum - n_def * (n_def + 1) / 2.0) / (n_def * n_good)


def _placements(pos: np.ndarray, neg: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: for each defect the share of good images it outscores (ties
    one half), and for each good image the share of defects that outscore it."""
    allv = np.concatenate([pos, neg])
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    mid = (np.cumsum(counts) - (counts - 1) / 2.0)[inv.reshape(-1)]  # mid-ranks in the pooled sample
    _, pinv, pcounts = np.unique(pos, return_inverse=True, return_counts=True)
    _, ninv, ncounts = np.unique(neg, return_inverse=True, return_counts=True)
    pos_rank = (np.cumsum(pcounts) - (pcounts - 1) / 2.0)[pinv.reshape(-1)]
    neg_rank = (np.cumsum(ncounts) - (ncounts - 1) / 2.0)[ninv.reshape(-1)]
    v10 = (mid[: pos.size] - pos_rank) / neg.size
    v01 = 1.0 - (mid[pos.size :] - neg_rank) / pos.size
    return v10, v01


def auc_difference(y_defect: Sequence[int], scores_a: Sequence[float], scores_b: Sequence[float],
                   confidence: float = 0.95) -> Dict[str, float]:
    """AUC(b) - AUC(a) on the same images with DeLong's paired variance (DeLong, DeLong and
    Clarke-Pearson 1988): ``delta``, its standard error ``se`` and the two-sided ``confidence``
    interval ``lo``, ``hi`` (normal approximation; NaN without both classes or with one image of
    a class)."""
    y = np.asarray(y_defect, dtype=int)
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    _check_binary(y, a)
    _check_binary(y, b)
    nan = {"delta": float("nan"), "se": float("nan"), "lo": float("nan"), "hi": float("nan")}
    m, n = int((y == 1).sum()), int((y == 0).sum())
    if m < 2 or n < 2:
        return nan
    va10, va01 = _placements(a[y == 1], a[y == 0])
    vb10, vb01 = _placements(b[y == 1], b[y == 0])
    delta = float(vb10.mean() - va10.mean())
    s10 = np.cov(np.vstack([va10, vb10]))
    s01 = np.cov(np.vstack([va01, vb01]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    se = float(math.sqrt(max(var, 0.0)))
    z = _normal_quantile(0.5 + confidence / 2.0)
    return {"delta": delta, "se": se, "lo": delta - z * se, "hi": delta + z * se}


def _normal_quantile(p: float) -> float:
    """Standard normal quantile by bisection on erf (no scipy)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def roc_curve(y_defect: Sequence[int], scores: Sequence[float]) -> Dict[str, np.ndarray]:
    """Every distinct score as a cut (REJECT if score >= cut), highest first.

    Returns ``cut``, ``tp``, ``fp`` (counts rejected at that cut), ``tpr``, ``fpr``."""
    y, s = np.asarray(y_defect, dtype=int), np.asarray(scores, dtype=float)
    _check_binary(y, s)
    uniq, inverse = np.unique(s, return_inverse=True)
    inverse = inverse.reshape(-1)
    d = np.bincount(inverse, weights=(y == 1).astype(float), minlength=uniq.size)[::-1]
    g = np.bincount(inverse, weights=(y != 1).astype(float), minlength=uniq.size)[::-1]
    tp, fp = np.cumsum(d).astype(np.int64), np.cumsum(g).astype(np.int64)
    n_def, n_good = max(int(tp[-1]) if tp.size else 0, 1), max(int(fp[-1]) if fp.size else 0, 1)
    return {"cut": uniq[::-1], "tp": tp, "fp": fp, "tpr": tp / n_def, "fpr": fp / n_good}


#: How far below the weakest caught defect a threshold may go when nothing scores lower (or
#: only exact zeros do), in log-odds: a factor of about 1e3 on the odds.
_MAX_GAP_LOGIT = math.log(1e3)


def logit(p: Any) -> Any:
    """Log-odds of probabilities, clipped to the float64 range (0 and 1 map to about -745 and 37)."""
    q = np.clip(np.asarray(p, dtype=np.float64), 5e-324, 1.0 - 2.0 ** -53)
    out = np.log(q) - np.log1p(-q)
    return float(out) if out.ndim == 0 else out


def logit_exact(p: Any) -> Any:
    """log(p / (1 - p)) in float64 without clipping: -inf at 0, +inf at 1 (a threshold near 0 or 1
    must keep its exact log-odds). A number gives a float (per-frame decisions), an array an array."""
    if isinstance(p, (int, float)):  # np.float64 is a float
        p = float(p)
        if p <= 0.0:
            return -math.inf
        if p >= 1.0:
            return math.inf
        return math.log(p) - math.log1p(-p)
    a = np.asarray(p, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(a) - np.log1p(-a)


def expit(x: Any) -> Any:
    """Inverse of :func:`logit` (numerically stable for both signs)."""
    z = np.asarray(x, dtype=np.float64)
    out = np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))
    return float(out) if out.ndim == 0 else out


def threshold_between(caught: float, below: Optional[float]) -> float:
    """A threshold strictly inside (below, caught]: halfway in log-odds, never more than
    :data:`_MAX_GAP_LOGIT` under ``caught``, never 0. ``caught`` itself when the two are
    adjacent floats."""
    lo = logit(caught) - _MAX_GAP_LOGIT
    if below is not None and below > 0.0:
        lo = max(lo, logit(below))
    t = float(expit(0.5 * (logit(caught) + lo)))
    if below is not None and not below < t:
        t = caught
    return t if 0.0 < t <= caught else caught


def operating_point(y_defect: Sequence[int], scores: Sequence[float], target_tpr: float) -> Dict[str, Any]:
    """Threshold with TPR >= target and the smallest FPR, plus the TPR lower bound.

    Among cuts of equal FPR the one catching the most defects wins (ties resolve to the
    higher TPR). The threshold lies strictly below the weakest defect the point catches,
    halfway in log-odds to the next lower score (:func:`threshold_between`), so every
    validation score keeps the side it was measured on with a margin. It is always > 0 (a
    card threshold of 0 would REJECT every device): when defects score exactly 0 the point
    with the highest reachable TPR is returned and its ``tpr`` says it falls short.
    """
    y, s = np.asarray(y_defect, dtype=int), np.asarray(scores, dtype=float)
    _check_binary(y, s)
    n_def, n_good = int(y.sum()), int((y == 0).sum())
    if n_def == 0 or n_good == 0:
        raise ValueError(f"need both good and defect samples for an operating point (good {n_good}, defect {n_def})")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are not finite")
    if not 0.0 < float(target_tpr) <= 1.0:
        raise ValueError(f"target TPR {target_tpr} outside (0, 1]")
    roc = roc_curve(y, s)
    cut, tp, fp = roc["cut"], roc["tp"], roc["fp"]
    valid = cut > 0
    if not valid.any():
        raise ValueError("every score is 0: no threshold > 0 separates anything")
    tpr = tp / n_def
    ok = np.flatnonzero(valid & (tpr >= float(target_tpr) - 1e-12))
    if ok.size == 0:  # defects at score 0: the best reachable TPR
        ok = np.flatnonzero(valid & (tpr == tpr[valid].max()))
    best_fp = fp[ok].min()
    i = int(ok[fp[ok] == best_fp].max())  # lowest cut of the smallest FPR: the most defects caught
    below = float(cut[i + 1]) if i + 1 < cut.size else None
    k = int(tp[i])
    return {
        "target_tpr": float(target_tpr),
        "threshold": threshold_between(float(cut[i]), below),
        "tpr": k / n_def,
        "fpr": int(fp[i]) / n_good,
        "tpr_lower95": clopper_pearson_lower(k, n_def),
        "n_defects": n_def,
        "n_good": n_good,
        "weakest_caught": float(cut[i]),
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


#: Default floor on an operating point's 95 % TPR lower bound below which tools warn.
DEFAULT_TPR_FLOOR = 0.95


def defects_needed(target_tpr: float, floor: float = DEFAULT_TPR_FLOOR, confidence: float = 0.95,
                   limit: int = 10_000_000) -> Optional[int]:
    """Smallest number of validation defects for which meeting ``target_tpr`` exactly gives a
    Clopper-Pearson lower bound >= ``floor`` (None when no count can: target <= floor)."""
    if not 0.0 < floor < 1.0:
        raise ValueError(f"TPR floor must be in (0, 1), got {floor}")
    if target_tpr <= floor:
        return None

    def ok(n: int) -> bool:
        k = min(n, int(math.ceil(target_tpr * n - 1e-9)))
        return clopper_pearson_lower(k, n, confidence) >= floor

    hi = 1
    while not ok(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:  # first n that passes (the bound is monotone in n up to rounding of k)
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def weak_points(ops: Sequence[Dict[str, Any]], floor: float = DEFAULT_TPR_FLOOR) -> List[Dict[str, Any]]:
    """Operating points whose TPR lower bound is below ``floor``, each with the validation
    defects its target would need (``defects_needed``) and a one-line ``message``."""
    out = []
    for op in ops:
        lb = op.get("tpr_lower95")
        if lb is None or not (isinstance(lb, (int, float)) and lb >= floor):
            need = defects_needed(float(op["target_tpr"]), floor)
            have = op.get("n_defects")
            msg = (f"operating point TPR {tpr_key(float(op['target_tpr']))} % rests on {have} validation defects: "
                   f"95 % lower bound on TPR {lb if lb is None else round(float(lb), 3)} < floor {floor}; ")
            msg += (f"about {need} defects (all detected) would support it" if need is not None
                    else "no number of defects can support a target at or below the floor")
            out.append(dict(op, floor=floor, defects_needed=need, message=msg))
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


#: Log-odds bins of the card's score histogram: [-16, 16] in steps of 0.5 (scores outside go to the end bins).
LOGIT_LIMIT, LOGIT_STEP = 16.0, 0.5


def score_histogram(y_defect: Sequence[int], scores: Sequence[float], bins: int = 20) -> Dict[str, Any]:
    """Counts of good and defect scores on ``bins`` equal bins of [0, 1] (card ``val_scores``), plus
    ``logit``: the same counts on log-odds bins (the shift monitor's reference: good parts' scores
    crowd near 0, where equal bins on [0, 1] hold nearly all of them in one bin)."""
    y, raw = np.asarray(y_defect, dtype=int), np.asarray(scores, dtype=float)
    s = np.clip(raw, 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, bins + 1)
    good, _ = np.histogram(s[y == 0], bins=edges)
    defect, _ = np.histogram(s[y == 1], bins=edges)
    with np.errstate(divide="ignore"):
        z = np.clip(np.log(s) - np.log1p(-s), -LOGIT_LIMIT, LOGIT_LIMIT)
    ledges = np.arange(-LOGIT_LIMIT, LOGIT_LIMIT + LOGIT_STEP / 2, LOGIT_STEP)
    lgood, _ = np.histogram(z[y == 0], bins=ledges)
    ldefect, _ = np.histogram(z[y == 1], bins=ledges)
    return {"edges": [round(float(e), 9) for e in edges], "good": good.tolist(), "defect": defect.tolist(),
            "logit": {"edges": [float(e) for e in ledges], "good": lgood.tolist(), "defect": ldefect.tolist()}}


def binary_terms(logits: np.ndarray, good_index: int) -> Dict[str, np.ndarray]:
    """Per-sample log p(good), log p(defect) (log-sum-exp of the defect logits) and defect score."""
    z = np.asarray(logits, dtype=np.float64)
    lp = log_softmax(z)
    log_def = _logsumexp(np.delete(lp, good_index, axis=1))
    return {"log_good": lp[:, good_index], "log_defect": log_def, "score": defect_score(z, good_index)}


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
