"""Bounded dynamic batching queue (the Triton / nvstreammux rule).

A batch closes when it holds ``max_batch`` items or ``max_delay`` seconds after
its first (oldest) item was queued. The queue holds at most ``max_queue``
items; :meth:`Batcher.put` refuses beyond that instead of growing. Items whose
deadline has passed are handed back separately so the caller answers them.
Python 3.8, no torch.
"""

import collections
import threading
import time
from typing import Any, Deque, List, Tuple


class Batcher:
    """Thread-safe queue of items with ``t_queued`` and ``deadline`` (monotonic seconds)."""

    def __init__(self, max_batch: int, max_delay_s: float, max_queue: int) -> None:
        if max_batch < 1 or max_queue < max_batch or max_delay_s < 0:
            raise ValueError(f"bad batcher sizes: max_batch={max_batch}, max_queue={max_queue}, "
                             f"max_delay_s={max_delay_s}")
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._q: Deque[Any] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._q)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: Any) -> bool:
        """Queue ``item`` (sets ``item.t_queued``); False when full or closed."""
        with self._cv:
            if self._closed or len(self._q) >= self.max_queue:
                return False
            item.t_queued = time.monotonic()
            self._q.append(item)
            if len(self._q) == 1 or len(self._q) >= self.max_batch:
                self._cv.notify()
            return True

    def _take_expired(self, now: float) -> List[Any]:
        if not any(it.deadline <= now for it in self._q):
            return []
        keep: Deque[Any] = collections.deque()
        gone = []
        for it in self._q:
            (gone if it.deadline <= now else keep).append(it)
        self._q = keep
        return gone

    def expire(self, now: float = 0.0) -> List[Any]:
        """Remove and return queued items whose deadline has passed."""
        with self._cv:
            return self._take_expired(now or time.monotonic())

    def next_batch(self, timeout: float) -> Tuple[List[Any], List[Any]]:
        """Block up to ``timeout`` for a batch; returns (batch, expired). Both may be empty."""
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                now = time.monotonic()
                expired = self._take_expired(now)
                if expired:
                    return [], expired
                if self._q:
                    close_at = self._q[0].t_queued + self.max_delay_s
                    if len(self._q) >= self.max_batch or now >= close_at or self._closed:
                        n = min(self.max_batch, len(self._q))
                        return [self._q.popleft() for _ in range(n)], []
                    wait = min(close_at, self._q[0].deadline) - now
                else:
                    if self._closed or now >= end:
                        return [], []
                    wait = end - now
                self._cv.wait(max(wait, 0.0002))

    def close(self) -> List[Any]:
        """Refuse new items; return (and remove) everything still queued."""
        with self._cv:
            self._closed = True
            items = list(self._q)
            self._q.clear()
            self._cv.notify_all()
            return items

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()
