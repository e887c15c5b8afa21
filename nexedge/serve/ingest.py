"""Ingest side of the daemon (I/O thread and decode threads): receive, parse, admit or refuse, decode, queue.

Mixed into :class:`nexedge.serve.daemon.Daemon`; uses its ``cfg``, ``metrics``,
``batcher``, ``worker``, ``sampler``, ``card``, ``decider`` and ``ledger``.
Every admitted frame is owned by the ledger (see :mod:`nexedge.serve.ledger`).
Python 3.8, no torch.
"""

import logging
import queue
import threading
import time
from typing import Any, List, Optional

import zmq

from nexedge import preprocess as pp
from nexedge.serve import protocol as P
from nexedge.serve.decode import EXT, decode, sniff
from nexedge.serve.ledger import Ledger
from nexedge.serve.protocol import ProtocolError, Request
from nexedge.serve.worker import Frame

log = logging.getLogger("nexedge.serve")

#: Body parts a request may have after the identity: [b"", header, payload] at most.
MAX_BODY_PARTS = 3


class Received:
    """One ROUTER message read part by part within bounds (see :func:`recv_bounded`)."""

    __slots__ = ("frames", "parts", "size", "problem")

    def __init__(self, frames: List[Any], parts: int, size: int, problem: Optional[str]) -> None:
        self.frames = frames    # identity + the body parts kept (payloads past a bound are not kept)
        self.parts = parts      # body parts the peer sent
        self.size = size        # body bytes the peer sent
        self.problem = problem  # None, P.OVERSIZE or P.WRONG_FRAME_COUNT


def recv_bounded(sock: zmq.Socket, max_bytes: int, max_parts: int = MAX_BODY_PARTS) -> Received:
    """Receive one multipart message (zmq.Again if none), keeping at most ``max_parts`` body parts
    and ``max_bytes`` body bytes; parts past either bound are read and released at once, so a
    message of many large parts never lives in the process as a whole."""
    ident = sock.recv(zmq.NOBLOCK, copy=False)
    frames: List[Any] = [ident]
    more = ident.more
    parts = size = 0
    problem: Optional[str] = None
    while more:
        f = sock.recv(copy=False)
        more = f.more
        parts += 1
        size += len(f)
        if problem is None:
            if parts > max_parts:
                problem = P.WRONG_FRAME_COUNT
            elif size > max_bytes:
                problem = P.OVERSIZE
        if problem is None or (parts <= max_parts and len(f) <= P.MAX_HEADER_BYTES):
            frames.append(f)  # small parts stay, so an error reply can still name the frame
        del f
    if problem == P.WRONG_FRAME_COUNT and size > max_bytes:
        problem = P.OVERSIZE
    return Received(frames, parts, size, problem)


