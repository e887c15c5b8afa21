"""Small client library for the line daemon (native protocol v1, DEALER socket).

    with CameraClient("tcp://127.0.0.1:5555", camera="cam1") as cam:
        fid = cam.send(image)                  # async; returns the frame id
        verdict = cam.recv(timeout_ms=1000)    # next verdict (any frame), or None
        verdict = cam.infer(image)             # send and wait for that frame's verdict

Verdicts are dicts (see docs/protocol.md) with ``rtt_ms`` added (client-side
round trip). One client per thread; ZeroMQ sockets are not thread-safe.
Python 3.8, no torch.
"""

import itertools
import json
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import zmq

from nexedge.serve import protocol
from nexedge.serve.decode import sniff


class DaemonTimeout(TimeoutError):
    """No verdict within the timeout (treat the device as not inspected)."""


class CameraClient:
    """Native DEALER client: many frames in flight, verdicts matched by frame id."""

    def __init__(self, endpoint: str, camera: str, context: Optional[zmq.Context] = None,
                 hwm: int = 10000, curve: Any = None) -> None:
        self.camera = camera
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        if curve is not None:  # nexedge.serve.auth.CurveClient (or anything with apply_client(socket))
            curve.apply_client(self.sock)
        self.sock.connect(endpoint)
        self.pending: Dict[Any, float] = {}
        self._ids = itertools.count(1)
        self._early: Dict[Any, Dict[str, Any]] = {}

    # -- sending ---------------------------------------------------------------
    def send(self, image: Union[np.ndarray, bytes, None] = None, frame_id: protocol.FrameId = None,
             encoding: Optional[str] = None, deadline_ms: Optional[float] = None) -> protocol.FrameId:
        """Send a numpy image (raw) or encoded bytes (JPEG/PNG/BMP/TIFF, sniffed); returns the frame id."""
        fid = next(self._ids) if frame_id is None else frame_id
        if isinstance(image, np.ndarray):
            arr = np.ascontiguousarray(image)
            header = protocol.native_header(self.camera, fid, "raw", str(arr.dtype), arr.shape, time.time(), deadline_ms)
            payload: Any = arr
        else:
            data = bytes(image or b"")
            # Not JPEG/PNG/BMP: let the daemon answer (RECHECK undecodable), as it would for any camera.
            enc = encoding or sniff(data) or "auto"
            header = protocol.native_header(self.camera, fid, enc, ts=time.time(), deadline_ms=deadline_ms)
            payload = data
        self.send_frames([b"", header, payload])
        self.pending[fid] = time.monotonic()
        return fid

    def send_frames(self, frames: Sequence[Any]) -> None:
        """Send raw frames as they are (for tests of malformed input)."""
        self.sock.send_multipart(list(frames), copy=False)

    # -- receiving -------------------------------------------------------------
    def recv(self, timeout_ms: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Next verdict, or None after ``timeout_ms`` (None waits forever)."""
        if self._early:
            return self._early.pop(next(iter(self._early)))
        if timeout_ms is not None and not self.sock.poll(timeout_ms, zmq.POLLIN):
            return None
        parts = self.sock.recv_multipart()
        v = json.loads(parts[-1].decode("utf-8"))
        t = self.pending.pop(v.get("frame_id"), None)
        if t is not None:
            v["rtt_ms"] = (time.monotonic() - t) * 1000.0
        return v

    def wait_for(self, frame_id: protocol.FrameId, timeout_ms: int = 5000) -> Dict[str, Any]:
        """The verdict of ``frame_id``; verdicts of other frames are kept for :meth:`recv`."""
        if frame_id in self._early:
            return self._early.pop(frame_id)
        end = time.monotonic() + timeout_ms / 1000.0
        while True:
            left = int((end - time.monotonic()) * 1000)
            if left <= 0:
                raise DaemonTimeout(f"no verdict for camera {self.camera} frame {frame_id} within {timeout_ms} ms")
            if not self.sock.poll(left, zmq.POLLIN):
                continue
            parts = self.sock.recv_multipart()
            v = json.loads(parts[-1].decode("utf-8"))
            t = self.pending.pop(v.get("frame_id"), None)
            if t is not None:
                v["rtt_ms"] = (time.monotonic() - t) * 1000.0
            if v.get("frame_id") == frame_id:
                return v
            self._early[v.get("frame_id")] = v

    def infer(self, image: Union[np.ndarray, bytes], timeout_ms: int = 5000) -> Dict[str, Any]:
        """Send one frame and wait for its verdict."""
        return self.wait_for(self.send(image), timeout_ms)

    def drain(self, timeout_ms: int = 5000) -> List[Dict[str, Any]]:
        """Collect verdicts until none are pending or the timeout passes."""
        out: List[Dict[str, Any]] = []
        end = time.monotonic() + timeout_ms / 1000.0
        while (self.pending or self._early) and time.monotonic() < end:
            v = self.recv(timeout_ms=max(1, int((end - time.monotonic()) * 1000)))
            if v is not None:
                out.append(v)
        return out

    def close(self) -> None:
        self.sock.close(linger=0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> "CameraClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VerdictSubscriber:
    """SUB socket on the daemon's verdict PUB socket; ``cameras`` empty = all."""

    def __init__(self, endpoint: str, cameras: Sequence[str] = (), context: Optional[zmq.Context] = None,
                 curve: Any = None) -> None:
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply_client(self.sock)
        for cam in cameras or [""]:
            self.sock.setsockopt(zmq.SUBSCRIBE, cam.encode("utf-8"))
        self.cameras = set(cameras)
        self.sock.connect(endpoint)

    def recv(self, timeout_ms: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Next verdict of a subscribed camera (exact topic match), or None after the timeout."""
        end = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0
        while True:
            left = None if end is None else max(0, int((end - time.monotonic()) * 1000))
            if left is not None and (left == 0 or not self.sock.poll(left, zmq.POLLIN)):
                return None
            topic, data = self.sock.recv_multipart()
            if self.cameras and topic.decode("utf-8", "replace") not in self.cameras:
                continue  # SUB matches prefixes: "cam1" would also get "cam10"
            return json.loads(data.decode("utf-8"))

    def close(self) -> None:
        self.sock.close(linger=0)
        if self._own_ctx:
            self.ctx.term()
