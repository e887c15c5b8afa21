"""Ingest side of the daemon (I/O thread and decode pool): parse, admit or refuse, decode, queue.

Mixed into :class:`nexedge.serve.daemon.Daemon`; uses its ``cfg``, ``metrics``,
``batcher``, ``worker``, ``sampler``, ``card``, ``decider`` and ``answer``.
Python 3.8, no torch.
"""

import logging
import time
from typing import Any, List

from nexedge import preprocess as pp
from nexedge.serve import protocol as P
from nexedge.serve.decode import EXT, decode, sniff
from nexedge.serve.protocol import ProtocolError, Request
from nexedge.serve.worker import Frame

log = logging.getLogger("nexedge.serve")


class IngestMixin:
    """Per-message handling on the I/O thread and the decode task."""

    cfg: Any
    metrics: Any
    batcher: Any
    worker: Any
    sampler: Any
    card: Any
    decider: Any
    pool: Any
    monitor: Any
    _lock: Any
    _outstanding: Any
    _in_decode: int
    _stopping: bool
    _seq: Any
    n_received: int

    def answer(self, req: Request, t_recv: float, decision: str, reason: str, **kw: Any) -> bool:
        raise NotImplementedError

    def _on_message(self, frames: List[Any]) -> None:
        t_recv, t_wall = time.monotonic(), time.time()
        m = self.metrics
        self.n_received += 1
        envelope, body = P.split_envelope(frames)
        try:
            size = sum(len(f) for f in body)
            if size > self.cfg.sockets.max_message_bytes:
                cam, fid = P.peek_ids(body[0]) if body else ("", None)
                raise ProtocolError(P.OVERSIZE, f"message of {size} bytes exceeds max_message_bytes "
                                    f"{self.cfg.sockets.max_message_bytes}", cam, fid)
            req = P.parse_body(envelope, body, self._seq)
        except ProtocolError as e:
            req = Request(envelope, "error", e.camera, e.frame_id, "", None, None, b"")
            m.frames.labels(m.camera_label(e.camera or "_unknown")).inc()
            m.protocol.labels("error").inc()
            log.info("bad frame from camera %r: %s", e.camera, e, extra={"fields": {"reason": e.reason}})
            self.answer(req, t_recv, "RECHECK", e.reason)
            return
        m.frames.labels(m.camera_label(req.camera)).inc()
        m.protocol.labels(req.kind).inc()
        if self._stopping:
            self.answer(req, t_recv, "RECHECK", P.SHUTTING_DOWN)
            return
        if len(self.batcher) + self._in_decode >= self.batcher.max_queue:
            if self.answer(req, t_recv, "RECHECK", P.QUEUE_FULL):
                self._sample_undecoded(req, t_wall, P.QUEUE_FULL)
            return
        deadline = t_recv + (req.deadline_ms or self.cfg.batching.deadline_ms) / 1000.0
        with self._lock:
            self._outstanding[id(req)] = req
            self._in_decode += 1
        m.decoding.set(self._in_decode)
        if self.pool is not None:
            self.pool.submit(self._decode_task, req, t_recv, t_wall, deadline)
        else:
            self._decode_task(req, t_recv, t_wall, deadline)

    def _decode_task(self, req: Request, t_recv: float, t_wall: float, deadline: float) -> None:
        try:
            t0 = time.monotonic()
            try:
                img = decode(req, self.cfg.sockets.max_pixels)
                try:
                    prepared = pp.prepare(img, self.card.input)
                except (ValueError, TypeError) as e:
                    raise ProtocolError(P.BAD_SHAPE, str(e), req.camera, req.frame_id) from None
            except ProtocolError as e:
                self.answer(req, t_recv, "RECHECK", e.reason)
                return
            except Exception as e:  # an unexpected decoder failure is still just an uninspected frame
                log.warning("decode failed for camera %s frame %s: %s", req.camera, req.frame_id, e)
                self.answer(req, t_recv, "RECHECK", P.UNDECODABLE)
                return
            stats = pp.image_stats(prepared) if self.monitor is not None else None
            raw = req.encoding == "raw"
            frame = Frame(req, prepared, img if raw else req.payload, "png" if raw else EXT[sniff(req.payload) or "png"],
                          stats, t_recv, t_wall, deadline)
            self.metrics.stage.labels("decode").observe(time.monotonic() - t0)
            if time.monotonic() >= deadline:
                self.worker.recheck(frame, P.DEADLINE_PASSED)
            elif not self.batcher.put(frame):
                self.worker.recheck(frame, P.SHUTTING_DOWN if self.batcher.closed else P.QUEUE_FULL)
        finally:
            with self._lock:
                self._in_decode -= 1
            self.metrics.decoding.set(self._in_decode)

    def _sample_undecoded(self, req: Request, t_wall: float, reason: str) -> None:
        """A frame refused before decoding still goes to the store when its bytes look like an image."""
        if self.sampler is None:
            return
        if req.encoding == "raw":
            import numpy as np

            try:
                original: Any = np.frombuffer(req.payload, req.dtype).reshape(req.shape)
            except (ValueError, TypeError):
                return
            ext = "png"
        else:
            fmt = sniff(req.payload)
            if fmt is None:
                return
            original, ext = req.payload, EXT[fmt]
        self.sampler.submit(original, ext, {
            "camera": req.camera, "frame_id": req.frame_id, "ts": t_wall, "model_id": self.card.model_id,
            "threshold": self.decider.threshold, "score": None, "probs": None, "decision": "RECHECK",
            "reason": reason, "kind": "recheck"})

