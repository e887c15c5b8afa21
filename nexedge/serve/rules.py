"""The statistics behind automatic promotion and automatic rollback (docs/lifecycle.md).

* Promotion (:func:`promotion_verdict`): the two error directions are judged
  apart. A candidate PASSing what the active model REJECTs (``REJECT/PASS``,
  an escape) is bounded by the one-sided Clopper-Pearson upper bound on its
  share of the active model's REJECTs; with no REJECT seen, or with every one
  of them PASSed, that bound is 1 and the candidate is never promoted. The
  other direction (``PASS/REJECT``, yield) is bounded with all disagreements
  by ``max_disagreement``.
* Rollback (:class:`RollbackChart`): the promoted model's cumulative reject
  count, checked every ``every`` frames for ``watch`` frames, against the
  *predictive* distribution of that count given the previous model's last
  ``baseline`` frames (beta-binomial with a Jeffreys prior, so the baseline's
  own estimation error is in it), both tails, each check at level
  ``alpha / (2 * checks)`` (Bonferroni over the checks watched): an equally
  good model is rolled back with probability at most about ``alpha`` per
  promotion, and a model rejecting nothing is caught once the lower limit
  can fire (the chart says from which frame on).

Exact arithmetic with numpy and ``math.lgamma`` (no scipy on a line install).
Python 3.8, no torch.
"""

import collections
import functools
import math
import threading
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple

import numpy as np

from nexedge.metrics import beta_ppf

#: Confidence of the escape bound used by automatic promotion.
PROMOTE_CONFIDENCE = 0.95
DECISIONS = ("PASS", "REJECT")


