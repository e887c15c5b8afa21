"""Cascade TenCrop: one cheap pass on every frame, the full crop mode only near the threshold.

Stage 1 runs the model on the center crop (a host-crop model's :meth:`Backend.crop_view`, or
a graph exported with center crops from the same weights). A stage-1 score above the guard
band is a final REJECT, one below it a final PASS; a frame in the band (``lo <= s1 <= hi``)
goes to stage 2, the full crop mode (TenCrop), and a batch's band frames go as one batch.
A band frame whose stage 2 cannot run (its deadline would pass first, or stage 2 fails) is
answered RECHECK, never with its stage-1 decision.

The band is measured, not guessed (:func:`find_band`, called by ``nexedge thresholds
--cascade``): on the validation split, the narrowest band for which no cascade decision
differs from full TenCrop's, widened by a margin in log-odds. That agreement is 100 % by
construction on the images the band was fitted to, so the card's ``cascade`` section
holds, per operating point, the *held-out* agreement (leave-one-out: each image decided
by the band fitted without it) with a 95 % upper bound on the disagreement, for the
chosen margin and for margin 0 (what the margin buys), and the stage-2 fraction.

Whether a band frame can wait for stage 2 is judged from stage 2's measured cost per
image: the lower median of its last few calls (one stall cannot dominate it), and when
that has said "too late" for every band frame for ``reprobe_s``, stage 2 runs anyway on
one band frame and is measured again, so one slow call (a paused process, a poison
frame) cannot turn every band frame into RECHECK for good. A re-probe that finds stage 2
still too slow doubles the wait before the next one (up to 64 x), so a stage 2 that
really is slow costs at most one image's stage 2 per wait.

Python 3.8, no torch.
"""

import collections
import logging
import math
import os
import time
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from nexedge.card import ModelCard, load_card
from nexedge.metrics import logit_exact
from nexedge.runtime.base import Backend, BackendError

log = logging.getLogger(__name__)

STAGE1_CROPS = "center"
#: Widening of the tight band on each side, in log-odds of the defect score.
DEFAULT_MARGIN = 1.0
MODES = ("auto", "on", "off")
#: Stage-2 time estimate before any measurement: seconds per image (replaced by the warm-up's).
_PRIOR_S_PER_IMAGE = 0.0
#: Stage-2 calls whose median per-image time is the estimate.
COST_WINDOW = 5
#: Seconds without a stage-2 call (all band frames predicted late) before stage 2 runs anyway.
REPROBE_S = 1.0
#: Reasons a band frame is answered RECHECK (the daemon's protocol reasons).
DEADLINE_PASSED = "deadline_passed"
BACKEND_ERROR = "backend_error"


class CascadeError(ValueError):
    """The card's cascade section is missing, stale or does not fit the deployed threshold."""


