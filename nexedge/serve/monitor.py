"""Shift monitor: per-camera rolling statistics against the ModelCard's references.

Per camera, over the last ``window`` frames:

* ``mean_score``     mean defect score
* ``reject_rate``    fraction of REJECT decisions
* ``uncertain_frac`` fraction of frames flagged uncertain
* ``psi``            population stability index of the score histogram against
                     the card's validation scores, minus its chance level
                     (K - 1)(1/n + 1/N) for a window of n frames and N reference
                     scores, so one limit fits any window size. Scores are binned
                     in **log-odds** (the card's ``val_scores.logit``): good parts
                     score near 0, where 20 equal bins on [0, 1] put nearly all of
                     them in one bin and a drift among them is invisible. Adjacent
                     bins are merged until each holds >= ``min_bin_frac`` of the
                     reference, i.e. about quantile bins of the validation scores.
                     The reference mixes the card's good and defect histograms by
                     the line's defect rate ``defect_prior``: a number, or
                     ``"estimate"``: fitted per camera (EM on the mixture weight)
                     to its last ``prior_window`` frames, because the validation
                     mix (often 30-50 % defects) is not the line's (about 1 %) and
                     made PSI alarm for ever.
* ``brightness``, ``contrast``, ``sharpness``: shift of the window mean from the
  card's ``image_stats`` reference, in units of the reference per-image std
  (|window mean - ref mean| / ref std)

A card without ``val_scores.logit`` (made before it existed) falls back to its
bins on [0, 1], with a warning: re-measure it (``nexedge thresholds``).

At most ``max_cameras`` cameras get their own window (about 30 KB each at the
default windows); frames from further camera ids share one ``_other`` window and
are counted (:attr:`ShiftMonitor.other_frames`), so a flood of new ids cannot
grow memory or the number of metric series.

Every update is O(1) (ring buffers and running sums); the statistics are
evaluated every ``check_every`` frames once ``min_frames`` are in the window
(O(bins)). A statistic above its limit raises an alarm (logged, counted,
returned by :meth:`ShiftMonitor.observe`); it clears when the value falls under
``clear_ratio`` x limit. While a camera has an alarm, :meth:`audit_rate` returns
a raised audit-sampling rate so the store fills with the new kind of images.
False-alarm rate and detection delay are measured by benchmarks/bench_shift.py.

Python 3.8, numpy only.
"""

import logging
import math
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

STAT_NAMES = ("brightness", "contrast", "sharpness")
#: The shared window of cameras beyond ``max_cameras`` (same name as the metrics' overflow label).
OTHER = "_other"
#: Default limits; None switches a statistic off (it is still computed and exported). PSI 0.1 (above
#: its chance level, on log-odds bins): no false alarm in 200,000 in-distribution frames, a doubled
#: overkill found after about one window (benchmarks/bench_shift_scores.py). mean_score, reject_rate
#: and uncertain_frac have no reference in the card and depend on the model and the line, so they are
#: off until configured.
DEFAULT_LIMITS: Dict[str, Optional[float]] = {
    "mean_score": None,
    "reject_rate": None,
    "uncertain_frac": None,
    "psi": 0.1,
    "brightness": 1.0,
    "contrast": 1.0,
    "sharpness": 1.0,
}


