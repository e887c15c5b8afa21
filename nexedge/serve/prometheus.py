"""Prometheus metrics of the daemon (own registry) and the HTTP endpoint with
``/metrics``, ``/live`` and ``/ready``. Names are listed in docs/metrics.md.
Python 3.8, no torch.
"""

import http
import logging
import selectors
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LAT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
OTHER_CAMERA = "_other"
log = logging.getLogger("nexedge.serve")


class DaemonMetrics:
    """Every metric the daemon exports, on a private registry."""

    def __init__(self, max_cameras: int = 256) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._cameras: set = set()
        self._max_cameras = max_cameras
        self._lock = threading.Lock()
        self.frames = Counter("nexedge_frames_received", "Frames received, per camera", ["camera"], registry=r)
        self.verdicts = Counter("nexedge_verdicts", "Verdicts sent, by decision", ["decision"], registry=r)
        self.rechecks = Counter("nexedge_recheck", "RECHECK verdicts, by reason", ["reason"], registry=r)
        self.uncertain = Counter("nexedge_uncertain", "Inferred frames inside the uncertain band", registry=r)
        self.batch_size = Histogram("nexedge_batch_size", "Images per inference batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.stage = Histogram("nexedge_stage_seconds", "Time per frame or batch in each pipeline stage",
                               ["stage"], buckets=LAT_BUCKETS, registry=r)
        self.queue_wait = Histogram("nexedge_queue_wait_seconds", "Time a decoded frame waited for its batch",
                                    buckets=LAT_BUCKETS, registry=r)
        self.inference = Histogram("nexedge_inference_seconds", "Backend time per batch (preprocess + run)",
                                   buckets=LAT_BUCKETS, registry=r)
        self.e2e = Histogram("nexedge_end_to_end_seconds", "Receive to verdict, per frame (every decision)",
                             buckets=LAT_BUCKETS, registry=r)
        self.queue_depth = Gauge("nexedge_queue_depth", "Frames waiting for a batch", registry=r)
        self.decoding = Gauge("nexedge_decode_in_flight", "Frames being decoded", registry=r)
        self.decode_waiting = Gauge("nexedge_decode_waiting", "Admitted frames waiting for a decode thread",
                                    registry=r)
        self.ready = Gauge("nexedge_ready", "1 when model loaded, warmed up and sockets bound", registry=r)
        self.model = Info("nexedge_model", "Model and decision settings in use", registry=r)
        self.threshold = Gauge("nexedge_threshold", "Decision threshold on the defect score", registry=r)
        self.tpr_lower95 = Gauge("nexedge_threshold_tpr_lower95",
                                 "95% lower bound on TPR of the card's operating point in use (NaN when unknown)",
                                 registry=r)
        self.expected_escape_rate = Gauge(
            "nexedge_threshold_expected_escape_rate",
            "Chance that a new defect like the card's validation defects scores below the threshold in use, "
            "(missed + 1) / (validation defects + 1) (NaN when the threshold is not the card's)", registry=r)
        self.weak_operating_point = Gauge("nexedge_weak_operating_point",
                                          "1 when that TPR lower bound is below decision.tpr_floor", registry=r)
        self.samples = Counter("nexedge_samples_saved", "Samples written to the uncertain store, by kind", ["kind"],
                               registry=r)
        self.samples_dropped = Counter("nexedge_samples_dropped", "Samples not stored, by reason", ["reason"],
                                       registry=r)
        self.store_full = Counter("nexedge_store_full", "Store refused a sample because its quota is full",
                                  registry=r)
        self.alarms = Counter("nexedge_monitor_alarms", "Shift-monitor alarms raised", ["camera", "alarm"],
                              registry=r)
        self.protocol = Counter("nexedge_requests", "Parsed requests by peer kind", ["kind"], registry=r)

    def camera_label(self, camera: str) -> str:
        """Bound label cardinality: cameras beyond ``max_cameras`` share one label."""
        if camera in self._cameras:
            return camera
        with self._lock:
            if len(self._cameras) < self._max_cameras:
                self._cameras.add(camera)
                return camera
        return OTHER_CAMERA

    def add_snapshot_collector(self, name: str, fn: Callable[[], Dict[str, Any]],
                               other: Optional[Callable[[], int]] = None) -> None:
        """Export the shift monitor's ``snapshot()`` at scrape time (see :class:`_SnapshotCollector`)."""
        self.registry.register(_SnapshotCollector(name, fn, other))

    def add_counter_callback(self, name: str, doc: str, label: str, fn: Callable[[], Dict[str, int]]) -> None:
        """Export counts kept elsewhere (e.g. CURVE refusals) as a labelled counter, read at scrape time."""
        self.registry.register(_CounterCollector(name, doc, label, fn))


    def add_families(self, fn: Callable[[], Iterable[Any]]) -> None:
        """Export metric families built at scrape time by ``fn`` (model slots, shadow statistics)."""
        self.registry.register(_FamilyCollector(fn))