class DecodePool:
    """Daemon threads taking decode jobs from a queue; never block process exit.

    The queue is bounded by admission (batching.max_queue), not here.
    """

    def __init__(self, n: int, fn: Any) -> None:
        self._q = queue.Queue()  # type: queue.Queue  # of job tuples, None to stop
        self._fn = fn
        self._threads = [threading.Thread(target=self._run, name=f"nexedge-decode-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, *args: Any) -> None:
        self._q.put(args)

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            self._fn(*job)
            del job  # do not hold the last frame's payload while waiting for the next one

    def shutdown(self) -> None:
        """Ask the threads to stop after their current job; does not wait."""
        for _ in self._threads:
            self._q.put(None)


class IngestMixin:
    """Per-message handling on the I/O thread and the decode threads."""

    cfg: Any
    metrics: Any
    batcher: Any
    worker: Any
    sampler: Any
    card: Any
    decider: Any
    pool: Any
    monitor: Any
    ledger: Ledger
    recheck_sampling: Any
    _lock: Any
    _in_decode: int
    _stopping: bool
    _seq: Any
    n_received: int

    def _on_received(self, rec: Received) -> None:
        """Handle one received message; the message boundary: nothing raised here escapes."""
        t_recv, t_wall = time.monotonic(), time.time()
        self.n_received += 1
        try:
            envelope, body = P.split_envelope(rec.frames)
        except Exception:  # pragma: no cover - an identity frame is always there
            return
        req: Optional[Request] = None
        try:
            if rec.problem is not None:
                cam, fid = P.peek_ids(body[0], self.cfg.sockets.max_header_bytes) if body else ("", None)
                if rec.problem == P.OVERSIZE:
                    raise ProtocolError(P.OVERSIZE, f"message of {rec.size} bytes in {rec.parts} parts exceeds "
                                        f"max_message_bytes {self.cfg.sockets.max_message_bytes}", cam, fid)
                raise ProtocolError(P.WRONG_FRAME_COUNT, f"expected 2 frames (header, payload), got {rec.parts}",
                                    cam, fid)
            req = P.parse_body(envelope, body, self._seq, self.cfg.sockets.max_header_bytes)
        except ProtocolError as e:
            self._refuse(envelope, t_recv, e)
            return
        except Exception as e:  # a parser bug is still just a frame we cannot inspect
            log.exception("unexpected error parsing a message: %s", e)
            self._refuse(envelope, t_recv, ProtocolError(P.GARBAGE_HEADER, str(e)))
            return
        try:
            self._admit(req, t_recv, t_wall)
        except Exception as e:
            log.exception("unexpected error admitting camera %r frame %r: %s", req.camera, req.frame_id, e)
            if req.t_recv == 0.0:
                req.t_recv = t_recv
            self.ledger.answer(req, "RECHECK", P.BACKEND_ERROR)

    def _refuse(self, envelope: List[bytes], t_recv: float, e: ProtocolError) -> None:
        req = Request(envelope, "error", P.readable_camera(e.camera), P.readable_frame_id(e.frame_id), "", None, None,
                      b"")
        req.t_recv = t_recv
        m = self.metrics
        try:
            m.frames.labels(m.camera_label(req.camera or "_unknown")).inc()
            m.protocol.labels("error").inc()
            log.info("bad frame from camera %r: %s", req.camera, e, extra={"fields": {"reason": e.reason}})
        except Exception as err:  # pragma: no cover - metrics and logging do not fail on clean labels
            log.error("could not count a bad frame: %s", err)
        self.ledger.answer(req, "RECHECK", e.reason)

    def _admit(self, req: Request, t_recv: float, t_wall: float) -> None:
        m = self.metrics
        m.frames.labels(m.camera_label(req.camera)).inc()
        m.protocol.labels(req.kind).inc()
        req.t_recv, req.t_wall = t_recv, t_wall
        if self._stopping:
            self.ledger.answer(req, "RECHECK", P.SHUTTING_DOWN)
            return
        if len(self.batcher) + self._in_decode >= self.batcher.max_queue:
            if self.ledger.answer(req, "RECHECK", P.QUEUE_FULL):
                self._sample_undecoded(req, t_wall, P.QUEUE_FULL)
            return
        deadline = t_recv + (req.deadline_ms or self.cfg.batching.deadline_ms) / 1000.0
        self.ledger.admit(req, t_recv, t_wall, deadline)
        with self._lock:
            self._in_decode += 1
        m.decoding.set(self._in_decode)
        if self.pool is not None:
            self.pool.submit(req)
        else:
            self._decode_task(req)

    def _decode_task(self, req: Request) -> None:
        try:
            if req.answered:  # expired (or refused at shutdown) while waiting for a decode thread
                return
            with self.ledger.guard(req) as handoff:
                self._decode_and_queue(req, handoff)
        finally:
            with self._lock:
                self._in_decode -= 1
            self.metrics.decoding.set(self._in_decode)

    def _decode_and_queue(self, req: Request, handoff: Any) -> None:
        t0 = time.monotonic()
        s = self.cfg.sockets
        try:
            img = decode(req, s.max_pixels, s.max_decoded_bytes)
            try:
                prepared = pp.prepare(img, self.card.input)
            except (ValueError, TypeError) as e:
                raise ProtocolError(P.BAD_SHAPE, str(e), req.camera, req.frame_id) from None
        except ProtocolError as e:
            self.ledger.answer(req, "RECHECK", e.reason)
            return
        except Exception as e:  # an unexpected decoder failure is still just an uninspected frame
            log.warning("decode failed for camera %s frame %s: %s", req.camera, req.frame_id, e)
            self.ledger.answer(req, "RECHECK", P.UNDECODABLE)
            return
        if req.answered:  # its deadline passed during decode: already answered
            return
        stats = pp.image_stats(prepared) if self.monitor is not None else None
        raw = req.encoding == "raw"
        frame = Frame(req, prepared, img if raw else req.payload, "png" if raw else EXT[sniff(req.payload) or "png"],
                      stats, req.t_recv, req.t_wall, req.deadline)
        self.metrics.stage.labels("decode").observe(time.monotonic() - t0)
        handoff.done()
        if time.monotonic() >= req.deadline:
            self.worker.recheck(frame, P.DEADLINE_PASSED)
        elif not self.batcher.put(frame):
            self.worker.recheck(frame, P.SHUTTING_DOWN if self.batcher.closed else P.QUEUE_FULL)

    def _sample_undecoded(self, req: Request, t_wall: float, reason: str) -> None:
        """A frame refused before decoding goes to the store only when its header decodes to a
        plausible image and the per-camera RECHECK sampling budget allows (see Sampler)."""
        if self.sampler is None:
            return
        try:
            self._sample_undecoded_or_raise(req, t_wall, reason)
        except Exception as e:  # sampling is best effort; it never costs a verdict or the I/O loop
            log.error("could not sample camera %r frame %r: %s", req.camera, req.frame_id, e)

    def _sample_undecoded_or_raise(self, req: Request, t_wall: float, reason: str) -> None:
        if req.encoding == "raw":
            import numpy as np

            try:
                original: Any = np.frombuffer(req.payload, req.dtype).reshape(req.shape)
            except (ValueError, TypeError):
                return
            ext = "png"
        else:
            from nexedge.serve.decode import image_info

            fmt = sniff(req.payload)
            info = image_info(req.payload, fmt) if fmt is not None else None
            s = self.cfg.sockets
            if info is None or not 0 < info.pixels <= s.max_pixels or info.nbytes > s.max_decoded_bytes:
                return
            original, ext = req.payload, EXT[fmt]
        self.sampler.submit(original, ext, {
            "camera": req.camera, "frame_id": req.frame_id, "ts": t_wall, "model_id": self.card.model_id,
            "threshold": self.decider.threshold, "score": None, "probs": None, "decision": "RECHECK",
            "reason": reason, "kind": "recheck"})
