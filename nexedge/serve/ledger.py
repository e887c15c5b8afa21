"""The one owner of every frame's lifetime: exactly one answer per frame, on every path.

A frame is *admitted* (given its receive time and deadline) before any work is
done on it. From then on the ledger holds it until its one answer:

* the normal path answers it (verdict, or RECHECK with a reason);
* :meth:`Ledger.guard` answers it at once when the code working on it raises
  or returns without answering or handing it on;
* :meth:`Ledger.expire` (the I/O thread, every loop) answers RECHECK
  ``deadline_passed`` the moment its deadline passes, wherever it is: waiting
  for a decode thread, in decode, queued for a batch, in a batch;
* :meth:`Ledger.answer_all` answers what is left at shutdown.

A later answer attempt is a no-op (returns False), so the stages need no
convention between them. :meth:`Ledger.answer` never raises: the delivery
callback's failures are logged and counted.

Python 3.8, no torch.
"""

import contextlib
import logging
import threading
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional

from nexedge.serve import protocol
from nexedge.serve.protocol import Request

log = logging.getLogger("nexedge.serve")

# deliver(req, decision, reason, latency_s, score, uncertain, probs): build and send the reply.
Deliver = Callable[[Request, str, str, float, Optional[float], bool, Optional[Dict[str, float]]], None]


class Ledger:
    """Thread-safe registry of admitted, unanswered frames."""

    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._lock = threading.Lock()
        self._open: Dict[int, Request] = {}
        self.answered = 0
        self.delivery_errors = 0

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, req: Request, t_recv: float, t_wall: float, deadline: float) -> None:
        req.t_recv, req.t_wall, req.deadline = t_recv, t_wall, deadline
        with self._lock:
            self._open[id(req)] = req

    def answer(self, req: Request, decision: str, reason: str, score: Optional[float] = None,
               uncertain: bool = False, probs: Optional[Dict[str, float]] = None) -> bool:
        """Send ``req``'s one answer; False (nothing sent) when it was answered before. Never raises."""
        with self._lock:
            if req.answered:
                return False
            req.answered = True
            self.answered += 1
            self._open.pop(id(req), None)
        if decision == "PASS" and score is None:  # a device that was not inspected is never PASSed
            decision, reason = "RECHECK", protocol.BACKEND_ERROR
        try:
            latency = time.monotonic() - req.t_recv if req.t_recv else 0.0
            self._deliver(req, decision, reason, latency, score, uncertain, probs)
        except Exception as e:  # the answer path must not throw into whoever answered
            self.delivery_errors += 1
            log.error("could not deliver the verdict of camera %r frame %r: %s", req.camera, req.frame_id, e)
        return True

    def expire(self, now: float) -> List[Request]:
        """Answer every frame whose deadline has passed RECHECK deadline_passed; returns those answered."""
        with self._lock:
            late = [r for r in self._open.values() if r.deadline <= now]
        return [r for r in late if self.answer(r, "RECHECK", protocol.DEADLINE_PASSED)]

    def answer_all(self, reason: str, keep: Iterable[Request] = ()) -> int:
        """Answer every open frame RECHECK ``reason`` except those in ``keep`` (e.g. the batch in flight)."""
        skip = {id(r) for r in keep}
        with self._lock:
            todo = [r for k, r in self._open.items() if k not in skip]
        return sum(self.answer(r, "RECHECK", reason) for r in todo)

    def open_requests(self) -> List[Request]:
        with self._lock:
            return list(self._open.values())

    @contextlib.contextmanager
    def guard(self, req: Request, reason: str = protocol.BACKEND_ERROR) -> Iterator["Handoff"]:
        """Work on ``req``: if the block raises, or ends with ``req`` neither answered nor
        handed on (``handoff.done()``), it is answered RECHECK ``reason`` at once."""
        h = Handoff()
        try:
            yield h
        except Exception as e:
            log.exception("error while handling camera %r frame %r: %s", req.camera, req.frame_id, e)
            self.answer(req, "RECHECK", reason)
            return
        if not h.handed:
            self.answer(req, "RECHECK", reason)


class Handoff:
    """Marks that a frame inside :meth:`Ledger.guard` was handed to the next stage."""

    __slots__ = ("handed",)

    def __init__(self) -> None:
        self.handed = False

    def done(self) -> None:
        self.handed = True

