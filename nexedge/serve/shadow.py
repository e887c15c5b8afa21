"""Shadow mode: the candidate model scores the frames the active model has already answered.

The inference worker hands each answered batch to :meth:`ShadowScorer.offer`
(non-blocking). A bounded queue (``lifecycle.shadow_queue`` batches) feeds one
low-priority thread that runs the candidate on the same prepared images,
decides with the candidate's own threshold, and records per camera: the
agreement matrix (active PASS/REJECT x candidate PASS/REJECT), the score
correlation, and the frames skipped. Frames are skipped (and counted) when the
queue is full, when the line is backlogged (a full batch is waiting for the
active model), when a batch waited longer than the frame deadline, or when the
``shadow_fraction`` draw leaves them out. Nothing here can change or delay a
verdict: the verdicts are sent before :meth:`offer` is called. The thread runs
10 nice levels below the daemon's own (and under ``SCHED_IDLE`` where that is
past 19), so the candidate never outranks the line.

Disagreements go to the uncertain-sample store with kind ``shadow``: the model
that decided the frame, its threshold, score and decision in the row, the
candidate's in its ``shadow`` field. Python 3.8, no torch.
"""

import logging
import math
import os
import queue
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

log = logging.getLogger("nexedge.serve")
DECISIONS = ("PASS", "REJECT")


def lower_priority(step: int = 10) -> Tuple[int, int]:
    """Put the calling thread ``step`` nice levels below this process's own (Linux: nice is per
    thread), and under ``SCHED_IDLE`` when that would be past 19, so it stays below the daemon
    even when the daemon itself runs at nice 19. Returns (nice, policy) of the thread."""
    tid = threading.get_native_id() if hasattr(threading, "get_native_id") else 0
    try:
        own = os.getpriority(os.PRIO_PROCESS, os.getpid())
        want = own + step
        os.setpriority(os.PRIO_PROCESS, tid, min(want, 19))
        if want > 19 and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(tid)
    except (AttributeError, OSError) as e:
        log.warning("could not lower the shadow thread's priority (%s); the candidate competes with the line", e)
        return 0, 0


class CameraStats:
    """Agreement matrix, correlation sums and skips of one camera."""

    __slots__ = ("matrix", "n", "sx", "sy", "sxx", "syy", "sxy", "skipped")

    def __init__(self) -> None:
        self.matrix = {(a, c): 0 for a in DECISIONS for c in DECISIONS}
        self.n = 0
        self.sx = self.sy = self.sxx = self.syy = self.sxy = 0.0
        self.skipped: Dict[str, int] = {}

    def add(self, active: str, cand: str, x: float, y: float) -> None:
        self.matrix[(active, cand)] += 1
        self.n += 1
        self.sx += x
        self.sy += y
        self.sxx += x * x
        self.syy += y * y
        self.sxy += x * y

    @property
    def correlation(self) -> Optional[float]:
        """Pearson correlation of the two models' scores (None under 2 frames or with a constant score)."""
        if self.n < 2:
            return None
        vx = self.n * self.sxx - self.sx * self.sx
        vy = self.n * self.syy - self.sy * self.sy
        if vx <= 0 or vy <= 0:
            return None
        return max(-1.0, min(1.0, (self.n * self.sxy - self.sx * self.sy) / math.sqrt(vx * vy)))

    def as_dict(self) -> Dict[str, Any]:
        agree = self.matrix[("PASS", "PASS")] + self.matrix[("REJECT", "REJECT")]
        return {"frames": self.n, "agree": agree, "disagree": self.n - agree,
                "agreement": None if self.n == 0 else agree / self.n,
                "matrix": {f"{a}/{c}": v for (a, c), v in self.matrix.items()},
                "correlation": self.correlation, "skipped": dict(self.skipped),
                "skipped_total": sum(self.skipped.values())}