class _FamilyCollector:
    def __init__(self, fn: Callable[[], Iterable[Any]]) -> None:
        self.fn = fn

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        try:
            fams = list(self.fn() or [])
        except Exception as e:  # a broken collector must not break the scrape
            log.error("metrics collector failed: %s", e)
            fams = []
        yield from fams


class _CounterCollector:
    def __init__(self, name: str, doc: str, label: str, fn: Callable[[], Dict[str, int]]) -> None:
        self.name, self.doc, self.label, self.fn = name, doc, label, fn

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        fam = CounterMetricFamily(self.name, self.doc, labels=[self.label])
        try:
            counts = self.fn() or {}
        except Exception:
            counts = {}
        for key, v in counts.items():
            fam.add_metric([str(key)], float(v))
        yield fam


#: Shift-monitor statistics exported as one gauge family each, per camera (docs/metrics.md).
MONITOR_STATS = ("psi", "brightness", "contrast", "sharpness", "uncertain_frac", "mean_score", "reject_rate",
                 "defect_prior")


class _SnapshotCollector:
    """Shift-monitor snapshot at scrape time: ``nexedge_monitor{camera,key}`` (frames, window),
    ``nexedge_monitor_<stat>{camera}`` for each of :data:`MONITOR_STATS` that has a value,
    ``nexedge_monitor_alarm_active{camera,stat}``, and the overflow counter. Cameras are bounded
    by the monitor itself (``_other`` past ``max_cameras``)."""

    def __init__(self, name: str, fn: Callable[[], Dict[str, Any]], other: Optional[Callable[[], int]] = None) -> None:
        self.name = name
        self.fn = fn
        self.other = other

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        fam = GaugeMetricFamily(self.name, "Shift-monitor frame counts per camera", labels=["camera", "key"])
        stats = {k: GaugeMetricFamily(f"{self.name}_{k}", f"Shift monitor: {k} over the window, per camera",
                                      labels=["camera"]) for k in MONITOR_STATS}
        active = GaugeMetricFamily(f"{self.name}_alarm_active", "1 while a shift alarm is active", labels=["camera",
                                                                                                          "stat"])
        try:
            snap = self.fn() or {}
        except Exception:  # a broken snapshot must not break the scrape
            snap = {}
        for camera, values in snap.items():
            if not isinstance(values, dict):
                continue
            cam = str(camera)
            for key, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    fam.add_metric([cam, str(key)], float(v))
            for key, v in (values.get("values") or {}).items():
                if key in stats and isinstance(v, (int, float)) and not isinstance(v, bool):
                    stats[key].add_metric([cam], float(v))
            for key in values.get("alarms") or ():
                active.add_metric([cam, str(key)], 1.0)
        yield fam
        yield from stats.values()
        yield active
        if self.other is not None:
            other = CounterMetricFamily(f"{self.name}_other_frames", "Frames from cameras past max_cameras, "
                                        "monitored together as camera _other")
            try:
                other.add_metric([], float(self.other()))
            except Exception:
                other.add_metric([], 0.0)
            yield other


