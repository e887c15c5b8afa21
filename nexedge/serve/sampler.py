"""Background writer to the uncertain-sample store; never blocks inference.

The inference thread calls :meth:`Sampler.submit` (non-blocking). A queue
bounded by count *and* bytes feeds one writer thread; when it is full the
sample is dropped and counted, inspection goes on. Raw frames are PNG-encoded
here, off the hot path.

RECHECK samples (frames the daemon could not inspect: overload, deadline,
backend error) are the cheapest thing for a hostile or broken client to
produce, so they are rate-limited per camera (a token bucket,
``recheck_per_minute``) and deduplicated (the same bytes are kept once per
``DEDUPE_WINDOW`` recent samples); cameras beyond ``max_cameras`` share one
bucket. Uncertain (band), drift and audit samples are not limited here.
Python 3.8, no torch.
"""

import collections
import hashlib
import logging
import queue
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Set, Union

import numpy as np

from nexedge.serve.decode import encode_png
from nexedge.serve.prometheus import DaemonMetrics

log = logging.getLogger("nexedge.serve.sampler")
Image = Union[bytes, memoryview, np.ndarray]


class Sampler:
    """Owns the store; ``store`` needs ``add(image_bytes, ext, meta) -> Optional[int]`` and ``close()``."""

    def __init__(self, store: Any, metrics: DaemonMetrics, max_queue: int = 512, max_queue_bytes: int = 64 << 20,
                 recheck_per_minute: float = 6.0, max_cameras: int = 256) -> None:
        self.store = store
        self.metrics = metrics
        self.max_queue_bytes = int(max_queue_bytes)
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self._limiter = RecheckLimiter(recheck_per_minute, max_cameras)
        self._thread = threading.Thread(target=self._run, name="nexedge-sampler", daemon=True)
        self._last_full_log = 0.0
        self._stats: Optional[Dict[str, Any]] = None
        self._stats_at = -1e9
        self.written = 0
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def submit(self, image: Image, ext: str, meta: Dict[str, Any]) -> bool:
        """Queue one sample; False (and counted) when the writer is behind, the queue's bytes are
        spent, or a RECHECK sample is over its camera's budget or a duplicate."""
        nbytes = int(image.nbytes) if isinstance(image, (np.ndarray, memoryview)) else len(image)
        if meta.get("kind") == "recheck":
            why = self._limiter.refuse(str(meta.get("camera") or ""), image)
            if why is not None:
                self.metrics.samples_dropped.labels(why).inc()
                return False
        with self._bytes_lock:
            if self._queued_bytes + nbytes > self.max_queue_bytes:
                self.metrics.samples_dropped.labels("writer_behind").inc()
                return False
            self._queued_bytes += nbytes
        if isinstance(image, memoryview):
            image = bytes(image)  # the zmq frame buffer may be reused after the reply
        try:
            self._q.put_nowait((image, ext, meta, nbytes))
            return True
        except queue.Full:
            with self._bytes_lock:
                self._queued_bytes -= nbytes
            self.metrics.samples_dropped.labels("writer_behind").inc()
            return False

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            image, ext, meta, nbytes = item
            with self._bytes_lock:
                self._queued_bytes -= nbytes
            try:
                if isinstance(image, np.ndarray):
                    image, ext = encode_png(image), "png"
                row = self.store.add(image, ext, meta)
            except Exception as e:  # a store problem must never stop inspection
                self.metrics.samples_dropped.labels("store_error").inc()
                log.error("sample store write failed: %s", e)
                continue
            if row is None:
                why = "disk_full" if getattr(self.store, "full_reason", "quota") == "disk_full" else "store_full"
                self.metrics.store_full.inc()
                self.metrics.samples_dropped.labels(why).inc()
                now = time.monotonic()
                if now - self._last_full_log > 60:
                    self._last_full_log = now
                    log.warning("sample store full (%s); samples are being dropped, inspection continues",
                                "free space under store.reserve" if why == "disk_full" else "quota reached")
            else:
                self.written += 1
                self.metrics.samples.labels(meta.get("kind", "band")).inc()

    def collect(self) -> List[Any]:
        """Store figures at scrape time (registered by the daemon): disk use, quota, free space, full, evictions."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.store
        now = time.monotonic()
        if now - self._stats_at > 5.0:  # stats() walks the image folders: at most every 5 s
            try:
                self._stats = st.stats()
            except Exception as e:  # the store may be closing
                log.error("store stats failed: %s", e)
            self._stats_at = now
        s = self._stats or {}
        g = [GaugeMetricFamily("nexedge_store_used_bytes", "Disk the sample store takes (files, folders, database, "
                               "WAL), as store.quota counts it", value=float(s.get("used_bytes", 0))),
             GaugeMetricFamily("nexedge_store_free_bytes", "Free space on the store's file system",
                               value=float(s.get("free_bytes", 0))),
             GaugeMetricFamily("nexedge_store_reserve_bytes", "store.reserve: free space the store leaves",
                               value=float(getattr(st, "reserve_bytes", 0))),
             ]
        room = GaugeMetricFamily("nexedge_store_out_of_room", "1 while samples are dropped for want of room, by "
                                 "reason (quota: store.quota; disk_full: free space under store.reserve)",
                                 labels=["reason"])
        for why in ("quota", "disk_full"):
            room.add_metric([why], 1.0 if getattr(st, "full", False) and getattr(st, "full_reason", "") == why else 0.0)
        g.append(room)
        if getattr(st, "quota_bytes", None):
            g.append(GaugeMetricFamily("nexedge_store_quota_bytes", "store.quota", value=float(st.quota_bytes)))
        ev = CounterMetricFamily("nexedge_store_evicted", "Samples deleted by retention, by kind", labels=["kind"])
        for k, n in dict(getattr(st, "evicted_by_kind", {})).items():
            ev.add_metric([k], float(n))
        err = CounterMetricFamily("nexedge_store_write_errors", "Writes the file system refused (ENOSPC, SQLite full)",
                                  value=float(getattr(st, "write_errors", 0)))
        return g + [ev, err]

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


#: RECHECK samples remembered for deduplication (sha1 of the bytes, across cameras).
DEDUPE_WINDOW = 4096


class RecheckLimiter:
    """Per-camera token bucket (burst = one minute's budget) plus a dedupe set of recent images."""

    def __init__(self, per_minute: float, max_cameras: int = 256) -> None:
        self.rate = float(per_minute) / 60.0
        self.burst = max(float(per_minute), 1.0)
        self.max_cameras = int(max_cameras)
        self._buckets: Dict[str, list] = {}
        self._seen: Set[bytes] = set()
        self._order: Deque[bytes] = collections.deque()
        self._lock = threading.Lock()

    def _bucket(self, camera: str, now: float) -> list:
        """[tokens, last refill] of ``camera`` (or of ``_other`` past max_cameras), refilled to ``now``."""
        key = camera if (camera in self._buckets or len(self._buckets) < self.max_cameras) else "_other"
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = [self.burst, now]
        b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
        b[1] = now
        return b

    def refuse(self, camera: str, image: Image, now: Optional[float] = None) -> Optional[str]:
        """None to keep the sample, else the drop reason (``recheck_rate`` or ``duplicate``)."""
        if self.rate <= 0:
            return "recheck_rate"
        now = time.monotonic() if now is None else now
        with self._lock:
            b = self._bucket(camera, now)
            if b[0] < 1.0:  # out of budget: refuse before hashing anything
                return "recheck_rate"
        digest = hashlib.sha1(image if not isinstance(image, np.ndarray) else np.ascontiguousarray(image)).digest()
        with self._lock:
            if digest in self._seen:
                return "duplicate"
            if b[0] < 1.0:
                return "recheck_rate"
            b[0] -= 1.0
            self._seen.add(digest)
            self._order.append(digest)
            if len(self._order) > DEDUPE_WINDOW:
                self._seen.discard(self._order.popleft())
        return None
