"""Prometheus metrics of the daemon (own registry) and the HTTP endpoint with
``/metrics``, ``/live`` and ``/ready``. Names are listed in docs/metrics.md.
Python 3.8, no torch.
"""

import http.server
import logging
import threading
from typing import Any, Callable, Dict, Iterable, Optional

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
MONITOR_STATS = ("psi", "brightness", "contrast", "sharpness", "uncertain_frac", "mean_score", "reject_rate")


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


class _BoundedHTTPServer(http.server.ThreadingHTTPServer):
    """A thread per connection, but at most ``max_connections`` at once: further connections are
    closed at once (counted), so idle or slow clients cannot pile up threads."""

    daemon_threads = True
    request_queue_size = 16

    def __init__(self, addr: Any, handler: Any, max_connections: int) -> None:
        super().__init__(addr, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def is_loopback_host(host: str) -> bool:
    h = host.strip("[]").lower()
    return h == "localhost" or h == "::1" or h.startswith("127.")


class HealthServer:
    """Threaded HTTP server: /metrics (Prometheus text), /live, /ready; bounded connections and
    per-connection timeouts (``timeout_s`` for the request and for the reply)."""

    def __init__(self, metrics: DaemonMetrics, host: str, port: int, is_ready: Callable[[], bool],
                 is_live: Callable[[], bool], max_connections: int = 16, timeout_s: float = 5.0) -> None:
        registry = metrics.registry

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = timeout_s  # socket timeout: an idle or trickling client is dropped

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body = generate_latest(registry)
                    except Exception as e:  # a metric that cannot render must not kill the endpoint
                        self._send(500, f"metrics unavailable: {e}\n".encode("ascii", "replace"))
                        return
                    self._send(200, body, CONTENT_TYPE_LATEST)
                elif path == "/live":
                    ok = is_live()
                    self._send(200 if ok else 503, b"live\n" if ok else b"not live\n")
                elif path == "/ready":
                    ok = is_ready()
                    self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._send(404, b"not found; try /metrics, /live, /ready\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        if not is_loopback_host(host):
            log.warning("metrics endpoint binds %s (not loopback): /metrics has no authentication; put it "
                        "behind a reverse proxy or firewall (docs/metrics.md)", host)
        self.httpd = _BoundedHTTPServer((host, port), Handler, max_connections)
        self.port = int(self.httpd.server_address[1])
        self._thread: Optional[threading.Thread] = None

    @property
    def refused(self) -> int:
        """Connections closed unserved because ``max_connections`` were busy."""
        return self.httpd.refused

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="nexedge-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()