def model_slot_families(slots: Dict[str, Any], changes: Dict[str, int]) -> List[Any]:
    """The lifecycle's families: one ``nexedge_model_slot`` per loaded model, its memory, and the
    model changes by action (``slots``: slot name -> Slot or None; ``changes``: action -> count)."""
    slot = GaugeMetricFamily("nexedge_model_slot", "1 per loaded model, by slot", labels=["slot", "model_id"])
    mem = GaugeMetricFamily("nexedge_model_memory_bytes", "Estimated resident bytes per model slot "
                            "(RSS growth at its load, at least the artifact size)", labels=["slot"])
    for name, s in slots.items():
        if s is not None:
            slot.add_metric([name, s.model_id], 1.0)
            mem.add_metric([name], float(s.footprint))
    family = CounterMetricFamily("nexedge_model_changes", "Model lifecycle changes, by action "
                                 "(load, promote, rollback, unload, auto_rollback, auto_rollback_skipped)",
                                 labels=["action"])
    for k in ("load", "promote", "rollback", "unload", "auto_rollback", "auto_rollback_skipped"):
        family.add_metric([k], float(changes.get(k, 0)))
    return [slot, mem, family]


def is_loopback_host(host: str) -> bool:
    h = host.strip("[]").lower()
    return h == "localhost" or h == "::1" or h.startswith("127.")


#: Request head (request line + headers) a health or metrics request may send.
MAX_REQUEST_BYTES = 8192


class _Conn:
    __slots__ = ("sock", "client", "t0", "buf", "out", "sent")

    def __init__(self, sock: socket.socket, client: str, t0: float) -> None:
        self.sock, self.client, self.t0 = sock, client, t0
        self.buf = b""
        self.out: Optional[bytes] = None  # the reply, once the request is complete
        self.sent = 0


