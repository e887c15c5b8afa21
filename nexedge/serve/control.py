"""Control endpoint of the daemon (``lifecycle.control``, off by default): model lifecycle over
ZeroMQ request/reply, driven by ``nexedge line``.

Wire protocol (version 1): one JSON request frame from a REQ (or DEALER with an
empty delimiter) client, one JSON reply frame.

* ``{"v": 1, "op": "status"}`` -> ``{"ok": true, "status": {active, candidate, previous, ...}}``
* ``{"v": 1, "op": "load", "path": "/abs/model.onnx", "as": "candidate"|"active"}``
  -> ``{"ok": true, "status": ...}`` after the model is loaded, warmed up,
  checked and installed (the line keeps inspecting meanwhile)
* ``{"v": 1, "op": "promote"}``, ``{"v": 1, "op": "rollback"}``,
  ``{"v": 1, "op": "unload", "slot": "candidate"|"previous"}`` -> ``{"ok": true, "status": ...}``
* ``{"v": 1, "op": "report"}`` -> ``{"ok": true, "report": {shadow statistics per camera}}``
* anything refused or malformed -> ``{"ok": false, "error": "..."}``; the line
  keeps running on its active model.

Who made a change is logged with it: the name of the client's key file in the
auth allow-list under CurveZMQ (only *operator* keys get in: see
:mod:`nexedge.serve.auth`), ``loopback`` without auth (plus the name the
client gave as ``"who"``, marked as claimed). A non-loopback bind without auth
is refused (as for the pull endpoint). Python 3.8, no torch.
"""

import json
import logging
from typing import Any, Callable, Dict, List, Optional

import zmq

from nexedge.serve.pullserver import RouterThread, check_version, is_loopback, split_envelope
from nexedge.serve.slots import LifecycleError

log = logging.getLogger("nexedge.serve")
PROTOCOL_VERSION = 1
OPS = ("status", "load", "promote", "rollback", "unload", "report")
MAX_REQUEST_BYTES = 64 << 10


class ControlTimeout(RuntimeError):
    """The daemon did not answer a control request in time."""


class ControlServer(RouterThread):
    """A thread with its own ROUTER socket serving one :class:`~nexedge.serve.lifecycle.Lifecycle`."""

    _log = log

    def __init__(self, lifecycle: Any, bind: str, auth: Any = None,
                 report: Optional[Callable[[], Dict[str, Any]]] = None) -> None:
        if auth is None and not is_loopback(bind):
            raise ValueError(f"control endpoint bind {bind!r} is not loopback: it changes the line's model, so it "
                             "needs CurveZMQ authentication (the auth section) or a loopback address such as "
                             "tcp://127.0.0.1:5558")
        self.lifecycle = lifecycle
        self.bind = bind
        self.auth = auth
        self.report = report or (lambda: {})
        self.endpoint: Optional[str] = None
        self.counters: Dict[str, int] = {"requests": 0, "errors": 0}
        self._names: Dict[str, str] = {}
        self._init_thread()

    def start(self) -> "ControlServer":
        """Bind (errors surface here) and serve in a background thread."""
        ctx, sock = self._bind_router(self.bind, "lifecycle.control", MAX_REQUEST_BYTES)
        self._start_thread(ctx, sock, (), "nexedge-control", "control")
        return self

    def _serve(self, sock: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                if not self._poll(sock):  # the memory guard runs while waiting
                    continue
                head, body = split_envelope(self._recv(sock))
                self.counters["requests"] += 1
                try:
                    reply = self._handle(body)
                except (LifecycleError, ValueError, FileNotFoundError, RuntimeError) as e:
                    self.counters["errors"] += 1
                    log.warning("control request refused: %s", e)
                    reply = {"ok": False, "error": str(e)}
                except Exception as e:  # a bug here must not stop the endpoint (or the line)
                    self.counters["errors"] += 1
                    log.exception("control request failed: %s", e)
                    reply = {"ok": False, "error": f"internal error: {e}"}
                sock.send_multipart([f.bytes for f in head] + [json.dumps(reply, default=str).encode("utf-8")])
        finally:
            sock.close(linger=0)

    def _who(self, frame: Any, req: Dict[str, Any]) -> str:
        claimed = req.get("who")
        claimed = str(claimed)[:64] if isinstance(claimed, (str, int)) and str(claimed) else None
        if self.auth is None:
            return "loopback" + (f" (claims {claimed!r})" if claimed else "")
        try:
            key = frame.get("User-Id")
        except zmq.ZMQError:
            key = None
        return self._key_name(key) if key else "unknown key"

    def _key_name(self, z85: str) -> str:
        """The allow-list file name (``alice`` for ``operators/alice.key``) holding this public key."""
        return str(self.auth.key_name(z85))

    def _handle(self, body: List[Any]) -> Dict[str, Any]:
        if len(body) != 1:
            raise ValueError(f"expected one JSON request frame, got {len(body)} frames")
        try:
            req = json.loads(body[0].bytes.decode("utf-8"))
        except (ValueError, RecursionError):
            raise ValueError("request is not valid UTF-8 JSON; expected e.g. {\"v\": 1, \"op\": \"status\"}") from None
        if not isinstance(req, dict):
            raise ValueError(f"request must be a JSON object, got {type(req).__name__}")
        check_version(req, "this daemon's control endpoint")
        op = req.get("op")
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
        lc = self.lifecycle
        if op == "status":
            return {"ok": True, "status": lc.status()}
        if op == "report":
            return {"ok": True, "report": self.report(), "status": lc.status()}
        who = self._who(body[0], req)
        if op == "load":
            path, as_ = req.get("path"), req.get("as", "candidate")
            if not isinstance(path, str) or not path:
                raise ValueError(f"load needs 'path': the artifact's path on the line machine, got {path!r}")
            return {"ok": True, "status": lc.load(path, str(as_), who)}
        if op == "promote":
            return {"ok": True, "status": lc.promote(who)}
        if op == "rollback":
            return {"ok": True, "status": lc.rollback(who)}
        return {"ok": True, "status": lc.unload(who, str(req.get("slot", "candidate")))}


class ControlClient:
    """REQ client for :class:`ControlServer` (``nexedge line``, tests)."""

    def __init__(self, endpoint: str, timeout_s: float = 120.0, curve: Any = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        self.sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        if curve is not None:
            curve.apply_client(self.sock)
        self.sock.connect(endpoint)
        self.endpoint = endpoint
        self.timeout_s = timeout_s

    def call(self, op: str, **fields: Any) -> Dict[str, Any]:
        """Send one request; the reply dict (``ok`` false with ``error`` when refused). ControlTimeout
        when the daemon does not answer within the timeout."""
        req = {"v": PROTOCOL_VERSION, "op": op}
        req.update(fields)
        try:
            self.sock.send(json.dumps(req).encode("utf-8"))
            return json.loads(self.sock.recv().decode("utf-8"))
        except zmq.Again:
            raise ControlTimeout(f"no reply from the daemon's control endpoint {self.endpoint} within "
                               f"{self.timeout_s:g} s (is lifecycle.control set, and the daemon running?)") from None

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
