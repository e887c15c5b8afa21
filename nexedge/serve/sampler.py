"""Background writer to the uncertain-sample store; never blocks inference.

The inference thread calls :meth:`Sampler.submit` (non-blocking). A bounded
queue feeds one writer thread; when the queue is full the sample is dropped and
counted, inspection goes on. Raw frames are PNG-encoded here, off the hot path.
Python 3.8, no torch.
"""

import logging
import queue
import threading
import time
from typing import Any, Dict, Union

import numpy as np

from nexedge.serve.decode import encode_png
from nexedge.serve.metrics import DaemonMetrics

log = logging.getLogger("nexedge.serve.sampler")
Image = Union[bytes, memoryview, np.ndarray]


class Sampler:
    """Owns the store; ``store`` needs ``add(image_bytes, ext, meta) -> Optional[int]`` and ``close()``."""

    def __init__(self, store: Any, metrics: DaemonMetrics, max_queue: int = 512) -> None:
        self.store = store
        self.metrics = metrics
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="nexedge-sampler", daemon=True)
        self._last_full_log = 0.0
        self.written = 0
        self._thread.start()

    def submit(self, image: Image, ext: str, meta: Dict[str, Any]) -> bool:
        """Queue one sample; False (and counted) when the writer is behind."""
        if isinstance(image, memoryview):
            image = bytes(image)  # the zmq frame buffer may be reused after the reply
        try:
            self._q.put_nowait((image, ext, meta))
            return True
        except queue.Full:
            self.metrics.samples_dropped.labels("writer_behind").inc()
            return False

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            image, ext, meta = item
            try:
                if isinstance(image, np.ndarray):
                    image, ext = encode_png(image), "png"
                row = self.store.add(image, ext, meta)
            except Exception as e:  # a store problem must never stop inspection
                self.metrics.samples_dropped.labels("store_error").inc()
                log.error("sample store write failed: %s", e)
                continue
            if row is None:
                self.metrics.store_full.inc()
                self.metrics.samples_dropped.labels("store_full").inc()
                now = time.monotonic()
                if now - self._last_full_log > 60:
                    self._last_full_log = now
                    log.warning("sample store full (quota reached); samples are being dropped, inspection continues")
            else:
                self.written += 1
                self.metrics.samples.labels(meta.get("kind", "band")).inc()

    def close(self, timeout: float = 10.0) -> bool:
        """Write what is queued (up to ``timeout``), then close the store. True if all were written."""
        end = time.monotonic() + timeout
        while True:
            try:
                self._q.put(None, timeout=max(end - time.monotonic(), 0.01))
                break
            except queue.Full:
                if time.monotonic() >= end:
                    break
        self._thread.join(timeout=max(end - time.monotonic(), 0.1))
        done = not self._thread.is_alive()
        if not done:
            # Closing SQLite under a running writer is worse than leaving it: WAL recovers on the next open.
            log.error("sample writer did not finish within %.1f s; %d samples not written", timeout, self._q.qsize())
            return False
        try:
            self.store.close()
        except Exception as e:
            log.error("closing the sample store failed: %s", e)
        return done
