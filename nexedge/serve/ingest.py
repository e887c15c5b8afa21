"""Ingest side of the daemon (I/O thread and decode threads): receive, parse, admit or refuse, decode, queue.

Mixed into :class:`nexedge.serve.daemon.Daemon`; uses its ``cfg``, ``metrics``,
``batcher``, ``worker``, ``sampler``, ``card``, ``decider`` and ``ledger``.
Every admitted frame is owned by the ledger (see :mod:`nexedge.serve.ledger`).
Python 3.8, no torch.
"""

import collections
import logging
import threading
import time
from typing import Any, List, Optional, Tuple

import zmq

from nexedge import preprocess as pp
from nexedge.serve import protocol
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
                problem = protocol.WRONG_FRAME_COUNT
            elif size > max_bytes:
                problem = protocol.OVERSIZE
        if problem is None or (parts <= max_parts and len(f) <= protocol.MAX_HEADER_BYTES):
            frames.append(f)  # small parts stay, so an error reply can still name the frame
        del f
    if problem == protocol.WRONG_FRAME_COUNT and size > max_bytes:
        problem = protocol.OVERSIZE
    return Received(frames, parts, size, problem)


class DecodePool:
    """Decode threads fed from per-camera queues, fairly (daemon threads: never block process exit).

    * Cameras take turns (round robin): a camera with many frames waiting does not delay the
      frames of another camera by more than one decode each.
    * No camera occupies more than ``per_camera`` threads at once (default: all but one), so a
      camera whose frames are slow to decode cannot hold every thread.
    * :meth:`admit` bounds what waits: at most ``max_waiting`` frames in all (the caller counts
      batch queue + waiting + decoding against ``batching.max_queue``); when full, the newest frame
      of the camera with the most frames waiting gives way to a frame of a camera with fewer.
    """

    def __init__(self, n: int, fn: Any, per_camera: int = 0) -> None:
        self.per_camera = per_camera if per_camera > 0 else max(1, n - 1)
        self._fn = fn
        self._cv = threading.Condition()
        self._queues = {}  # type: Dict[str, Deque[Any]]
        self._ring = collections.deque()  # type: Deque[str]  # cameras with frames waiting, in turn order
        self._busy = {}  # type: Dict[str, int]
        self.waiting = 0
        self.decoding = 0
        self.displaced = 0
        self._stop = False
        self._threads = [threading.Thread(target=self._run, name=f"nexedge-decode-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def __len__(self) -> int:
        return self.waiting + self.decoding

    def admit(self, req: Any, room: int) -> Tuple[bool, Optional[Any]]:
        """Queue ``req`` when ``room`` > 0; when there is no room, make some by displacing the newest
        waiting frame of the camera with the most waiting, if that is more than ``req``'s camera has.
        Returns (queued, displaced frame to answer RECHECK queue_full, or None)."""
        cam = req.camera
        with self._cv:
            victim = None
            if room <= 0:
                mine = len(self._queues.get(cam, ()))
                longest = max(self._queues, key=lambda c: len(self._queues[c]), default=None)
                if longest is None or len(self._queues[longest]) <= mine:
                    return False, None
                victim = self._queues[longest].pop()
                self._forget(longest)
                self.waiting -= 1
                self.displaced += 1
            q = self._queues.get(cam)
            if q is None:
                q = self._queues[cam] = collections.deque()
                self._ring.append(cam)
            q.append(req)
            self.waiting += 1
            self._cv.notify()
            return True, victim

    def _forget(self, cam: str) -> None:
        """Drop ``cam``'s queue once empty (lock held)."""
        if not self._queues.get(cam):
            self._queues.pop(cam, None)
            try:
                self._ring.remove(cam)
            except ValueError:
                pass

    def purge(self) -> int:
        """Remove frames answered while waiting (deadline passed); returns how many."""
        n = 0
        with self._cv:
            for cam in list(self._queues):
                q = self._queues[cam]
                keep = collections.deque(r for r in q if not r.answered)
                n += len(q) - len(keep)
                self._queues[cam] = keep
                self._forget(cam)
            self.waiting -= n
        return n

    def _take(self) -> Optional[Any]:
        """The next frame in turn whose camera has a free thread (blocks); None to stop."""
        with self._cv:
            while True:
                if self._stop:
                    return None
                for _ in range(len(self._ring)):
                    cam = self._ring[0]
                    self._ring.rotate(-1)  # its turn is used (or skipped while its threads are busy)
                    if self._busy.get(cam, 0) < self.per_camera:
                        req = self._queues[cam].popleft()
                        self._forget(cam)
                        self.waiting -= 1
                        self.decoding += 1
                        self._busy[cam] = self._busy.get(cam, 0) + 1
                        return req
                self._cv.wait(0.5)

    def _release(self, cam: str) -> None:
        with self._cv:
            self.decoding -= 1
            n = self._busy.get(cam, 1) - 1
            if n > 0:
                self._busy[cam] = n
            else:
                self._busy.pop(cam, None)
            self._cv.notify()

    def _run(self) -> None:
        while True:
            req = self._take()
            if req is None:
                return
            try:
                self._fn(req)
            except Exception as e:  # pragma: no cover - the decode task catches everything itself
                log.exception("decode task failed: %s", e)
            finally:
                self._release(req.camera)
            del req  # do not hold the last frame's payload while waiting for the next one

    def shutdown(self) -> None:
        """Ask the threads to stop after their current job; does not wait. Frames still waiting stay
        with the ledger (answered at shutdown)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()


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
    _stopping: bool
    _seq: Any
    n_received: int

    def _on_received(self, rec: Received) -> None:
        """Handle one received message; the message boundary: nothing raised here escapes."""
        t_recv, t_wall = time.monotonic(), time.time()
        self.n_received += 1
        try:
            envelope, body = protocol.split_envelope(rec.frames)
        except Exception:  # pragma: no cover - an identity frame is always there
            return
        req: Optional[Request] = None
        try:
            if rec.problem is not None:
                cam, fid = protocol.peek_ids(body[0], self.cfg.sockets.max_header_bytes) if body else ("", None)
                if rec.problem == protocol.OVERSIZE:
                    raise ProtocolError(protocol.OVERSIZE, f"message of {rec.size} bytes in {rec.parts} parts exceeds "
                                        f"max_message_bytes {self.cfg.sockets.max_message_bytes}", cam, fid)
                raise ProtocolError(protocol.WRONG_FRAME_COUNT, f"expected 2 frames (header, payload), got {rec.parts}",
                                    cam, fid)
            req = protocol.parse_body(envelope, body, self._seq, self.cfg.sockets.max_header_bytes)
        except ProtocolError as e:
            self._refuse(envelope, t_recv, e)
            return
        except Exception as e:  # a parser bug is still just a frame we cannot inspect
            log.exception("unexpected error parsing a message: %s", e)
            self._refuse(envelope, t_recv, ProtocolError(protocol.GARBAGE_HEADER, str(e)))
            return
        try:
            self._admit(req, t_recv, t_wall)
        except Exception as e:
            log.exception("unexpected error admitting camera %r frame %r: %s", req.camera, req.frame_id, e)
            if req.t_recv == 0.0:
                req.t_recv = t_recv
            self.ledger.answer(req, "RECHECK", protocol.BACKEND_ERROR)

    def _refuse(self, envelope: List[bytes], t_recv: float, e: ProtocolError) -> None:
        req = Request(envelope, "error", protocol.readable_camera(e.camera), protocol.readable_frame_id(e.frame_id), "", None, None,
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
            self.ledger.answer(req, "RECHECK", protocol.SHUTTING_DOWN)
            return
        deadline = t_recv + (req.deadline_ms or self.cfg.batching.deadline_ms) / 1000.0
        if self.pool is None:  # decode on this thread
            if len(self.batcher) >= self.batcher.max_queue:
                self._queue_full(req, t_wall)
                return
            self.ledger.admit(req, t_recv, t_wall, deadline)
            self._decode_task(req)
            return
        self.ledger.admit(req, t_recv, t_wall, deadline)
        queued, displaced = self.pool.admit(req, self.batcher.max_queue - len(self.batcher) - len(self.pool))
        if displaced is not None:  # a camera with more frames waiting gave way to this one
            self._queue_full(displaced, displaced.t_wall)
        if not queued:
            self._queue_full(req, t_wall)
        m.decoding.set(self.pool.decoding)
        m.decode_waiting.set(self.pool.waiting)

    def _queue_full(self, req: Request, t_wall: float) -> None:
        if self.ledger.answer(req, "RECHECK", protocol.QUEUE_FULL):
            self._sample_undecoded(req, t_wall, protocol.QUEUE_FULL)

    def _decode_task(self, req: Request) -> None:
        if req.answered:  # expired (or refused at shutdown) while waiting for a decode thread
            return
        with self.ledger.guard(req) as handoff:
            self._decode_and_queue(req, handoff)

    def _decode_and_queue(self, req: Request, handoff: Any) -> None:
        t0 = time.monotonic()
        lim = self.cfg.sockets.decode_limits
        try:
            img = decode(req, lim.max_pixels, lim.max_decoded_bytes, lim.max_jpeg_scans)
            try:
                prepared = pp.prepare(img, self.card.input, req.bit_depth or self.cfg.sockets.uint16_bit_depth)
            except (ValueError, TypeError) as e:
                raise ProtocolError(protocol.BAD_SHAPE, str(e), req.camera, req.frame_id) from None
        except ProtocolError as e:
            self.ledger.answer(req, "RECHECK", e.reason)
            return
        except Exception as e:  # an unexpected decoder failure is still just an uninspected frame
            log.warning("decode failed for camera %s frame %s: %s", req.camera, req.frame_id, e)
            self.ledger.answer(req, "RECHECK", protocol.UNDECODABLE)
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
            self.worker.recheck(frame, protocol.DEADLINE_PASSED)
        elif not self.batcher.put(frame):
            self.worker.recheck(frame, protocol.SHUTTING_DOWN if self.batcher.closed else protocol.QUEUE_FULL)

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
            lim = self.cfg.sockets.decode_limits
            if info is None or not 0 < info.pixels <= lim.max_pixels or info.nbytes > lim.max_decoded_bytes:
                return
            original, ext = req.payload, EXT[fmt]
        self.sampler.submit(original, ext, {
            "camera": req.camera, "frame_id": req.frame_id, "ts": t_wall, "model_id": self.card.model_id,
            "threshold": self.decider.threshold, "score": None, "probs": None, "decision": "RECHECK",
            "reason": reason, "kind": "recheck"})
