"""nexedge-daemon: ZeroMQ camera ingest -> decode -> dynamic batch -> inference -> decision -> reply/publish.

Threads: the I/O thread (this one: ROUTER + PUB sockets, parsing, replies),
a small decode pool, one inference worker, the sample writer, the HTTP
metrics server. Every frame gets exactly one verdict; a frame that was not
inferred is never PASSed (RECHECK with a reason). See docs/protocol.md and
docs/configuration.md. Python 3.8, no torch.
"""

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import zmq

from nexedge import __version__
from nexedge.serve import config as serve_config
from nexedge.serve import notify, preflight, protocol
from nexedge.serve.batcher import Batcher
from nexedge.serve.control import ControlServer
from nexedge.serve.guard import GuardRegistry, Limits, SocketGuard
from nexedge.serve.ingest import DecodePool, IngestMixin, recv_bounded
from nexedge.serve.ledger import Ledger
from nexedge.serve.lifecycle import Lifecycle
from nexedge.serve.logjson import setup_logging
from nexedge.serve.memory import AllocatorTrim
from nexedge.serve.outbox import Outbox
from nexedge.serve.prometheus import DaemonMetrics, HealthServer
from nexedge.serve.protocol import Request
from nexedge.serve.worker import InferenceWorker

log = logging.getLogger("nexedge.serve")
STALL_S = 30.0  # a thread silent this long makes /live fail and stops watchdog pings
RECV_BURST = 256