def expit(x: float) -> float:
    """Inverse of :func:`logit` for one value, exact at +-inf."""
    if x == math.inf:
        return 1.0
    if x == -math.inf:
        return 0.0
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def stage1_route(s1: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Per frame: 1 final REJECT (s1 > hi), 0 final PASS (s1 < lo), -1 band (stage 2; also NaN scores)."""
    s1 = np.asarray(s1, np.float64)
    route = np.full(s1.shape, -1, np.int8)
    route[s1 > hi] = 1
    route[s1 < lo] = 0
    return route


def cascade_decisions(s1: np.ndarray, s_full: np.ndarray, threshold: float, lo: float, hi: float) -> np.ndarray:
    """REJECT (True) / PASS (False) the cascade gives, with stage 2 = ``s_full`` for band frames."""
    route = stage1_route(s1, lo, hi)
    return np.where(route < 0, np.asarray(s_full) >= threshold, route == 1)


def find_band(s1: Sequence[float], s_full: Sequence[float], threshold: float, margin: float = DEFAULT_MARGIN,
              y_defect: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """The band for ``threshold`` from paired stage-1 / full-crop scores of the same images.

    Tight band: ``lo`` = the lowest stage-1 score of a frame full TenCrop REJECTs, ``hi`` = the
    highest stage-1 score of a frame it PASSes (both also at least/most the threshold), so no
    frame is decided differently. Then each side moves ``margin`` further out in log-odds.
    ``y_defect`` (1 = defect) adds the escapes of both plans to the record."""
    a, b = np.asarray(s1, np.float64), np.asarray(s_full, np.float64)
    if a.shape != b.shape or a.ndim != 1 or not a.size:
        raise ValueError(f"stage-1 and full scores must be two equal, non-empty 1-d arrays, got {a.shape}, {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("non-finite scores: the model produced NaN/inf on the validation images")
    if margin < 0 or not math.isfinite(margin):
        raise ValueError(f"cascade margin must be a finite number >= 0 (log-odds), got {margin!r}")
    t = float(threshold)
    rej = b >= t
    lo_t = min([t] + ([float(a[rej].min())] if rej.any() else []))
    hi_t = max([t] + ([float(a[~rej].max())] if (~rej).any() else []))
    lo, hi = _widen(lo_t, hi_t, margin)
    dec = cascade_decisions(a, b, t, lo, hi)
    band = stage1_route(a, lo, hi) < 0
    out = {
        "threshold": t, "lo": lo, "hi": hi, "lo_tight": lo_t, "hi_tight": hi_t, "margin_logit": float(margin),
        "n_images": int(a.size), "agreement": float((dec == rej).mean()),
        "stage2_fraction": float(band.mean()),
        "stage2_fraction_tight": float((stage1_route(a, lo_t, hi_t) < 0).mean()),
        "held_out": held_out_agreement(a, b, t, margin),
        "held_out_margin0": held_out_agreement(a, b, t, 0.0),
    }
    if y_defect is not None:
        y = np.asarray(y_defect).astype(bool)
        out["escapes_full"] = int((y & ~rej).sum())
        out["escapes_cascade"] = int((y & ~dec).sum())
        out["escapes_stage1_only"] = int((y & (a < t)).sum())
    return out


def _widen(lo_t: float, hi_t: float, margin: float) -> Tuple[float, float]:
    """The tight band moved ``margin`` further out on each side, in log-odds."""
    lo = expit(float(logit_exact(np.float64(lo_t))) - margin)
    hi = expit(float(logit_exact(np.float64(hi_t))) + margin)
    return min(lo, lo_t), max(hi, hi_t)  # rounding of expit(logit(x)) must never narrow the band


def held_out_agreement(s1: Sequence[float], s_full: Sequence[float], threshold: float, margin: float,
                       confidence: float = 0.95) -> Dict[str, Any]:
    """Leave-one-out agreement of the cascade with full crops: each image is decided with the band
    fitted (as :func:`find_band` does) on all the *other* images. ``disagree`` counts images whose
    cascade decision differs, ``reject_to_pass`` those full crops REJECT and the cascade PASSes
    (escapes the cascade adds); ``disagreement_upper`` is the one-sided Clopper-Pearson upper
    bound on the disagreement rate at ``confidence``. In-sample agreement is 1 by construction;
    this is what a new image can expect."""
    a, b = np.asarray(s1, np.float64), np.asarray(s_full, np.float64)
    t = float(threshold)
    rej = b >= t
    n = int(a.size)
    # Leaving one image out moves a tight edge only when it is that edge's own image: the edge
    # falls back to the second-lowest (highest) score, or to the threshold.
    r_idx, p_idx = np.flatnonzero(rej), np.flatnonzero(~rej)
    r_sorted = r_idx[np.argsort(a[r_idx], kind="stable")]
    p_sorted = p_idx[np.argsort(-a[p_idx], kind="stable")]
    lo_t = np.full(n, min([t] + ([float(a[r_sorted[0]])] if r_sorted.size else [])))
    hi_t = np.full(n, max([t] + ([float(a[p_sorted[0]])] if p_sorted.size else [])))
    if r_sorted.size:
        lo_t[r_sorted[0]] = min([t] + ([float(a[r_sorted[1]])] if r_sorted.size > 1 else []))
    if p_sorted.size:
        hi_t[p_sorted[0]] = max([t] + ([float(a[p_sorted[1]])] if p_sorted.size > 1 else []))
    lo, hi = np.empty(n), np.empty(n)
    for pair in set(zip(lo_t.tolist(), hi_t.tolist())):  # at most three distinct bands
        at = (lo_t == pair[0]) & (hi_t == pair[1])
        lo[at], hi[at] = _widen(pair[0], pair[1], margin)
    dec = np.where((a >= lo) & (a <= hi), rej, a > hi)  # in its band: full crops' decision
    disagree = int((dec != rej).sum())
    to_pass = int((rej & ~dec).sum())
    return {"method": "leave-one-out", "n_images": n, "disagree": disagree, "reject_to_pass": to_pass,
            "agreement": 1.0 - disagree / n, "disagreement_upper": _cp_upper(disagree, n, confidence),
            "reject_to_pass_upper": _cp_upper(to_pass, n, confidence), "confidence": confidence,
            "margin_logit": float(margin)}


def _cp_upper(k: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound on a rate with ``k`` events of ``n``."""
    from nexedge.metrics import beta_ppf

    if n <= 0 or k >= n:
        return 1.0
    if k == 0:
        return float(1.0 - (1.0 - confidence) ** (1.0 / n))
    return float(beta_ppf(confidence, k + 1, n - k))


def measure_section(card: ModelCard, s1: np.ndarray, s_full: np.ndarray, y_defect: np.ndarray,
                    stage1: Dict[str, Any], split: str, margin: float = DEFAULT_MARGIN) -> Dict[str, Any]:
    """The card's ``cascade`` section: one band per operating point of ``card`` (already measured on
    ``s_full``), plus what stage 1 is and where the band was measured."""
    from nexedge import metrics

    bands = []
    for op in card.operating_points:
        b = find_band(s1, s_full, float(op["threshold"]), margin, y_defect)
        b["target_tpr"] = float(op["target_tpr"])
        # The scores the daemon reports under this plan (stage 1's outside the band): the shift
        # monitor's PSI reference, which the full-crop val_scores would not be.
        live = np.where(stage1_route(s1, b["lo"], b["hi"]) < 0, s_full, s1)
        b["val_scores"] = metrics.score_histogram(np.asarray(y_defect).astype(int), live)
        bands.append(b)
    return {
        "status": "measured",
        "stage1": stage1,
        "stage2_crop_mode": card.runtime_crop_mode,
        "split": split,
        "artifact_sha256": card.sha256,
        "margin_logit": float(margin),
        "bands": bands,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def band_for(card: ModelCard, threshold: float) -> Dict[str, Any]:
    """The card's measured band for ``threshold``; :class:`CascadeError` saying why there is none."""
    sec = card.data.get("cascade")
    if not sec:
        raise CascadeError(f"{card.source}: no cascade section; measure one with `nexedge thresholds ARTIFACT "
                           "--data ROOT --cascade`")
    if sec.get("status") != "measured" or sec.get("artifact_sha256") != card.sha256:
        raise CascadeError(f"{card.source}: the cascade band was not measured on this artifact (status "
                           f"{sec.get('status')!r}; its scores differ from the one it was measured on); re-measure "
                           "with `nexedge thresholds ARTIFACT --data ROOT --cascade`")
    for b in sec.get("bands") or []:
        if abs(float(b["threshold"]) - float(threshold)) <= 1e-12 * max(1.0, abs(float(threshold))):
            return b
    have = [b.get("threshold") for b in sec.get("bands") or []]
    raise CascadeError(f"{card.source}: no cascade band for threshold {threshold!r} (bands exist for {have}); an "
                       "explicit decision.threshold needs its own measurement, or use the card's target_tpr")


class CascadeResult(NamedTuple):
    probs: np.ndarray  # N x C float32 (stage 1's for final frames, stage 2's for band frames)
    defect_score: np.ndarray  # N float64; NaN where ``recheck`` names a reason
    timings: Dict[str, float]
    stage: np.ndarray  # N int8: 1 decided by stage 1, 2 by stage 2, 0 not decided (recheck)
    recheck: List[Optional[str]]  # per frame: None, or the RECHECK reason


class CascadePlan:
    """Backend-shaped two-stage plan. ``infer(images)`` and ``infer_frames(images, deadlines)``
    return a :class:`CascadeResult`; the attributes the daemon reads (card, max_batch,
    input_shape, crops, crop_mode, name) are stage 2's."""

    def __init__(self, stage1: Backend, stage2: Backend, band: Dict[str, Any], own_stage1: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if tuple(stage1.input_shape) != tuple(stage2.input_shape):
            raise CascadeError(f"stage 1 takes {stage1.input_shape} images but stage 2 takes {stage2.input_shape}")
        self.stage1, self.stage2 = stage1, stage2
        self.lo, self.hi, self.threshold = float(band["lo"]), float(band["hi"]), float(band["threshold"])
        if not self.lo <= self.threshold <= self.hi:  # else stage 1 would decide frames on the wrong side
            raise CascadeError(f"cascade band [{self.lo}, {self.hi}] does not hold its threshold {self.threshold}")
        self.band = dict(band)
        self.own_stage1 = own_stage1
        self.clock = clock
        self.card = self.monitor_card()  # stage 2's card, val_scores as this plan reports scores
        self.max_batch = min(stage1.max_batch, stage2.max_batch)
        self.input_shape = stage2.input_shape
        self.crops, self.crop_mode = stage2.crops, stage2.crop_mode
        self.name = f"cascade({getattr(stage1, 'name', '?')}:{stage1.crop_mode} -> {getattr(stage2, 'name', '?')}:" \
                    f"{stage2.crop_mode})"
        self.s_per_image = _PRIOR_S_PER_IMAGE
        self.costs: Deque[float] = collections.deque(maxlen=COST_WINDOW)  # per-image seconds of recent calls
        self.reprobe_s = REPROBE_S
        self._backoff = 1
        self._last_stage2 = clock()
        self.reprobes = 0
        self.frames = {1: 0, 2: 0, 0: 0}

    def monitor_card(self) -> ModelCard:
        """The card with ``val_scores`` of the scores this plan reports (stage 1's outside the band),
        the shift monitor's reference; the card itself when the band predates that record."""
        card = self.stage2.card
        if not self.band.get("val_scores"):
            return card
        return ModelCard(dict(card.data, val_scores=self.band["val_scores"]), source=card.source)

    def infer(self, images: np.ndarray) -> CascadeResult:
        return self.infer_frames(images, None)

    def infer_frames(self, images: np.ndarray, deadlines: Optional[Sequence[float]] = None) -> CascadeResult:
        """Run the plan on one batch. ``deadlines`` (monotonic seconds, one per image): a band frame
        whose deadline comes before stage 2 is expected to finish gets RECHECK deadline_passed.
        A stage-1 failure raises :class:`BackendError` (the caller answers the batch RECHECK)."""
        t0 = time.perf_counter()
        r1 = self.stage1.infer(images)
        n = len(r1.defect_score)
        timings = {"stage1_" + k: v for k, v in r1.timings.items()}
        probs = np.array(r1.probs, np.float32)
        score = np.array(r1.defect_score, np.float64)
        route = stage1_route(score, self.lo, self.hi)
        stage = np.where(route < 0, 0, 1).astype(np.int8)
        recheck: List[Optional[str]] = [None] * n
        band = np.flatnonzero(route < 0)
        probe = None
        if band.size and deadlines is not None:
            now = self.clock()
            finish = now + self.s_per_image * band.size
            late = np.asarray([deadlines[i] < finish for i in band], bool)
            if late.all() and now - self._last_stage2 >= self.reprobe_s * self._backoff:
                probe = int(band[0])  # the estimate may be stale (a stall): measure stage 2 again on one frame
                late[0] = False
                self.reprobes += 1
                log.info("cascade: stage 2 not run for %.1f s (estimated %.3f s per image); re-measuring it on one "
                         "band frame", now - self._last_stage2, self.s_per_image)
            for i in band[late]:
                recheck[i] = DEADLINE_PASSED
            band = band[~late]
        if band.size:
            t1 = time.perf_counter()
            try:
                r2 = self.stage2.infer(np.ascontiguousarray(images[band]))
            except Exception as e:  # BackendError or a runtime's own: band frames cannot be decided
                log.error("cascade stage 2 failed on %d band frames: %s", band.size, e)
                for i in band:
                    recheck[i] = BACKEND_ERROR
            else:
                probs[band] = r2.probs
                score[band] = r2.defect_score
                stage[band] = 2
                timings.update({"stage2_" + k: v for k, v in r2.timings.items()})
                self._measured((time.perf_counter() - t1) / band.size)
            self._last_stage2 = self.clock()
            if probe is not None and deadlines is not None:  # still too slow: wait longer before the next probe
                self._backoff = min(self._backoff * 2, 64) if self._last_stage2 > deadlines[probe] else 1
        for i in range(n):
            if recheck[i] is not None:
                score[i] = np.nan
                stage[i] = 0
        for s in (0, 1, 2):
            self.frames[s] += int((stage == s).sum())
        timings["total"] = time.perf_counter() - t0
        return CascadeResult(probs, score, timings, stage, recheck)

    def warmup(self, n: int = 2) -> None:
        """Warm both stages; the last stage-2 call at max batch seeds the time estimate."""
        self.stage1.warmup(n)
        self.stage2.warmup(n)
        x = np.zeros((self.max_batch,) + tuple(self.input_shape), np.uint8)
        t0 = time.perf_counter()
        self.stage2.infer(x)
        self._measured((time.perf_counter() - t0) / self.max_batch)
        self._last_stage2 = self.clock()

    def _measured(self, per_image: float) -> None:
        """One stage-2 call's seconds per image: the estimate is the (lower) median of the last few."""
        self.costs.append(per_image)
        self.s_per_image = float(sorted(self.costs)[(len(self.costs) - 1) // 2])

    def check_batch(self, images: np.ndarray) -> np.ndarray:
        return self.stage2.check_batch(images)

    def close(self) -> None:
        if self.own_stage1:
            self.stage1.close()
        self.stage2.close()

    def __enter__(self) -> "CascadePlan":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stage1_path(artifact: str, card: ModelCard, override: Optional[str] = None) -> Optional[str]:
    """The stage-1 artifact of an in-graph model (``override`` or the card's ``cascade.stage1.file``
    beside it); None for host-crop models, whose stage 1 is the same artifact on center crops."""
    if card.graph.get("crops", "host") == "host":
        return None
    if override:
        return override
    name = ((card.data.get("cascade") or {}).get("stage1") or {}).get("file")
    if not name:
        raise CascadeError(f"{card.source}: in-graph model ({card.graph.get('crops')} crops) without a stage-1 "
                           "model: export one with `nexedge export CKPT --crops ten --cascade` or name it")
    return os.path.join(os.path.dirname(os.path.abspath(artifact)), name)


def check_stage1(card: ModelCard, s1_card: ModelCard, s1_path: str) -> None:
    """Stage 1 must be the card's own (by sha256, directly or as the parent it was built from), take
    the same prepared images, and run center crops."""
    want = ((card.data.get("cascade") or {}).get("stage1") or {}).get("sha256")
    got = {s1_card.sha256, (s1_card.data.get("parent") or {}).get("sha256")}
    if want and want not in got:
        raise CascadeError(f"{s1_path}: not the stage-1 model of {card.source} (card names sha256 {want[:12]}, "
                           f"this artifact is {str(s1_card.sha256)[:12]})")
    if s1_card.classes != card.classes or s1_card.input["resize"] != card.input["resize"] \
            or s1_card.input["color"] != card.input["color"]:
        raise CascadeError(f"{s1_path}: classes or input geometry differ from {card.source}")
    if s1_card.runtime_crop_mode != STAGE1_CROPS:
        raise CascadeError(f"{s1_path}: stage 1 must run {STAGE1_CROPS!r} crops, runs {s1_card.runtime_crop_mode!r}")


def open_stage1(backend: Backend, artifact: str, override: Optional[str] = None,
                open_fn: Optional[Callable[..., Backend]] = None, **options: Any) -> Backend:
    """Stage 1 for ``backend`` (stage 2): a center-crop view of a host-crop model, else the stage-1
    artifact opened with ``options`` (the same backend options as stage 2)."""
    card = backend.card
    path = stage1_path(artifact, card, override)
    if path is None:
        return backend.crop_view(STAGE1_CROPS)
    from nexedge.runtime import open_backend

    check_stage1(card, load_card(path, verify=False), path)
    return (open_fn or open_backend)(path, **options)


def make_plan(backend: Backend, artifact: str, threshold: float, mode: str = "auto",
              stage1_override: Optional[str] = None, open_fn: Optional[Callable[..., Backend]] = None,
              **options: Any) -> Optional[CascadePlan]:
    """The plan the daemon runs, or None for plain full-crop inference.

    ``mode`` ``off``: None. ``on``: a plan or :class:`CascadeError` saying why not. ``auto``: a plan
    when the card has a band measured on this artifact for ``threshold``, else None (logged)."""
    if mode not in MODES:
        raise CascadeError(f"cascade mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off":
        return None
    card = backend.card
    if backend.crop_mode == STAGE1_CROPS:
        if mode == "on":
            raise CascadeError(f"{card.source}: the model already runs {STAGE1_CROPS!r} crops; a cascade needs a "
                               "multi-crop stage 2 (five or ten)")
        return None
    try:
        band = band_for(card, threshold)
        path = stage1_path(artifact, card, stage1_override)
        s1 = open_stage1(backend, artifact, stage1_override, open_fn, **options)
    except (CascadeError, OSError, BackendError, ValueError) as e:
        if mode == "on":
            raise CascadeError(str(e)) from e
        if card.data.get("cascade"):  # auto, and the card meant to cascade: say why it does not
            log.warning("cascade not used (full %s on every frame): %s", backend.crop_mode, e)
        return None
    return CascadePlan(s1, backend, band, own_stage1=path is not None)


def opener(backend: str = "auto") -> Optional[Callable[..., Backend]]:
    """How a stage-1 artifact is opened: by ``backend`` by name, like stage 2 (None: by suffix)."""
    if backend == "auto":
        return None
    from nexedge.runtime import open_backend

    return lambda path, **options: open_backend(path, backend, **options)


def plan_for_daemon(backend: Backend, model_cfg: Any, threshold: float, options: Dict[str, Any],
                    artifact: Optional[str] = None) -> Any:
    """``backend`` (opened from ``artifact``, default ``model_cfg.path``), or the cascade plan around it
    that ``model_cfg.cascade`` (auto | on | off) asks for, warmed up (``model_cfg.warmup`` rounds) and
    logged. CascadeError when ``on`` cannot be met. Call it once per opened model, with its own threshold."""
    plan = make_plan(backend, artifact or model_cfg.path, threshold, model_cfg.cascade, model_cfg.stage1,
                     opener(getattr(model_cfg, "backend", "auto")), **options)
    if plan is None:
        if model_cfg.cascade != "off":
            log.info("cascade off (%s): full %s crops on every frame", model_cfg.cascade, backend.crop_mode)
        return backend
    if model_cfg.warmup:
        plan.warmup(model_cfg.warmup)
    b = plan.band
    ho = b.get("held_out") or {}
    if ho:
        agreement = (f"held-out (leave-one-out) agreement {ho['agreement']:.4f}, disagreement at most "
                     f"{ho['disagreement_upper']:.4f} ({100 * ho['confidence']:g} % bound)")
    else:
        agreement = "no held-out agreement in the card (re-measure with `nexedge thresholds --cascade`)"
    log.info("cascade on: %s; band [%.6g, %.6g] around threshold %.6g, %s, expected stage-2 share %.3f on %d "
             "validation images", plan.name, plan.lo, plan.hi, plan.threshold, agreement,
             b.get("stage2_fraction", float("nan")), b.get("n_images", 0),
             extra={"fields": {"cascade": {k: v for k, v in b.items() if k != "val_scores"}}})
    return plan
