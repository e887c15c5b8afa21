"""Verdicts from worker threads to the I/O thread (ZeroMQ sockets are not thread-safe).

Each producer thread gets its own inproc PUSH socket; the I/O thread owns the
PULL end and forwards to the ROUTER (reply) and PUB (publish) sockets.
Python 3.8, no torch.
"""

import itertools
import threading
from typing import Callable, List

import zmq

_ids = itertools.count()


class Outbox:
    def __init__(self, ctx: zmq.Context) -> None:
        self.ctx = ctx
        self.addr = f"inproc://nexedge-verdicts-{next(_ids)}"
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, 0)
        self.pull.bind(self.addr)
        self._local = threading.local()
        self._socks: List[zmq.Socket] = []
        self._lock = threading.Lock()

    def _sock(self) -> zmq.Socket:
        s = getattr(self._local, "sock", None)
        if s is None:
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, 0)  # bounded by the daemon's queues, never drop a verdict here
            s.setsockopt(zmq.LINGER, 0)
            s.connect(self.addr)
            self._local.sock = s
            with self._lock:
                self._socks.append(s)
        return s

    def send(self, envelope: List[bytes], camera: bytes, data: bytes) -> None:
        """Queue one verdict for the I/O thread (called from any non-I/O thread)."""
        self._sock().send_multipart([bytes([len(envelope)])] + envelope + [camera, data])

    def forward(self, send: Callable[[List[bytes], bytes, bytes], None]) -> int:
        """Forward everything queued to ``send(envelope, camera, data)``; I/O thread only."""
        n = 0
        while True:
            try:
                parts = self.pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return n
            k = parts[0][0]
            send(parts[1:1 + k], parts[1 + k], parts[2 + k])
            n += 1

    def close(self) -> None:
        with self._lock:
            for s in self._socks:
                s.close(linger=0)
            self._socks.clear()
        self.pull.close(linger=0)