class Daemon(IngestMixin):
    """The line daemon. ``setup()`` loads and binds (errors raise), ``serve()`` runs until stopped."""

    def __init__(self, cfg: serve_config.Config, backend: Any = None) -> None:
        """``backend``: an already open backend to use instead of opening ``model.path`` (embedding, tests)."""
        self.cfg = cfg
        self._given_backend = backend
        self.metrics = DaemonMetrics(cfg.sockets.max_cameras)
        self.endpoints: Dict[str, str] = {}
        self.metrics_port: Optional[int] = None
        self._stop = threading.Event()
        self._stopping = False
        self._ready = False
        self._lock = threading.Lock()
        self.ledger = Ledger(self._deliver)
        self._io_ident = -1
        self._io_beat = time.monotonic()
        self.n_received = 0
        self._seq = protocol.SeqCounter(cfg.sockets.max_cameras)
        self._watchdog = notify.Watchdog()
        self._memory = AllocatorTrim()
        self.http: Optional[HealthServer] = None
        self.models: Optional[Lifecycle] = None
        self.shadow: Any = None
        self.control: Any = None
        self.sampler: Any = None
        self.monitor: Any = None
        self.pull: Any = None
        self.auth: Any = None
        self.worker: Optional[InferenceWorker] = None
        self.pool: Optional[DecodePool] = None
        self.ctx: Optional[zmq.Context] = None
        s = cfg.sockets
        self.guards = GuardRegistry(s.guard.max_pending_bytes)
        self.metrics.add_families(self.guards.collect)
        self._frames_guard: Optional[SocketGuard] = None
        self._verdicts_guard: Optional[SocketGuard] = None
        #: Threads still busy when teardown's deadline passed (the process must not wait for them).
        self.busy_threads: List[str] = []

    # The model deciding now (hot swap: see nexedge.serve.lifecycle; a batch holds the swap lock).
    backend = property(lambda self: self.models.active.backend if self.models and self.models.active else None)
    card = property(lambda self: self.models.active.card)
    decider = property(lambda self: self.models.active.decider)

    # -- health -------------------------------------------------------------
    def is_ready(self) -> bool:
        return self._ready and not self._stopping

    def is_live(self) -> bool:
        now = time.monotonic()
        if now - self._io_beat > STALL_S:
            return False
        w = self.worker
        if w is None:
            return True
        return self._stopping or (w.alive() and now - w.heartbeat < STALL_S)

    # -- setup --------------------------------------------------------------
    def setup(self) -> None:
        cfg, m = self.cfg, self.metrics
        if cfg.metrics is not None:
            try:
                self.http = HealthServer(m, cfg.metrics.host, cfg.metrics.port, self.is_ready, self.is_live,
                                         cfg.metrics.limits.max_connections, cfg.metrics.limits.timeout_s,
                                         cfg.metrics.limits.max_per_client)
                http_srv = self.http
                m.add_counter_callback("nexedge_http_refused", "Metrics HTTP connections closed unanswered, by "
                                       "reason (evicted by a newer one, timeout, too_large)", "reason",
                                       lambda: dict(http_srv.refused_by_reason))
            except OSError as e:
                raise RuntimeError(f"cannot serve metrics on metrics.host={cfg.metrics.host!r} "
                                   f"metrics.port={cfg.metrics.port}: {e}") from e
            self.http.start()
            self.metrics_port = self.http.port
        self.models = Lifecycle(cfg, m, self._given_backend)
        card = self.models.open_initial().card
        self._setup_optional(card)
        b = cfg.batching
        self.batcher = Batcher(b.max_batch, b.max_delay_ms / 1000.0, b.max_queue)
        self._bind()
        if cfg.sockets.decode_workers > 0:
            self.pool = DecodePool(cfg.sockets.decode_workers, self._decode_task, cfg.sockets.decode_per_camera)
        self.worker = InferenceWorker(self.backend, card, self.batcher, self.decider, m, self.ledger.answer,
                                      self.sampler, self.monitor, self.models, self.models.after_batch)
        self.worker.start()
        if self.control is not None:
            self.control.guards = self.guards  # memory guard on the control socket too
            self.endpoints["control"] = str(self.control.start().endpoint)
        if self.pull is not None:
            self.pull.start()
            self.endpoints["pull"] = str(self.pull.endpoint)
        from nexedge.serve.memory import rss_bytes

        self.guards.rss_limit = serve_config.rss_limit(cfg.sockets, rss_bytes())
        self._ready = True
        m.ready.set(1)
        notify.notify("READY=1\nSTATUS=inspecting")
        log.info("ready: frames on %s, verdicts on %s, metrics on %s", self.endpoints["frames"],
                 self.endpoints["verdicts"], self.metrics_port,
                 extra={"fields": {"event": "ready", "endpoints": self.endpoints, "metrics_port": self.metrics_port}})

    def _setup_optional(self, card: Any) -> None:
        cfg = self.cfg
        if cfg.store is not None:
            from nexedge.serve.sampler import Sampler
            from nexedge.store import SampleStore

            quota = serve_config.parse_size(cfg.store.quota, "store.quota") if cfg.store.quota is not None else None
            reserve = serve_config.parse_size(cfg.store.reserve, "store.reserve", allow_zero=True)
            store = SampleStore(cfg.store.path, quota_bytes=quota, reserve_bytes=reserve)
            self.sampler = Sampler(store, self.metrics, cfg.store.queue,
                                   serve_config.parse_size(cfg.store.queue_bytes, "store.queue_bytes"),
                                   cfg.store.recheck_per_minute, cfg.sockets.max_cameras)
            self.metrics.add_families(self.sampler.collect)
            free = store.stats()["free_bytes"]
            log.info("uncertain-sample store at %s (quota %s, reserve %s, %d MiB free)", cfg.store.path,
                     cfg.store.quota, cfg.store.reserve, free >> 20)
            if free < reserve:
                log.warning("store.path %s has %d MiB free, less than store.reserve %s: samples are dropped until "
                            "room is made (nexedge_store_out_of_room{reason=\"disk_full\"} 1)", cfg.store.path,
                            free >> 20, cfg.store.reserve)
        if cfg.monitor is not None:
            from nexedge.serve.monitor import ShiftMonitor

            mc = cfg.monitor
            self.monitor = ShiftMonitor(card, window=mc.window, limits=mc.limits, min_frames=mc.min_frames,
                                        alarm_audit_rate=mc.alarm_audit_rate, defect_prior=serve_config.monitor_prior(mc),
                                        max_cameras=cfg.sockets.max_cameras, prior_window=mc.prior_window)
            mon = self.monitor
            self.metrics.add_snapshot_collector("nexedge_monitor", mon.snapshot, lambda: mon.other_frames)
            self.models.on_active.append(lambda slot: mon.rebase(slot.card))
        if cfg.auth is not None:
            from nexedge.serve.auth import CurveConfig

            self.auth = CurveConfig(cfg.auth.server_secret_file, cfg.auth.allowed_clients_dir)
            auth = self.auth
            self.metrics.add_counter_callback(
                "nexedge_auth_refused", "Connections refused by CurveZMQ authentication, by reason (unknown_key, "
                "wrong_role, handshake)", "reason",
                lambda: {k: v for k, v in auth.counts().items() if k != "total"})
        if cfg.pull is not None:
            if cfg.store is None:
                raise serve_config.ConfigError("pull: needs a store section (the pull endpoint serves the sample store)")
            from nexedge.serve.pullserver import PullServer

            self.pull = PullServer(cfg.store.path, cfg.pull.bind, auth=self.auth, guards=self.guards,
                                   lease_s=cfg.pull.lease_s)
        self.shadow = self.models.attach(self.sampler, lambda: len(self.batcher))
        # The control server (`nexedge line ...`) drives the lifecycle; the daemon starts it.
        self.control = (ControlServer(self.models, self.models.lc.control, self.auth, self.models.report)
                        if self.models.lc.control else None)

    def _bind(self) -> None:
        s = self.cfg.sockets
        self.ctx = zmq.Context()
        if self.auth is not None:
            self.auth.start(self.ctx)
        r = self.router = self.ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.RCVHWM, s.hwm)
        r.setsockopt(zmq.SNDHWM, s.hwm)
        r.setsockopt(zmq.LINGER, s.linger_ms)
        # Bound per part; messages between max_message_bytes and this get RECHECK oversize. The whole
        # message (parts x size) and unfinished messages are bounded by the memory guard.
        r.setsockopt(zmq.MAXMSGSIZE, 2 * s.max_message_bytes + (1 << 20))
        pub = self.pub = self.ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, s.hwm)
        pub.setsockopt(zmq.LINGER, s.linger_ms)
        pub.setsockopt(zmq.MAXMSGSIZE, 4096)  # subscriptions: a topic (camera id) each
        for sock in (r, pub):
            SocketGuard.configure(sock, s.heartbeat_s)
        if self.auth is not None:
            self.auth.apply_server(r, monitor=False, domain="frames")  # the guards' monitors count failed
            self.auth.apply_server(pub, monitor=False, domain="verdicts")  # handshakes
        failed = self.auth.handshake_failed if self.auth is not None else None
        peer_max = s.guard.max_peer_pending_bytes or 2 * s.max_message_bytes + (1 << 20)
        self._frames_guard = SocketGuard(r, "frames", Limits(peer_max, s.guard.unfinished_timeout_s, s.max_peers),
                                         self.guards, failed)
        self._verdicts_guard = SocketGuard(pub, "verdicts", Limits(1 << 20, s.guard.unfinished_timeout_s, s.max_peers,
                                                                    slack=256 << 10), self.guards, failed)
        for sock, key, addr in ((r, "sockets.frames", s.frames), (pub, "sockets.verdicts", s.verdicts)):
            try:
                sock.bind(addr)
            except zmq.ZMQError as e:
                raise RuntimeError(f"cannot bind {key}={addr!r}: {e}") from e
        self.endpoints = {"frames": r.getsockopt_string(zmq.LAST_ENDPOINT),
                          "verdicts": pub.getsockopt_string(zmq.LAST_ENDPOINT)}
        self.outbox = Outbox(self.ctx)

    # -- answering ----------------------------------------------------------
    @property
    def n_answered(self) -> int:
        return self.ledger.answered

    def _deliver(self, req: Request, decision: str, reason: str, latency: float, score: Optional[float],
                 uncertain: bool, probs: Optional[Dict[str, float]]) -> None:
        """Build, count and send one verdict (called by the ledger, once per frame)."""
        try:
            v = protocol.verdict(req.camera, req.frame_id, decision, score, self.decider.threshold, uncertain, reason,
                          self.card.model_id, latency * 1000.0)
            data = protocol.encode_verdict(v)
        except Exception as e:  # a verdict that cannot be built still goes out, as the plainest RECHECK
            log.error("verdict of camera %r frame %r could not be encoded (%s); sending a bare RECHECK",
                      req.camera, req.frame_id, e)
            decision, reason = "RECHECK", protocol.BACKEND_ERROR
            data = protocol.encode_verdict(protocol.verdict(protocol.readable_camera(req.camera), protocol.readable_frame_id(req.frame_id),
                                              decision, None, None, False, reason, "", latency * 1000.0))
        camera = req.camera.encode("utf-8", "replace")
        if threading.get_ident() == self._io_ident:
            self._send(req.envelope, camera, data)
        else:
            self.outbox.send(req.envelope, camera, data)
        m = self.metrics
        m.verdicts.labels(decision).inc()
        if decision == "RECHECK":
            m.rechecks.labels(reason).inc()
            log.debug("RECHECK %s camera=%s frame=%s", reason, req.camera, req.frame_id)
        m.e2e.observe(latency)

    def _send(self, envelope: List[bytes], camera: bytes, data: bytes) -> None:
        try:
            self.router.send_multipart(envelope + [data], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # peer gone or its queue full: the camera's own timeout takes over
            log.debug("reply not sent: %s", e)
        try:
            self.pub.send_multipart([camera, data], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # -- main loop ------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the daemon to drain and exit (signal-safe)."""
        if self._stop.is_set():
            self._force = True
        self._stop.set()

    _force = False

    def serve(self) -> int:
        """Run the I/O loop until :meth:`request_stop`; drain; tear down. Returns the exit code (0)."""
        self._io_ident = threading.get_ident()
        self._force = False
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.outbox.pull, zmq.POLLIN)
        stop_at: Optional[float] = None
        t_stop = 0.0
        forced = False
        while True:
            events = dict(poller.poll(10))
            if self.outbox.pull in events:
                self.outbox.forward(self._send)
            got = self._receive_burst(RECV_BURST) if self.router in events else 0
            now = time.monotonic()
            self._frames_guard.tick(now)
            self._verdicts_guard.tick(now)
            for f in self.batcher.expire(now):
                self.worker.recheck(f, protocol.DEADLINE_PASSED)  # decoded: answered and sampled
            expired = self.ledger.expire(now)
            for req in expired:  # anywhere else: waiting for or in decode, in a batch
                self._sample_undecoded(req, req.t_wall, protocol.DEADLINE_PASSED)
            if expired and self.pool is not None:
                self.pool.purge()
            m = self.metrics
            m.queue_depth.set(len(self.batcher))
            if self.pool is not None:
                m.decoding.set(self.pool.decoding)
                m.decode_waiting.set(self.pool.waiting)
            self._io_beat = now
            self._watchdog.tick(now, self.is_live())
            # A peer the guard cut off leaves libzmq's freed buffers in the heap: trim after it, too.
            cut = now - self.guards.last_disconnect() < 0.5
            self._memory.tick(now, busy=got > 0 or len(self.ledger) > 0 or cut)
            if self._stop.is_set() and stop_at is None:
                t_stop = now
                stop_at = now + self.cfg.shutdown.timeout_s
                self._begin_drain()
            if stop_at is not None:
                if not self.worker.alive():
                    break
                if now >= stop_at or self._force:
                    forced = True
                    break
        self.outbox.forward(self._send)
        if forced:
            self._answer_outstanding(time.monotonic() - t_stop)
        else:
            self._sweep(quiet_s=0.05, until=stop_at or time.monotonic())
        return self._teardown(forced, stop_at)

    def _receive_burst(self, n: int) -> int:
        """Receive and handle up to ``n`` messages without blocking; returns how many."""
        max_bytes = self.cfg.sockets.max_message_bytes
        for i in range(n):
            try:
                rec = recv_bounded(self.router, max_bytes)
            except zmq.Again:
                return i
            except zmq.ZMQError as e:  # pragma: no cover - socket closed under us
                log.error("receive failed: %s", e)
                return i
            try:
                self._frames_guard.consumed(rec.frames[0].get(zmq.SRCFD), rec.parts, rec.size)
            except (zmq.ZMQError, AttributeError):
                pass
            try:
                self._on_received(rec)
            except Exception as e:  # pragma: no cover - _on_received catches everything itself
                log.exception("unexpected error handling a message: %s", e)
        return n

    def _sweep(self, quiet_s: float, until: float) -> None:
        """Answer frames still arriving (RECHECK shutting_down) until the socket is quiet or time is up."""
        while time.monotonic() < until and self.router.poll(int(quiet_s * 1000), zmq.POLLIN):
            self._receive_burst(RECV_BURST)
        self.outbox.forward(self._send)

    def _begin_drain(self) -> None:
        self._stopping = True
        self.metrics.ready.set(0)
        notify.notify("STOPPING=1\nSTATUS=draining")
        pending = self.batcher.close()
        in_flight = [f.req for f in self.worker.in_flight]
        log.info("stopping: answering %d queued and %d decoding frames RECHECK shutting_down, finishing the "
                 "batch of %d in flight", len(pending), max(len(self.ledger) - len(pending) - len(in_flight), 0),
                 len(in_flight), extra={"fields": {"event": "stopping", "queued": len(pending)}})
        for f in pending:
            self.worker.recheck(f, protocol.SHUTTING_DOWN)
        # Frames waiting for or in decode are not worth waiting for: answer them now.
        self.ledger.answer_all(protocol.SHUTTING_DOWN, keep=in_flight)
        if self.pool is not None:
            self.pool.shutdown()

    def _answer_outstanding(self, waited_s: float) -> None:
        n = len(self.ledger)
        if self._force:
            log.error("second stop signal after %.1f s of draining; answering %d frames RECHECK shutting_down",
                      waited_s, n)
        else:
            log.error("drain timed out after %.1f s (shutdown.timeout_s); answering %d frames RECHECK "
                      "shutting_down", waited_s, n)
        self.ledger.answer_all(protocol.SHUTTING_DOWN)
        self.outbox.forward(self._send)

    def _teardown(self, forced: bool, stop_at: Optional[float] = None) -> int:
        """Close everything; waits (for the control or pull thread, the store writer) end at ``stop_at``
        (the shutdown.timeout_s deadline): a thread still busy then, e.g. loading a model, is left to
        process exit (:attr:`busy_threads`)."""
        self._ready = False
        end = stop_at if stop_at is not None else time.monotonic() + self.cfg.shutdown.timeout_s

        def left() -> float:
            return max(end - time.monotonic(), 0.1)

        if self.pool is not None:
            self.pool.shutdown()
        for name in ("pull", "control"):
            srv = getattr(self, name)
            if srv is not None and not srv.stop(timeout=left()):
                self.busy_threads.append(name)
        if self.shadow is not None:
            self.shadow.close()
        if self.sampler is not None and not self.sampler.close(timeout=left()):
            self.busy_threads.append("store writer")
        if self.ctx is not None:
            for g in (self._frames_guard, self._verdicts_guard):
                if g is not None:
                    g.close()
            if hasattr(self, "outbox"):
                self.outbox.close()
            for name in ("router", "pub"):
                sock = getattr(self, name, None)
                if sock is not None:
                    sock.close(linger=min(self.cfg.sockets.linger_ms, int(left() * 1000)))
            if self.auth is not None:
                self.auth.stop()
            if forced:
                self.ctx.destroy(linger=0)
            else:
                self.ctx.term()
        if self.http is not None:
            self.http.stop()
        if self.models is not None and not forced and not self.busy_threads:
            self.models.close()
        log.info("stopped: %d frames received, %d answered", self.n_received, self.n_answered,
                 extra={"fields": {"event": "stopped", "forced": forced, "received": self.n_received,
                                   "answered": self.n_answered, "busy": self.busy_threads}})
        return 0

    def close_unserved(self) -> None:
        """Release what :meth:`setup` opened when :meth:`serve` never ran (setup failed)."""
        self._stopping = True
        if self.worker is not None:
            self.batcher.close()
            self.worker.join(5)
        self._teardown(forced=False)


#: Exit statuses (deploy/nexedge-daemon.service: systemd does not restart on EXIT_CONFIG and EXIT_INCOMPATIBLE,
#: which a restart cannot fix).
EXIT_STARTUP = 1  # start-up failed (model missing, card mismatch, address in use): may pass on a restart
EXIT_CONFIG = 2  # configuration error
EXIT_INCOMPATIBLE = 78  # the model cannot run on this machine as built (engine from another TensorRT; DLA core)


def build_parser() -> argparse.ArgumentParser:
    from nexedge.runtime import registry

    p = argparse.ArgumentParser(
        prog="nexedge-daemon", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Line-side inspection daemon: ZeroMQ camera frames in, PASS/REJECT/RECHECK verdicts out.",
        epilog="backends (model.backend: auto picks by suffix):\n" + registry.describe() + "\n\nSee "
               "docs/configuration.md for every key and deploy/line.example.yaml for an example.")
    p.add_argument("--config", "-c", help="YAML config file (see deploy/line.example.yaml)")
    p.add_argument("--model", help=f"model artifact ({registry.suffix_text(line=True)}) with its card; overrides "
                                   "model.path")
    p.add_argument("--frames", help="ROUTER bind address for camera frames; overrides sockets.frames")
    p.add_argument("--verdicts", help="PUB bind address for verdicts; overrides sockets.verdicts")
    p.add_argument("--metrics-port", type=int, help="HTTP port for /metrics, /live, /ready (0 = any free port)")
    p.add_argument("--store", help="uncertain-sample store folder; overrides store.path (turns the store on)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, value parsed as YAML (repeatable)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration and check that every file it names exists and is readable "
                        "(the store folder writable); print it and exit (2 when anything is wrong)")
    p.add_argument("--user", metavar="NAME",
                   help="with --check-config: check the files as this user would see them (the systemd unit's "
                        "User=, e.g. nexedge), not as the user running the check")
    p.add_argument("--version", action="version", version="nexedge-daemon " + __version__)
    return p


def overrides_from_args(args: argparse.Namespace) -> List[Any]:
    out: List[Any] = []
    if args.model:
        out.append(("model.path", os.path.abspath(args.model)))
    if args.frames:
        out.append(("sockets.frames", args.frames))
    if args.verdicts:
        out.append(("sockets.verdicts", args.verdicts))
    if args.metrics_port is not None:
        out.append(("metrics.port", args.metrics_port))
    if args.store:
        out.append(("store.path", os.path.abspath(args.store)))
    out.extend(serve_config.parse_set(item) for item in args.set)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``nexedge-daemon``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        cfg = serve_config.load(args.config, overrides_from_args(args))
    except (serve_config.ConfigError, FileNotFoundError) as e:
        print(f"nexedge-daemon: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        import dataclasses
        import json

        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        try:
            problems = preflight.check_files(cfg, args.user)
        except serve_config.ConfigError as e:
            problems = [str(e)]
        chosen = serve_config.backend_line(cfg)
        if chosen:
            print(f"nexedge-daemon: {chosen}", file=sys.stderr)
        for p in problems:
            print(f"nexedge-daemon: configuration error: {p}", file=sys.stderr)
        return EXIT_CONFIG if problems else 0
    setup_logging(cfg.logging.level, cfg.logging.format)
    if cfg.logging.level != "DEBUG":
        from nexedge.preprocess import quiet_opencv

        quiet_opencv()  # a corrupt frame is answered RECHECK undecodable and logged by us, once
    daemon = Daemon(cfg)
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.request_stop())
    over = overrides_from_args(args)  # SIGHUP: re-read the config file's model.path, hot-swap to it
    signal.signal(signal.SIGHUP, lambda *_: daemon.models and daemon.models.hup(lambda: serve_config.load(args.config, over)
                                                                                .model.path))
    failed: List[BaseException] = []
    if not _setup_within_shutdown_timeout(daemon, failed):
        _exit_now(0)  # a stop arrived during a start-up that did not finish in shutdown.timeout_s
    if failed:
        from nexedge.runtime import ArtifactIncompatible

        e = failed[0]
        incompatible = isinstance(e, ArtifactIncompatible)
        log.error("startup failed: %s%s", e, f" (exit {EXIT_INCOMPATIBLE}: not restarted)" if incompatible else "",
                  exc_info=not isinstance(e, (ValueError, FileNotFoundError, RuntimeError)))
        try:
            daemon.close_unserved()
        except Exception:
            pass
        return EXIT_INCOMPATIBLE if incompatible else EXIT_STARTUP
    rc = daemon.serve()
    if daemon.busy_threads:  # e.g. a model load the deadline did not wait for: do not wait at exit either
        log.warning("exiting with %s still busy (shutdown.timeout_s %.1f s)", ", ".join(daemon.busy_threads),
                    cfg.shutdown.timeout_s)
        _exit_now(rc)
    return rc


def _setup_within_shutdown_timeout(daemon: Daemon, failed: List[BaseException]) -> bool:
    """Run ``daemon.setup()`` (model load, warm-up) on a helper thread so a SIGTERM during it is honoured
    within shutdown.timeout_s; False when a stop came and set-up outlived that timeout."""
    done = threading.Event()

    def run() -> None:
        try:
            daemon.setup()
        except BaseException as e:
            failed.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="nexedge-setup", daemon=True).start()
    stop_at: Optional[float] = None
    while not done.wait(0.05):  # the main thread stays free to run signal handlers
        now = time.monotonic()
        if daemon._stop.is_set() and stop_at is None:
            stop_at = now + daemon.cfg.shutdown.timeout_s
            log.info("stop requested during start-up; waiting up to %.1f s (shutdown.timeout_s) for the model "
                     "load to finish", daemon.cfg.shutdown.timeout_s)
        if stop_at is not None and (now >= stop_at or daemon._force):
            log.error("start-up still loading the model %.1f s after the stop signal (shutdown.timeout_s); "
                      "exiting without waiting for it", daemon.cfg.shutdown.timeout_s,
                      extra={"fields": {"event": "stopped", "forced": True, "during": "startup"}})
            return False
    return True


def _exit_now(rc: int) -> None:
    """Leave the process at once (threads stuck in native code, e.g. a model load, are not waited for)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
