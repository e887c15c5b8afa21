"""Prometheus metrics of the daemon (own registry) and the HTTP endpoint with
``/metrics``, ``/live`` and ``/ready``. Names are listed in docs/metrics.md.
Python 3.8, no torch.
"""

import http.server
import threading
from typing import Any, Callable, Dict, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LAT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
OTHER_CAMERA = "_other"


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

    def add_snapshot_collector(self, name: str, fn: Callable[[], Dict[str, Any]]) -> None:
        """Export a ``{camera: {key: number}}`` snapshot (e.g. the shift monitor) at scrape time."""
        self.registry.register(_SnapshotCollector(name, fn))


    def add_counter_callback(self, name: str, doc: str, label: str, fn: Callable[[], Dict[str, int]]) -> None:
        """Export counts kept elsewhere (e.g. CURVE refusals) as a labelled counter, read at scrape time."""
        self.registry.register(_CounterCollector(name, doc, label, fn))


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


class _SnapshotCollector:
    def __init__(self, name: str, fn: Callable[[], Dict[str, Any]]) -> None:
        self.name = name
        self.fn = fn

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        fam = GaugeMetricFamily(self.name, "Shift-monitor values per camera", labels=["camera", "key"])
        try:
            snap = self.fn() or {}
        except Exception:  # a broken snapshot must not break the scrape
            snap = {}
        for camera, values in snap.items():
            if not isinstance(values, dict):
                continue
            for key, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    fam.add_metric([str(camera), str(key)], float(v))
                elif isinstance(v, bool):
                    fam.add_metric([str(camera), str(key)], 1.0 if v else 0.0)
        yield fam


class HealthServer:
    """Threaded HTTP server: /metrics (Prometheus text), /live, /ready."""

    def __init__(self, metrics: DaemonMetrics, host: str, port: int, is_ready: Callable[[], bool],
                 is_live: Callable[[], bool]) -> None:
        registry = metrics.registry

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
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
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="nexedge-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()