@functools.lru_cache(maxsize=4096)
def cp_upper(k: int, n: int, confidence: float = PROMOTE_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on a proportion with ``k`` events in ``n`` trials (1.0
    when ``n`` is 0 or ``k`` is ``n``)."""
    if n <= 0 or k >= n:
        return 1.0
    if k < 0:
        raise ValueError(f"event count {k} outside [0, {n}]")
    if k == 0:
        return float(1.0 - (1.0 - confidence) ** (1.0 / n))
    return float(beta_ppf(confidence, k + 1, n - k))


def rejects_needed(max_escape: float, confidence: float = PROMOTE_CONFIDENCE) -> int:
    """Active-model REJECTs a candidate must see, none of them PASSed, before the escape bound can
    reach ``max_escape``."""
    if not 0.0 < max_escape < 1.0:
        raise ValueError(f"max_escape {max_escape} must be in (0, 1)")
    return int(math.ceil(math.log(1.0 - confidence) / math.log1p(-max_escape)))


def promotion_verdict(matrix: Mapping[Tuple[str, str], int], min_frames: int, max_disagreement: float,
                      max_escape: float, confidence: float = PROMOTE_CONFIDENCE) -> Tuple[bool, str]:
    """(promote?, why) for a shadow agreement ``matrix`` {(active, candidate): frames}."""
    pp, pr = int(matrix.get(("PASS", "PASS"), 0)), int(matrix.get(("PASS", "REJECT"), 0))
    rp, rr = int(matrix.get(("REJECT", "PASS"), 0)), int(matrix.get(("REJECT", "REJECT"), 0))
    n = pp + pr + rp + rr
    if min_frames <= 0:
        return False, "automatic promotion is off (lifecycle.auto_promote_frames 0)"
    if n < min_frames:
        return False, f"{n} shadow frames, fewer than lifecycle.auto_promote_frames {min_frames}"
    rejects = rp + rr
    limit = f"lifecycle.auto_promote_max_escape {max_escape}"
    if rejects == 0:
        return False, (f"the active model REJECTed none of the {n} shadow frames, so nothing shows that the candidate "
                       f"catches what it rejects (it needs at least {rejects_needed(max_escape, confidence)} active "
                       f"REJECTs, none PASSed by the candidate, for {limit})")
    if rp / rejects > max_escape:  # the bound is at least the observed share
        return False, (f"the candidate PASSed {rp} of the {rejects} frames the active model REJECTed "
                       f"({rp / rejects:.4f}), over {limit}")
    upper = cp_upper(rp, rejects, confidence)
    escape = (f"the candidate PASSed {rp} of the {rejects} frames the active model REJECTed (upper "
              f"{100 * confidence:g} % bound {upper:.4f})")
    if upper > max_escape:
        more = f"; it needs at least {rejects_needed(max_escape, confidence)} active REJECTs" if rp == 0 else ""
        return False, f"{escape} > {limit}{more}"
    rate = (pr + rp) / n
    if rate > max_disagreement:
        return False, (f"disagreement {rate:.4f} ({pr} PASS/REJECT, {rp} REJECT/PASS of {n}) > "
                       f"lifecycle.auto_promote_max_disagreement {max_disagreement}")
    return True, (f"{n} shadow frames: {escape} <= {limit}; disagreement {rate:.4f} <= "
                  f"lifecycle.auto_promote_max_disagreement {max_disagreement}")


def _lbeta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def predictive_pmf(x: int, k: int, t: int, upto: Optional[int] = None) -> np.ndarray:
    """P(S = 0..upto) for S, the rejects among ``t`` new frames, given ``x`` rejects in ``k`` baseline
    frames: beta-binomial(t, x + 1/2, k - x + 1/2), the Jeffreys-prior predictive."""
    a, b = x + 0.5, k - x + 0.5
    upto = t if upto is None else min(int(upto), t)
    y = np.arange(upto, dtype=np.float64)
    steps = np.log(t - y) - np.log(y + 1.0) + np.log(a + y) - np.log(b + t - y - 1.0)
    log0 = _lbeta(a, b + t) - _lbeta(a, b)
    return np.exp(log0 + np.concatenate(([0.0], np.cumsum(steps))))


def predictive_limits(x: int, k: int, t: int, alpha_tail: float) -> Tuple[int, int]:
    """(lo, hi): ``t`` new frames with S <= lo or S >= hi rejects are outside the predictive
    distribution at ``alpha_tail`` per tail. lo is -1 when even 0 rejects is not (the lower limit
    cannot fire yet); hi is t + 1 when even t rejects is not."""
    a, b = x + 0.5, k - x + 0.5
    mean = t * a / (a + b)
    sd = math.sqrt(max(t * a * b * (a + b + t) / ((a + b) ** 2 * (a + b + 1.0)), 1.0))
    upto = int(mean + 40.0 * sd + 50)
    while True:
        pmf = predictive_pmf(x, k, t, upto)
        rest = max(0.0, 1.0 - float(pmf.sum()))  # mass above upto
        if upto >= t or rest < 1e-3 * alpha_tail:
            break
        upto *= 2
    cdf = np.cumsum(pmf)
    lo = int(np.searchsorted(cdf, alpha_tail, side="right")) - 1
    sf = np.cumsum(pmf[::-1])[::-1] + rest  # P(S >= y)
    over = np.flatnonzero(sf <= alpha_tail)
    hi = int(over[0]) if over.size else len(pmf)
    return lo, min(hi, t + 1)


def p_zero(x: int, k: int, t: int) -> float:
    """Predictive P(S = 0): no reject in ``t`` new frames given ``x`` in ``k`` baseline frames."""
    a, b = x + 0.5, k - x + 0.5
    return math.exp(_lbeta(a, b + t) - _lbeta(a, b))


class RollbackChart:
    """Automatic rollback test of one promoted model against the model it replaced.

    ``observe(slot, rejects)`` is fed each batch with the model that decided it. The last
    ``baseline`` decisions of one model are kept (a change of model starts them afresh); ``arm``
    at a model change takes the outgoing model's and names the incoming one; only that model's
    decisions are judged (each check's limits computed when it is reached), and a hit names it."""

    def __init__(self, baseline: int, every: int, watch: int, alpha: float) -> None:
        self.baseline, self.every, self.watch, self.alpha = int(baseline), int(every), int(watch), float(alpha)
        self.recent: Deque[bool] = collections.deque(maxlen=max(self.baseline, 1))
        self._recent_rejects = 0
        self._owner: Any = None  # the slot whose decisions are in ``recent``
        self.armed: Optional[Dict[str, Any]] = None
        self.target: Any = None  # the slot the armed chart judges ...
        self.fallback: Any = None  # ... and the one a hit rolls back to
        self._lock = threading.Lock()
        self._base = (0, 1)
        self._n = self._rejects = 0

    @property
    def checks(self) -> int:
        return max(self.watch // max(self.every, 1), 1)

    @property
    def tail(self) -> float:
        """Level of each tail at each check (Bonferroni over both tails and all checks)."""
        return self.alpha / (2 * self.checks)

    def baseline_of(self, slot: Any) -> Optional[Tuple[int, int]]:
        """(rejects, frames) of ``slot``'s last ``baseline`` decisions; None when fewer were seen."""
        with self._lock:
            if self.baseline <= 0 or slot is None or self._owner is not slot or len(self.recent) < self.baseline:
                return None
            return self._recent_rejects, len(self.recent)

    def limits(self, x: int, k: int) -> Tuple[List[int], List[int]]:
        """Every check's limits at once (benchmarks, tests): at check j (after (j + 1) * every frames)
        the chart fires when the cumulative rejects are <= lo[j] or >= hi[j]."""
        lims = [predictive_limits(x, k, (j + 1) * self.every, self.tail) for j in range(self.checks)]
        return [lo for lo, _ in lims], [hi for _, hi in lims]

    def lower_fires_from(self, x: int, k: int) -> Optional[int]:
        """The first check (frames after the change) at which 0 rejects is outside the limits; None when
        no check within the watch can tell a model that rejects nothing from chance."""
        if p_zero(x, k, self.checks * self.every) > self.tail:
            return None
        lo, hi = 1, self.checks  # P(S = 0) falls with t: the first check where it is <= tail
        while lo < hi:
            mid = (lo + hi) // 2
            if p_zero(x, k, mid * self.every) <= self.tail:
                hi = mid
            else:
                lo = mid + 1
        return lo * self.every

    def arm(self, outgoing: Any, incoming: Any, model_id: str,
            base: Optional[Tuple[int, int]] = None) -> Optional[Dict[str, Any]]:
        """Watch ``incoming`` against ``outgoing``'s baseline (``base``: its (rejects, frames), else read
        now); None (disarmed) when there is too little baseline."""
        self.disarm()
        base = base if base is not None else self.baseline_of(outgoing)
        if base is None:
            return None
        x, k = base
        watch = self.checks * self.every
        first_hi = predictive_limits(x, k, self.every, self.tail)[1]
        last = predictive_limits(x, k, watch, self.tail)
        armed = {"model_id": model_id, "p": x / k, "baseline_rejects": x, "baseline": k, "alpha": self.alpha,
                 "every": self.every, "watch": watch, "checks": self.checks, "first_upper": first_hi,
                 "lower_fires_from": self.lower_fires_from(x, k), "last_limits": list(last)}
        with self._lock:
            self._base, self.target, self.fallback, self.armed = (x, k), incoming, outgoing, armed
            self._n = self._rejects = 0
        return dict(armed)

    def disarm(self) -> None:
        with self._lock:
            self._clear()

    def observe(self, slot: Any, rejects: List[bool]) -> Optional[Dict[str, Any]]:
        """Decisions of one batch by ``slot``; the hit (counts, limits, ``slot`` the model judged and
        ``fallback`` the one to roll back to) when the chart fires. Disarms itself on a hit and at
        the end of the watch."""
        with self._lock:
            return self._observe(slot, rejects)

    def _observe(self, slot: Any, rejects: List[bool]) -> Optional[Dict[str, Any]]:
        if slot is not self._owner:
            self.recent.clear()
            self._recent_rejects, self._owner = 0, slot
        hit = None
        for r in rejects:
            if len(self.recent) == self.recent.maxlen:
                self._recent_rejects -= int(self.recent[0])
            self.recent.append(bool(r))
            self._recent_rejects += int(r)
            if self.armed is None or slot is not self.target:
                continue
            self._n += 1
            self._rejects += int(r)
            if self._n % self.every:
                continue
            lo, hi = predictive_limits(self._base[0], self._base[1], self._n, self.tail)
            if self._rejects <= lo or self._rejects >= hi:
                hit = dict(self.armed, rejects=self._rejects, frames=self._n, lo=lo, hi=hi, slot=self.target,
                           fallback=self.fallback)
                self._clear()
            elif self._n >= self.checks * self.every:
                self._clear()  # watched long enough: the promotion stands
        return hit

    def _clear(self) -> None:
        self.armed, self.target, self.fallback = None, None, None
        self._n = self._rejects = 0
