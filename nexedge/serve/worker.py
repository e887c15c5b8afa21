"""The inference side of the daemon: decoded frames, the batch loop, decisions and sampling.

Runs on its own thread; verdicts go out through the daemon's ``answer``
callback (thread-safe). Python 3.8, no torch.
"""

import contextlib
import logging
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from nexedge.card import ModelCard
from nexedge.serve import protocol
from nexedge.serve.batcher import Batcher
from nexedge.serve.decide import Decider
from nexedge.serve.prometheus import DaemonMetrics
from nexedge.serve.protocol import Request

log = logging.getLogger("nexedge.serve")


class Frame:
    """A decoded, prepared frame waiting for (or in) a batch."""

    __slots__ = ("req", "image", "original", "ext", "stats", "t_recv", "t_wall", "t_queued", "deadline")

    def __init__(self, req: Request, image: np.ndarray, original: Any, ext: str,
                 stats: Optional[Tuple[float, float, float]], t_recv: float, t_wall: float, deadline: float) -> None:
        self.req = req
        self.image = image
        self.original = original  # encoded bytes as received, or the raw array
        self.ext = ext
        self.stats = stats
        self.t_recv = t_recv
        self.t_wall = t_wall
        self.t_queued = 0.0
        self.deadline = deadline


# answer(req, decision, reason, score=None, uncertain=False, probs=None) -> bool (False if already answered);
# the daemon's Ledger.answer, which never raises.
Answer = Callable[..., bool]
#: (frame, score, decision) of each frame a batch decided and answered.
Decided = List[Tuple[Frame, float, str]]