class _Window:
    """Ring buffers and running sums for one camera."""

    def __init__(self, size: int, nbins: int, history: int = 0) -> None:
        self.size = size
        self.n = 0
        # the longer history of score bins the defect prior is estimated from
        self.long_bin = np.zeros(max(history, 1), np.int16)
        self.long_hist = np.zeros(max(nbins, 1), np.int64)
        self.long_n = 0
        self.long_pos = 0
        self.prior: Optional[float] = None  # the last estimate
        self.pos = 0
        self.total = 0
        self.score = np.zeros(size, np.float64)
        self.reject = np.zeros(size, np.int8)
        self.uncertain = np.zeros(size, np.int8)
        self.bin = np.zeros(size, np.int32)
        self.stats = np.zeros((size, 3), np.float64)
        self.has_stats = np.zeros(size, np.int8)
        self.hist = np.zeros(max(nbins, 1), np.int64)
        self.sum_score = 0.0
        self.sum_reject = 0
        self.sum_uncertain = 0
        self.sum_stats = np.zeros(3, np.float64)
        self.n_stats = 0
        self.active: Dict[str, float] = {}
        self.raised: Dict[str, int] = {}
        self.values: Dict[str, Optional[float]] = {}

    def push(self, score: float, reject: int, uncertain: int, b: int, stats: Optional[Sequence[float]]) -> None:
        i = self.pos
        if self.n == self.size:  # drop the oldest frame's contribution
            self.sum_score -= self.score[i]
            self.sum_reject -= int(self.reject[i])
            self.sum_uncertain -= int(self.uncertain[i])
            self.hist[self.bin[i]] -= 1
            if self.has_stats[i]:
                self.sum_stats -= self.stats[i]
                self.n_stats -= 1
        else:
            self.n += 1
        self.score[i] = score
        self.reject[i] = reject
        self.uncertain[i] = uncertain
        self.bin[i] = b
        self.hist[b] += 1
        j = self.long_pos
        if self.long_n == len(self.long_bin):
            self.long_hist[self.long_bin[j]] -= 1
        else:
            self.long_n += 1
        self.long_bin[j] = b
        self.long_hist[b] += 1
        self.long_pos = (j + 1) % len(self.long_bin)
        self.sum_score += score
        self.sum_reject += reject
        self.sum_uncertain += uncertain
        if stats is not None:
            self.stats[i] = stats
            self.has_stats[i] = 1
            self.sum_stats += self.stats[i]
            self.n_stats += 1
        else:
            self.has_stats[i] = 0
        self.pos = (i + 1) % self.size
        self.total += 1
        if self.pos == 0:  # once per window: re-sum so float drift cannot build up
            self.sum_score = float(self.score[: self.n].sum())
            m = self.has_stats[: self.n].astype(bool)
            self.sum_stats = self.stats[: self.n][m].sum(axis=0) if m.any() else np.zeros(3)


def psi(observed: np.ndarray, expected: np.ndarray, alpha: float = 0.5) -> float:
    """Population stability index sum((o - e) * ln(o / e)) of two histograms
    (counts or fractions), with ``alpha`` pseudo-counts so empty bins stay finite."""
    o = np.asarray(observed, np.float64) + alpha
    e = np.asarray(expected, np.float64)
    e = e / max(e.sum(), 1e-12) * max(float(np.sum(observed)), 1.0) + alpha
    o /= o.sum()
    e /= e.sum()
    return float(np.sum((o - e) * np.log(o / e)))


def estimate_prior(counts: np.ndarray, good: np.ndarray, defect: np.ndarray, start: float = 0.05,
                   iters: int = 200) -> float:
    """Maximum-likelihood weight p of ``defect`` in the mixture (1 - p) good + p defect that best explains
    the binned ``counts`` (EM; ``good`` and ``defect`` are bin probabilities, no zeros)."""
    h = np.asarray(counts, np.float64)
    n = h.sum()
    if n <= 0:
        return start
    p = min(max(start, 1e-4), 1 - 1e-4)
    for _ in range(iters):
        num = p * defect
        new = float(np.sum(h * num / (num + (1 - p) * good)) / n)
        if abs(new - p) < 1e-7:
            return new
        p = new
    return p