class ShadowScorer:
    """One thread running the candidate after the active verdicts went out."""

    def __init__(self, lifecycle: Any, metrics: Any, sampler: Any = None, fraction: float = 1.0,
                 max_batches: int = 2, deadline_s: float = 2.0, backlog: Any = None, max_batch: int = 8) -> None:
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.sampler = sampler
        self.fraction = float(fraction)
        self.deadline_s = float(deadline_s)
        self.backlog = backlog  # () -> frames waiting for the active model
        self.max_batch = int(max_batch)
        self._q: queue.Queue = queue.Queue(max_batches)  # (candidate, frames, scores, decisions) or None
        self._lock = threading.Lock()
        self._acc = 0.0
        self.cameras: Dict[str, CameraStats] = {}
        self.candidate_id: Optional[str] = None
        self.since: Optional[float] = None
        self.scored_batches = 0
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._run, name="nexedge-shadow", daemon=True)
        self._thread.start()

    # -- the worker's side: never blocks ----------------------------------------------
    def offer(self, active: Any, frames: List[Any], scores: List[float], decisions: List[str]) -> None:
        """An answered batch: the slot that decided it (``active``), its frames, scores and decisions;
        non-blocking."""
        cand = self.lifecycle.candidate
        if cand is None or not frames:
            return
        keep = [i for i in range(len(frames)) if self._draw()]
        if len(keep) < len(frames):
            self._skip([frames[i] for i in range(len(frames)) if i not in set(keep)], "fraction")
        if not keep:
            return
        frames = [frames[i] for i in keep]
        if self.backlog is not None and self.backlog() >= self.max_batch:
            self._skip(frames, "line_busy")
            return
        try:
            decider = (getattr(active, "model_id", None), getattr(getattr(active, "decider", None), "threshold", None))
            self._q.put_nowait((cand, decider, frames, [scores[i] for i in keep], [decisions[i] for i in keep]))
        except queue.Full:
            self._skip(frames, "queue_full")

    def _draw(self) -> bool:
        """Deterministic share: every frame at 1.0, every other one at 0.5, and so on."""
        if self.fraction >= 1.0:
            return True
        self._acc += self.fraction
        if self._acc >= 1.0:
            self._acc -= 1.0
            return True
        return False

    def _stats(self, camera: str) -> CameraStats:
        label = self.metrics.camera_label(camera) if self.metrics is not None else camera
        st = self.cameras.get(label)
        if st is None:
            st = self.cameras[label] = CameraStats()
        return st

    def _skip(self, frames: List[Any], reason: str) -> None:
        with self._lock:
            for f in frames:
                st = self._stats(f.req.camera)
                st.skipped[reason] = st.skipped.get(reason, 0) + 1

    # -- the shadow thread -----------------------------------------------------------
    def _run(self) -> None:
        lower_priority()
        while True:
            job = self._q.get()
            if job is None:
                return
            try:
                self._score(*job)
            except Exception as e:  # the shadow must never take the daemon down
                log.exception("shadow scoring failed: %s", e)

    def _score(self, cand: Any, decider: Tuple[Optional[str], Optional[float]], frames: List[Any],
               scores: List[float], decisions: List[str]) -> None:
        if time.monotonic() - min(f.t_recv for f in frames) > self.deadline_s:
            self._skip(frames, "stale")
            return
        t0 = time.monotonic()
        with cand.use_lock:
            if cand.closed or cand is not self.lifecycle.candidate:
                return  # promoted or unloaded meanwhile: these frames are no longer shadow work
            res = cand.backend.infer(np.stack([f.image for f in frames]))
        self.busy_s += time.monotonic() - t0
        self.scored_batches += 1
        classes = cand.card.classes
        disagreements = []
        with self._lock:
            if self.candidate_id != cand.model_id:  # stats belong to one candidate
                self._reset(cand.model_id)
            for i, f in enumerate(frames):
                y = float(res.defect_score[i])
                if not math.isfinite(y):
                    self._stats(f.req.camera).skipped["candidate_error"] = \
                        self._stats(f.req.camera).skipped.get("candidate_error", 0) + 1
                    continue
                cd, _unc = cand.decider.decide(y)
                self._stats(f.req.camera).add(decisions[i], cd, scores[i], y)
                if cd != decisions[i]:
                    disagreements.append((f, scores[i], decisions[i], y, cd, res.probs[i]))
            matrix = self._matrix()
        for f, x, ad, y, cd, probs in disagreements:
            self._sample(f, cand, decider, x, ad, y, cd, {c: float(p) for c, p in zip(classes, probs)})
        self.lifecycle.maybe_auto_promote(cand, matrix)

    def _sample(self, f: Any, cand: Any, decider: Tuple[Optional[str], Optional[float]], x: float, ad: str,
                y: float, cd: str, probs: Dict[str, float]) -> None:
        if self.sampler is None:
            return
        model_id, threshold = decider  # the model that decided the frame, not whichever is active now
        self.sampler.submit(f.original, f.ext, {
            "camera": f.req.camera, "frame_id": f.req.frame_id, "ts": f.t_wall,
            "model_id": model_id, "threshold": threshold, "score": x, "probs": None, "decision": ad,
            "reason": "", "kind": "shadow",
            "shadow": {"model_id": cand.model_id, "score": y, "decision": cd, "threshold": cand.decider.threshold,
                       "probs": probs}})

    def _reset(self, model_id: Optional[str]) -> None:
        self.cameras = {}
        self.candidate_id = model_id
        self.since = time.time()

    def _totals(self) -> Tuple[int, int]:
        n = sum(s.n for s in self.cameras.values())
        agree = sum(s.matrix[("PASS", "PASS")] + s.matrix[("REJECT", "REJECT")] for s in self.cameras.values())
        return n, n - agree

    def _matrix(self) -> Dict[Tuple[str, str], int]:
        """The agreement matrix over all cameras (active decision, candidate decision) -> frames."""
        out = {(a, c): 0 for a in DECISIONS for c in DECISIONS}
        for st in self.cameras.values():
            for k, v in st.matrix.items():
                out[k] += v
        return out

    def new_candidate(self, slot: Any) -> None:
        """A candidate was loaded (also the same model again): its shadow period starts afresh. When it
        is promoted or unloaded (``slot`` None) the last statistics stay readable."""
        with self._lock:
            if slot is not None:
                self._reset(slot.model_id)

    def idle(self) -> bool:
        return self._q.empty()

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    # -- reports -----------------------------------------------------------------------
    def report(self) -> Dict[str, Any]:
        with self._lock:
            cams = {c: s.as_dict() for c, s in sorted(self.cameras.items())}
            n, dis = self._totals()
            skipped = sum(sum(s.skipped.values()) for s in self.cameras.values())
        return {"candidate": self.candidate_id, "since": self.since, "fraction": self.fraction, "frames": n,
                "disagree": dis, "agreement": None if n == 0 else (n - dis) / n, "skipped": skipped,
                "cameras": cams}

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        frames = CounterMetricFamily("nexedge_shadow_frames", "Shadow-scored frames per camera: the agreement matrix "
                                     "(active decision x candidate decision)", labels=["camera", "active", "candidate"])
        skipped = CounterMetricFamily("nexedge_shadow_skipped", "Frames the shadow candidate did not score, by "
                                      "reason", labels=["camera", "reason"])
        corr = GaugeMetricFamily("nexedge_shadow_score_correlation", "Pearson correlation of active and candidate "
                                 "defect scores per camera", labels=["camera"])
        with self._lock:
            for cam, s in self.cameras.items():
                for (a, c), v in s.matrix.items():
                    frames.add_metric([cam, a, c], float(v))
                for reason, v in s.skipped.items():
                    skipped.add_metric([cam, reason], float(v))
                r = s.correlation
                if r is not None:
                    corr.add_metric([cam], r)
        return [frames, skipped, corr]