class InferenceWorker:
    """Takes batches from the :class:`Batcher`, runs the backend, decides, answers, samples."""

    def __init__(self, backend: Any, card: ModelCard, batcher: Batcher, decider: Decider, metrics: DaemonMetrics,
                 answer: Answer, sampler: Any = None, monitor: Any = None, models: Any = None,
                 after_batch: Optional[Callable[[Decided, Any], None]] = None) -> None:
        """``models``: the daemon's Lifecycle (each batch runs on its active slot, under its batch lock);
        ``after_batch``: called with what a batch decided and the slot that decided it, after its
        verdicts went out (shadow, rollback chart)."""
        self.backend = backend
        self.card = card
        self.classes = card.classes
        self.batcher = batcher
        self.decider = decider
        self.metrics = metrics
        self.answer = answer
        self.sampler = sampler
        self.monitor = monitor
        self.models = models
        self.after_batch = after_batch
        self.in_flight: List[Frame] = []
        self.heartbeat = time.monotonic()
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name="nexedge-infer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        m = self.metrics
        while True:
            self.heartbeat = time.monotonic()
            batch, expired = self.batcher.next_batch(timeout=0.25)
            m.queue_depth.set(len(self.batcher))
            for f in expired:
                self.recheck(f, protocol.DEADLINE_PASSED)
            batch = [f for f in batch if not f.req.answered]  # expired while queued: no work to do
            if not batch:
                if self.batcher.closed and len(self.batcher) == 0:
                    return
                continue
            self.in_flight = batch
            try:
                lock = self.models.batch_lock if self.models is not None else contextlib.nullcontext()
                with lock:  # a model swap waits for this batch: it finishes on the model it started with
                    slot = self._bind_active()
                    decided = self._run_batch(batch)
                if decided and self.after_batch is not None:
                    self.after_batch(decided, slot)  # with the model that decided them, whatever is active now
            except Exception as e:  # never let a bug in decisions kill the worker
                log.exception("inference batch failed: %s", e)
            finally:
                self.in_flight = []
                for f in batch:  # every frame of the batch ends answered, whatever happened above
                    if not f.req.answered:
                        self.recheck(f, protocol.BACKEND_ERROR)

    def _bind_active(self) -> Any:
        """(under the batch lock) Run the next batch on the active model; returns its slot (None without models)."""
        slot = self.models.active if self.models is not None else None
        if slot is not None and slot.backend is not self.backend:
            self.backend, self.card, self.classes, self.decider = slot.backend, slot.card, slot.card.classes, \
                slot.decider
        return slot

    def _run_batch(self, batch: List[Frame]) -> Decided:
        m = self.metrics
        decided: Decided = []
        t0 = time.monotonic()
        for f in batch:
            m.queue_wait.observe(t0 - f.t_queued)
        m.batch_size.observe(len(batch))
        images = np.stack([f.image for f in batch])
        try:
            plan = getattr(self.backend, "infer_frames", None)  # cascade: per-frame deadlines, rechecks
            res = plan(images, [f.deadline for f in batch]) if plan else self.backend.infer(images)
        except Exception as e:
            log.error("backend error on a batch of %d: %s", len(batch), e)
            for f in batch:
                self.recheck(f, protocol.BACKEND_ERROR)
            return decided
        t1 = time.monotonic()
        m.inference.observe(t1 - t0)
        for stage, secs in (res.timings or {}).items():
            if stage != "total":
                m.stage.labels("backend_" + stage).observe(secs)
        self.batches += 1
        rechecks = getattr(res, "recheck", None) or [None] * len(batch)
        for i, f in enumerate(batch):
            if rechecks[i] is not None:  # a cascade band frame stage 2 could not decide: never its stage-1 verdict
                self.recheck(f, rechecks[i])
                continue
            score = float(res.defect_score[i])
            if not np.isfinite(score):
                self.recheck(f, protocol.BACKEND_ERROR)
                continue
            probs = {c: float(p) for c, p in zip(self.classes, res.probs[i])}
            decision, uncertain = self.decider.decide(score)
            if uncertain:
                m.uncertain.inc()
            if not self.answer(f.req, decision, "", score=score, uncertain=uncertain, probs=probs):
                continue  # answered meanwhile (deadline passed during inference): not this verdict's sample
            decided.append((f, score, decision))
            kind = "band" if uncertain else None
            if self.monitor is not None and f.stats is not None:
                kind = self._observe(f, score, decision, uncertain) or kind
            if kind is None:
                rate = None
                if self.monitor is not None:
                    try:
                        rate = float(self.monitor.audit_rate(f.req.camera, self.decider.audit_fraction))
                    except Exception as e:
                        log.error("shift monitor audit_rate failed: %s", e)
                if self.decider.audit(rate):
                    kind = "audit"
            if kind is not None:
                self.sample(f, kind, decision, "", score, probs)
        m.stage.labels("decide").observe(time.monotonic() - t1)
        return decided

    def _observe(self, f: Frame, score: float, decision: str, uncertain: bool) -> Optional[str]:
        try:
            alarms = self.monitor.observe(f.req.camera, score, decision, uncertain, f.stats) or []
        except Exception as e:
            log.error("shift monitor failed: %s", e)
            return None
        for name in alarms:
            self.metrics.alarms.labels(self.metrics.camera_label(f.req.camera), str(name)).inc()
            log.warning("shift alarm %s on camera %s", name, f.req.camera,
                        extra={"fields": {"alarm": name, "camera": f.req.camera, "frame_id": f.req.frame_id}})
        return "drift" if alarms else None

    def recheck(self, f: Frame, reason: str) -> None:
        if self.answer(f.req, "RECHECK", reason):
            self.sample(f, "recheck", "RECHECK", reason, None, None)

    def sample(self, f: Frame, kind: str, decision: str, reason: str, score: Optional[float],
               probs: Optional[dict]) -> None:
        if self.sampler is None:
            return
        meta = {
            "camera": f.req.camera, "frame_id": f.req.frame_id, "ts": f.t_wall, "model_id": self.card.model_id,
            "threshold": self.decider.threshold, "score": score, "probs": probs, "decision": decision,
            "reason": reason, "kind": kind,
        }
        self.sampler.submit(f.original, f.ext, meta)