class HealthServer:
    """HTTP endpoint with /metrics (Prometheus text), /live and /ready, on one thread with a selector.

    Slow clients cannot hold it: nothing waits on a connection. Each connection has one deadline,
    ``timeout_s`` from accept, for the whole exchange (request and reply), however slowly it trickles
    bytes; at most ``max_connections`` are open, at most ``max_per_client`` from one address. A new
    connection past either cap pushes out the oldest one (of that client, or overall) that has not
    finished sending its request, so a slowloris flood only ever closes its own connections and a
    probe that sends its request at once is answered. Closed-unanswered connections are counted
    (:attr:`refused`, by reason).
    """

    def __init__(self, metrics: DaemonMetrics, host: str, port: int, is_ready: Callable[[], bool],
                 is_live: Callable[[], bool], max_connections: int = 16, timeout_s: float = 5.0,
                 max_per_client: int = 4) -> None:
        self.registry = metrics.registry
        self.is_ready, self.is_live = is_ready, is_live
        self.max_connections, self.max_per_client = int(max_connections), int(max_per_client)
        self.timeout_s = float(timeout_s)
        self.refused_by_reason: Dict[str, int] = {"evicted": 0, "timeout": 0, "too_large": 0}
        if not is_loopback_host(host):
            log.warning("metrics endpoint binds %s (not loopback): /metrics has no authentication; put it "
                        "behind a reverse proxy or firewall (docs/metrics.md)", host)
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._lsock = socket.create_server((host.strip("[]"), port), family=family, backlog=128)
        self._lsock.setblocking(False)
        self.port = int(self._lsock.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._conns: Dict[int, _Conn] = {}
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    @property
    def refused(self) -> int:
        """Connections closed without an answer (pushed out by a newer one, timed out, oversized)."""
        return sum(self.refused_by_reason.values())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="nexedge-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop = True
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
            self._thread.join(timeout=5)
            self._thread = None
        for c in list(self._conns.values()):
            self._close(c)
        for s in (self._lsock, self._wake_r, self._wake_w):
            s.close()

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        self._sel = sel
        sel.register(self._lsock, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop:
                for key, mask in sel.select(timeout=0.1):
                    try:
                        if key.data == "accept":
                            self._accept()
                        elif key.data == "wake":
                            self._wake_r.recv(64)
                        elif mask & selectors.EVENT_READ:
                            self._read(key.data)
                        else:
                            self._write(key.data)
                    except Exception as e:  # one bad connection must not stop the endpoint
                        log.error("metrics HTTP: %s", e)
                        if isinstance(key.data, _Conn):
                            self._close(key.data)
                now = time.monotonic()
                for c in [c for c in self._conns.values() if now - c.t0 > self.timeout_s]:
                    if c.out is None:
                        self.refused_by_reason["timeout"] += 1
                    self._close(c)
        finally:
            sel.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self._lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of file descriptors: try again on the next event
                log.error("metrics HTTP accept failed: %s", e)
                return
            sock.setblocking(False)
            client = str(addr[0])
            mine = [c for c in self._conns.values() if c.client == client]
            if len(mine) >= self.max_per_client and not self._evict(mine):
                self.refused_by_reason["evicted"] += 1
                sock.close()
                continue
            if len(self._conns) >= self.max_connections and not self._evict(list(self._conns.values())):
                self.refused_by_reason["evicted"] += 1
                sock.close()
                continue
            c = _Conn(sock, client, time.monotonic())
            self._conns[sock.fileno()] = c
            self._sel.register(sock, selectors.EVENT_READ, c)

    def _evict(self, conns: List[_Conn]) -> bool:
        """Close the oldest of ``conns`` still sending its request; False when all are replying."""
        waiting = [c for c in conns if c.out is None]
        if not waiting:
            return False
        self.refused_by_reason["evicted"] += 1
        self._close(min(waiting, key=lambda c: c.t0))
        return True

    def _read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(c)
            return
        c.buf += data
        end = c.buf.find(b"\r\n\r\n")
        if end < 0:
            end = c.buf.find(b"\n\n")
        if end < 0:
            if len(c.buf) > MAX_REQUEST_BYTES:
                self.refused_by_reason["too_large"] += 1
                self._reply(c, 431, b"request header too large\n", head=False)
            return
        self._answer(c, c.buf[:end])

    def _answer(self, c: _Conn, head: bytes) -> None:
        line = head.split(b"\n", 1)[0].strip().split()
        if len(line) < 2:
            self._reply(c, 400, b"bad request\n")
            return
        method, path = line[0], line[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            self._reply(c, 405, b"only GET and HEAD\n")
            return
        is_head = method == b"HEAD"
        if path == b"/metrics":
            try:
                body = generate_latest(self.registry)
            except Exception as e:  # a metric that cannot render must not kill the endpoint
                self._reply(c, 500, f"metrics unavailable: {e}\n".encode("ascii", "replace"), is_head)
                return
            self._reply(c, 200, body, is_head, CONTENT_TYPE_LATEST)
        elif path == b"/live":
            ok = self.is_live()
            self._reply(c, 200 if ok else 503, b"live\n" if ok else b"not live\n", is_head)
        elif path == b"/ready":
            ok = self.is_ready()
            self._reply(c, 200 if ok else 503, b"ready\n" if ok else b"not ready\n", is_head)
        else:
            self._reply(c, 404, b"not found; try /metrics, /live, /ready\n", is_head)

    def _reply(self, c: _Conn, code: int, body: bytes, head: bool = False,
               ctype: str = "text/plain; charset=utf-8") -> None:
        reason = http.HTTPStatus(code).phrase
        hdr = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
               "Connection: close\r\n\r\n").encode("ascii")
        c.out = hdr + (b"" if head else body)
        self._sel.modify(c.sock, selectors.EVENT_WRITE, c)
        self._write(c)

    def _write(self, c: _Conn) -> None:
        try:
            c.sent += c.sock.send(c.out[c.sent:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        if c.sent >= len(c.out):
            self._close(c)

    def _close(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        if fd >= 0 and self._conns.get(fd) is c:
            del self._conns[fd]
            try:
                self._sel.unregister(c.sock)
            except (KeyError, ValueError, AttributeError, RuntimeError):
                pass
        try:
            c.sock.close()
        except OSError:
            pass