class ShiftMonitor:
    """Rolling per-camera drift statistics against a card's references.

    ``card``: a :class:`nexedge.card.ModelCard` or its ``data`` dict; uses
    ``val_scores`` {edges, good, defect, logit} and ``image_stats`` {name: {mean, std}}
    when present (statistics without a reference are switched off).
    ``limits``: overrides of :data:`DEFAULT_LIMITS` (None disables one).
    ``defect_prior``: the line's defect rate, the weight of the defect histogram in
    the PSI reference: a number in [0, 1], or ``"estimate"`` (also None) to fit it per
    camera to its last ``prior_window`` frames.
    """

    def __init__(
        self,
        card: Any,
        window: int = 500,
        limits: Optional[Mapping[str, Optional[float]]] = None,
        min_frames: int = 100,
        check_every: int = 10,
        clear_ratio: float = 0.8,
        defect_prior: Any = "estimate",
        audit_boost: float = 50.0,
        alarm_audit_rate: float = 0.05,
        min_bin_frac: float = 0.05,
        max_cameras: int = 256,
        prior_window: int = 5000,
    ) -> None:
        if window < 10:
            raise ValueError(f"shift monitor window must be >= 10 frames, got {window}")
        if not 1 <= min_frames <= window:
            raise ValueError(f"min_frames must be in [1, window={window}], got {min_frames}")
        if max_cameras < 1:
            raise ValueError(f"max_cameras must be >= 1, got {max_cameras}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        if not 0.0 < min_bin_frac <= 0.5:
            raise ValueError(f"min_bin_frac must be in (0, 0.5], got {min_bin_frac}")
        if not 0.0 < clear_ratio <= 1.0:
            raise ValueError(f"clear_ratio must be in (0, 1], got {clear_ratio}")
        if prior_window < window:
            raise ValueError(f"prior_window must be >= window={window}, got {prior_window}")
        if defect_prior is None or defect_prior == "estimate":
            defect_prior = None
        elif isinstance(defect_prior, bool) or not isinstance(defect_prior, (int, float)) \
                or not 0.0 <= defect_prior <= 1.0:
            raise ValueError(f"defect_prior must be a number in [0, 1] or 'estimate', got {defect_prior!r}")
        self.prior_window = int(prior_window)
        self.limits: Dict[str, Optional[float]] = dict(DEFAULT_LIMITS)
        for k, v in (limits or {}).items():
            if k not in DEFAULT_LIMITS:
                raise ValueError(f"unknown shift limit {k!r}; expected some of {sorted(DEFAULT_LIMITS)}")
            if v is not None and (not isinstance(v, (int, float)) or v <= 0 or math.isnan(v)):
                raise ValueError(f"shift limit {k} must be a positive number or null, got {v!r}")
            self.limits[k] = None if v is None else float(v)
        self.window = int(window)
        self.min_frames = int(min_frames)
        self.check_every = int(check_every)
        self.clear_ratio = float(clear_ratio)
        self.audit_boost = float(audit_boost)
        self.alarm_audit_rate = float(alarm_audit_rate)
        self._defect_prior, self._min_bin_frac = defect_prior, min_bin_frac
        self._set_reference(card)
        self._cams: Dict[str, _Window] = {}
        self._lock = threading.Lock()
        self.max_cameras = int(max_cameras)
        #: Frames from cameras beyond ``max_cameras`` (they share the OTHER window), and how many such ids.
        self.other_frames = 0
        self._other_ids = 0

    def _set_reference(self, card: Any) -> None:
        data = card.data if hasattr(card, "data") else dict(card)
        vs = data.get("val_scores")
        self._edges = self._good = self._defect = None
        self._space = "logit"
        self._n_ref = 0.0
        if vs:
            src = vs.get("logit")
            if src is None:
                self._space = "score"
                src = vs
                log.warning("card has no log-odds score histogram (val_scores.logit, made before it existed): PSI "
                            "uses its equal bins on [0, 1], which cannot see a drift among low scores; re-measure "
                            "it with `nexedge thresholds ARTIFACT --data ROOT`")
            self._edges, self._good, self._defect, self._n_ref = self._score_reference(src)
        else:
            log.info("card has no val_scores: PSI of the score histogram is off")
        self._stat_ref = self._image_reference(data.get("image_stats"))

    def rebase(self, card: Any) -> None:
        """Another model became active (hot swap, promotion, rollback): compare against its card's
        references from now on, with fresh windows (scores of two models do not mix in one window)."""
        with self._lock:
            self._set_reference(card)
            self._cams = {}

    def _key(self, camera: str) -> str:
        """``camera``, or :data:`OTHER` once ``max_cameras`` cameras have their own window (lock held)."""
        if camera in self._cams or len(self._cams) < self.max_cameras:
            return camera
        self.other_frames += 1
        return OTHER

    @staticmethod
    def _score_reference(vs: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(edges, good bin probabilities, defect bin probabilities, reference count) of a histogram."""
        edges = np.asarray(vs["edges"], np.float64)
        good = np.asarray(vs["good"], np.float64)
        defect = np.asarray(vs.get("defect") or np.zeros_like(good), np.float64)
        if edges.ndim != 1 or len(edges) < 3 or np.any(np.diff(edges) <= 0):
            raise ValueError(f"card val_scores.edges must be increasing with >= 2 bins, got {vs['edges']!r}")
        if good.sum() + defect.sum() <= 0:
            raise ValueError("card val_scores holds no counts; cannot be a PSI reference")
        k = len(good)
        # a little mass in every bin, so no score the line produces is impossible under the reference
        g = (good + 0.5 / k) / (good.sum() + 0.5)
        d = (defect + 0.5 / k) / (defect.sum() + 0.5)
        return edges, g, d, float(good.sum() + defect.sum())

    def _bin(self, score: float) -> int:
        if self._space == "logit":
            s = min(max(float(score), 1e-300), 1.0)
            x = math.log(s) - math.log1p(-s) if s < 1.0 else math.inf
        else:
            x = float(score)
        b = int(np.searchsorted(self._edges, x, side="right")) - 1
        return min(max(b, 0), len(self._edges) - 2)

    def _prior(self, w: "_Window") -> float:
        """The defect rate the reference mixes in: set, or estimated from the camera's history."""
        if self._defect_prior is not None:
            return float(self._defect_prior)
        w.prior = estimate_prior(w.long_hist, self._good, self._defect, w.prior if w.prior is not None else 0.05)
        return w.prior

    @staticmethod
    def _groups(ref: np.ndarray, min_frac: float) -> np.ndarray:
        """Group adjacent bins until each holds >= ``min_frac`` of ``ref`` (sparse tails would dominate PSI)."""
        frac = ref / ref.sum()
        group = np.zeros(len(frac), np.int64)
        g, acc = 0, 0.0
        for i, f in enumerate(frac):
            group[i] = g
            acc += f
            if acc >= min_frac and i < len(frac) - 1:
                g, acc = g + 1, 0.0
        if acc < min_frac and g > 0:  # a thin last group joins the one before
            group[group == g] = g - 1
        return group

    @staticmethod
    def _image_reference(st: Any) -> Optional[np.ndarray]:
        if not st:
            log.info("card has no image_stats: brightness/contrast/sharpness checks are off")
            return None
        ref = np.zeros((3, 2))
        for j, name in enumerate(STAT_NAMES):
            ent = st.get(name)
            if not ent:
                raise ValueError(f"card image_stats lacks {name!r}; expected {{mean, std}} for {STAT_NAMES}")
            ref[j] = float(ent["mean"]), max(float(ent["std"]), 1e-9)
        return ref

    # -- per frame ------------------------------------------------------------
    def observe(
        self,
        camera: str,
        score: float,
        decision: str,
        uncertain: bool,
        stats: Optional[Tuple[float, float, float]] = None,
    ) -> List[str]:
        """Add one inspected frame; return the names of alarms newly raised for ``camera``."""
        with self._lock:
            camera = self._key(camera)
            w = self._cams.get(camera)
            if w is None:
                nb = 1 if self._edges is None else len(self._edges) - 1
                w = self._cams[camera] = _Window(self.window, nb, self.prior_window if self._edges is not None
                                                 and self._defect_prior is None else 0)
            b = 0 if self._edges is None else self._bin(score)
            w.push(float(score), int(decision == "REJECT"), int(bool(uncertain)), b, stats)
            if w.n < self.min_frames or w.total % self.check_every:
                return []
            return self._check(camera, w)

    def _psi_excess(self, w: _Window) -> float:
        """PSI over the merged bins of the reference mixed at the camera's defect prior, minus what two
        samples of these sizes from one distribution give by chance, about (K - 1) * (1/n + 1/N)."""
        p = self._prior(w)
        ref = (1.0 - p) * self._good + p * self._defect
        group = self._groups(ref, self._min_bin_frac)
        k = int(group.max()) + 1
        ref_groups = np.bincount(group, weights=ref, minlength=k)
        obs = np.bincount(group, weights=w.hist, minlength=k)
        chance = (k - 1) * (1.0 / max(w.n, 1) + 1.0 / max(self._n_ref, 1.0))
        return max(psi(obs, ref_groups) - chance, 0.0)

    def _values(self, w: _Window) -> Dict[str, Optional[float]]:
        n = max(w.n, 1)
        v: Dict[str, Optional[float]] = {
            "mean_score": w.sum_score / n,
            "reject_rate": w.sum_reject / n,
            "uncertain_frac": w.sum_uncertain / n,
            "psi": None if self._edges is None else self._psi_excess(w),
            "defect_prior": None if self._edges is None else (self._defect_prior if self._defect_prior is not None
                                                               else w.prior),
        }
        for j, name in enumerate(STAT_NAMES):
            if self._stat_ref is None or w.n_stats == 0:
                v[name] = None
            else:
                mean = w.sum_stats[j] / w.n_stats
                v[name] = abs(mean - self._stat_ref[j, 0]) / self._stat_ref[j, 1]
        return v

    def _check(self, camera: str, w: _Window) -> List[str]:
        w.values = self._values(w)
        raised = []
        for name, limit in self.limits.items():
            val = w.values.get(name)
            if limit is None or val is None:
                continue
            if name not in w.active and val > limit:
                w.active[name] = val
                w.raised[name] = w.raised.get(name, 0) + 1
                raised.append(name)
                log.warning(
                    "shift alarm camera=%s stat=%s value=%.4g limit=%.4g window=%d frames",
                    camera, name, val, limit, w.n,
                )
            elif name in w.active and val < limit * self.clear_ratio:
                del w.active[name]
                log.info("shift alarm cleared camera=%s stat=%s value=%.4g limit=%.4g", camera, name, val, limit)
        return raised

    # -- queries ----------------------------------------------------------------
    def alarms(self, camera: str) -> List[str]:
        with self._lock:
            w = self._cams.get(camera) or self._cams.get(OTHER)
            return sorted(w.active) if w else []

    def audit_rate(self, camera: str, base_rate: float) -> float:
        """``base_rate`` normally; while ``camera`` has an alarm,
        min(1, max(base_rate * audit_boost, alarm_audit_rate))."""
        with self._lock:
            w = self._cams.get(camera)
            if w is None and len(self._cams) >= self.max_cameras:
                w = self._cams.get(OTHER)
            if w is None or not w.active:
                return base_rate
        return min(1.0, max(base_rate * self.audit_boost, self.alarm_audit_rate))

    def snapshot(self) -> Dict[str, Dict[str, Any]]:
        """Per camera: frames seen, window fill, current values, active alarms,
        alarms raised so far (for Prometheus gauges/counters)."""
        out = {}
        with self._lock:
            for cam, w in self._cams.items():
                out[cam] = {
                    "frames": w.total,
                    "window": w.n,
                    "values": self._values(w),
                    "alarms": sorted(w.active),
                    "raised_total": dict(w.raised),
                }
        return out
