"""Pull endpoint: hands pending uncertain samples to ``nexedge pull --connect`` over
ZeroMQ request/reply. Off by default in the daemon.

Wire protocol (version 1), one JSON request frame from a REQ (or DEALER with an
empty delimiter) client:

* ``{"v": 1, "op": "hello"}`` -> ``{"ok": true, "v": 1, "store_id", "pending"}``
* ``{"v": 1, "op": "page", "after_id": N|null, "limit": N, "filters": {camera,
  since, until, decision, reason, kind}}`` -> ``[{"ok": true, "samples": [row, ...],
  "skipped": k}, image bytes of row 0, image bytes of row 1, ...]``; rows in id
  order, pending only, at most ``limit`` (capped) rows and about
  ``max_page_bytes`` of images. A row whose image retention removed meanwhile
  is left out (``skipped``).
* ``{"v": 1, "op": "ack", "ids": [...]}`` -> ``{"ok": true, "acked": n}``: the
  client has written the samples and its manifest; they become *pulled*.

Leases: the rows a ``page`` hands out are leased to the client that asked for
``lease_s`` seconds (default 600). Other clients' pages skip them meanwhile, so two
pulls running at once never export the same sample twice; an ``ack`` is accepted
only for integer ids leased to the acknowledging client and not expired; anything
else refuses the whole ack with ``{"ok": false, "error": "... not leased ...",
"not_leased": [...]}`` and the client pages again. A client is its CURVE public
key under auth (or its connection without), plus the ``"session"`` string it sends
with each request when it sends one (``nexedge pull`` does, so a retry on a new
connection keeps its lease). At most ``MAX_LEASE`` ids are leased at once (the
oldest lease is forgotten first).
* any error -> ``{"ok": false, "error": "..."}``; a request without ``"v": 1``
  (the JSON integer) is refused.

The endpoint hands out proprietary images: binding anything but loopback
(127.0.0.0/8, ::1, localhost, ipc://, inproc://) needs a :class:`CurveConfig`; under
CURVE only *puller* keys get in (see :mod:`nexedge.serve.auth`). Without auth every
local process is trusted (it may page and acknowledge).

Python 3.8, no torch.
"""

import collections
import json
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple
from typing import OrderedDict as OrderedDictT

import zmq

from nexedge.serve.auth import CurveConfig
from nexedge.serve.guard import GuardRegistry, Limits, SocketGuard
from nexedge.store import SampleStore

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_PAGE = 256
#: The lease: ids handed out by ``page`` and not yet acknowledged (bounded; oldest forgotten first).
MAX_LEASE = 8192
LEASE_S = 600.0


class NotLeased(ValueError):
    """An ack named ids not leased to this client (never handed out, leased to another, or lapsed)."""

    def __init__(self, ids: List[Any]) -> None:
        super().__init__(f"ids {ids[:10]} are not leased to this client (never handed out to it, leased to another "
                         "client, already acknowledged, or the lease lapsed); page them again before acknowledging")
        self.ids = ids


class Lease:
    """Sample ids handed out, each with the client holding it and when it was handed out."""

    def __init__(self, max_ids: int = MAX_LEASE, ttl_s: float = LEASE_S) -> None:
        self.max_ids, self.ttl_s = max_ids, ttl_s
        self._ids: OrderedDictT[int, Tuple[str, float]] = collections.OrderedDict()

    def held_elsewhere(self, i: int, holder: str, now: float) -> bool:
        """Whether id ``i`` is leased, unexpired, to a client other than ``holder``."""
        got = self._ids.get(i)
        return got is not None and got[0] != holder and now - got[1] <= self.ttl_s

    def grant(self, ids: List[int], holder: str = "", now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        for i in ids:
            self._ids.pop(i, None)
            self._ids[i] = (holder, now)
        while len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)

    def take(self, ids: Any, holder: str = "", now: Optional[float] = None) -> List[int]:
        """Validate an ack's ids (integers, all leased to ``holder`` and current) and end their lease."""
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"ack needs 'ids': a list of integers (not booleans), got {str(ids)[:80]}")
        now = time.monotonic() if now is None else now
        bad = []
        for i in ids:
            got = self._ids.get(i)
            if got is None or got[0] != holder or now - got[1] > self.ttl_s:
                bad.append(i)
        if bad:
            raise NotLeased(bad)
        for i in ids:
            self._ids.pop(i, None)
        return ids


def check_version(req: Dict[str, Any], who: str) -> None:
    """Refuse a request whose ``v`` is not exactly the JSON integer 1 (missing, ``true``, ``1.0``, ``"1"``)."""
    v = req.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        got = "missing" if "v" not in req else f"{v!r} ({type(v).__name__})"
        raise ValueError(f"protocol version {got} not supported; {who} speaks the integer {PROTOCOL_VERSION}: "
                         f'send {{"v": {PROTOCOL_VERSION}, "op": ...}}')


FILTER_KEYS = ("camera", "since", "until", "decision", "reason", "kind")


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on 127.0.0.0/8, ::1 or localhost."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if ";" in host:  # "source;dest" form: judge the bound side
        host = host.split(";")[-1]
    return host == "localhost" or host == "::1" or host.startswith("127.")


#: The CURVE role domain (nexedge.serve.auth.DOMAIN_ROLES) of each endpoint, by its config key.
DOMAINS = {"pull.bind": "pull", "lifecycle.control": "control"}


def bind_router(bind: str, auth: Optional[CurveConfig], key: str, max_message_bytes: int,
                guards: Optional[GuardRegistry] = None, heartbeat_s: float = 10.0,
                before_bind: Optional[Callable[[zmq.Socket], Optional[zmq.Socket]]] = None
                ) -> Tuple[zmq.Context, zmq.Socket]:
    """A ROUTER socket on its own context for a small request/reply endpoint (pull, control): CURVE
    server when ``auth`` is given, parts over ``max_message_bytes`` dropped, keepalive and heartbeats
    when ``guards`` is given, ``before_bind(sock)`` called (it may return a socket of its own, the memory
    guard's monitor), bound to ``bind`` (RuntimeError naming config ``key`` when that fails; nothing is
    left open then)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    extra: Optional[zmq.Socket] = None
    try:
        if guards is not None:
            SocketGuard.configure(sock, heartbeat_s)
        if auth is not None:  # only the keys of this endpoint's role get in
            auth.apply_server(sock, monitor=guards is None, domain=DOMAINS.get(key, "*"))
        if before_bind is not None:
            extra = before_bind(sock)
        try:
            sock.bind(bind)
        except zmq.ZMQError as e:
            raise RuntimeError(f"cannot bind {key}={bind!r}: {e}") from e
    except BaseException:
        if extra is not None:
            extra.close(linger=0)
        close_router(ctx, sock, auth)
        raise
    return ctx, sock


def close_router(ctx: zmq.Context, sock: Optional[zmq.Socket], auth: Optional[CurveConfig]) -> None:
    """Close what :func:`bind_router` opened (the serving thread closes its socket itself)."""
    if sock is not None:
        sock.close(linger=0)
    if auth is not None:
        auth.stop(ctx)
    ctx.term()


def split_envelope(msg: List[Any]) -> Tuple[List[Any], List[Any]]:
    """(routing head, body) of a ROUTER message: REQ peers send [identity, b"", request...];
    DEALER peers may omit the delimiter. Unlike :func:`nexedge.serve.protocol.split_envelope` (frames
    endpoint: the envelope becomes bytes, queued for a later reply) the head keeps the received
    ``zmq.Frame`` objects, whose ``User-Id`` property names the client's CURVE key."""
    if len(msg) >= 3 and bytes(msg[1]) == b"":
        return msg[:2], msg[2:]
    return msg[:1], msg[1:]


#: Connections the pull and control endpoints take at once (each serves a handful of operators).
SMALL_ENDPOINT_PEERS = 16


class RouterThread:
    """Start/stop of a ROUTER socket served by ``self._serve(sock, *args)`` on a background thread:
    the pull and the control endpoints. With ``guards`` (the daemon's :class:`GuardRegistry`) the
    socket gets a memory guard: a peer may hold at most two requests' worth of unread bytes, an
    unfinished request times out after 10 s, at most SMALL_ENDPOINT_PEERS connections."""

    auth: Optional[CurveConfig]
    endpoint: Optional[str]
    guards: Optional[GuardRegistry] = None
    _log = log

    def _init_thread(self) -> None:
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._ctx: Optional[zmq.Context] = None
        self._guard: Optional[SocketGuard] = None

    def _serve(self, sock: zmq.Socket, *args: Any) -> None:
        raise NotImplementedError

    def _bind_router(self, bind: str, key: str, max_message_bytes: int) -> Tuple[zmq.Context, zmq.Socket]:
        guards = self.guards

        def attach(sock: zmq.Socket) -> Optional[zmq.Socket]:  # before bind: the monitor sees every connection
            if guards is None:
                return None
            failed = self.auth.handshake_failed if self.auth is not None else None
            self._guard = SocketGuard(sock, key, Limits(2 * max_message_bytes + (64 << 10), 10.0,
                                                        SMALL_ENDPOINT_PEERS), guards, failed)
            return self._guard.monitor

        try:
            return bind_router(bind, self.auth, key, max_message_bytes, guards, before_bind=attach)
        except BaseException:
            if self._guard is not None:
                self._guard.registry.remove(self._guard)
                self._guard = None
            raise

    def _poll(self, sock: zmq.Socket) -> bool:
        """Wait briefly for a request; run the memory guard meanwhile."""
        got = bool(sock.poll(20))
        if self._guard is not None:
            self._guard.tick()
        return got

    def _recv(self, sock: zmq.Socket, max_parts: int = 4) -> List[Any]:
        """One message (copy=False frames), keeping at most ``max_parts`` parts; credited to its peer."""
        first = sock.recv(copy=False)
        frames, parts, size, more = [first], 0, 0, first.more
        while more:
            f = sock.recv(copy=False)
            more = f.more
            parts += 1
            size += len(f)
            if len(frames) <= max_parts:
                frames.append(f)
        if self._guard is not None:
            try:
                self._guard.consumed(first.get(zmq.SRCFD), parts, size)
            except zmq.ZMQError:
                pass
        return frames  # past max_parts the request is refused for its part count (handlers see > 1 body part)

    def _start_thread(self, ctx: zmq.Context, sock: zmq.Socket, args: Tuple[Any, ...], name: str, what: str) -> None:
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ctx = ctx
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, args=(sock,) + args, name=name, daemon=True)
        self._thread.start()
        self._log.info("%s endpoint on %s (%s)", what, self.endpoint, "CURVE" if self.auth else "loopback, no auth")

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop serving within ``timeout``; False when the thread is still busy (e.g. a model load): its
        context is then left for process exit instead of waiting for it."""
        if self._thread is None:
            return True
        self._stop.set()
        self._thread.join(timeout)
        alive = self._thread.is_alive()
        self._thread = None
        if self._guard is not None:
            self._guard.registry.remove(self._guard)
        if alive:
            self._log.warning("%s endpoint still busy after %.1f s; not waiting for it", self.endpoint, timeout)
            return False
        if self._guard is not None:
            self._guard.close()
        if self._ctx is not None:
            close_router(self._ctx, None, self.auth)
        self._ctx = None
        return True


class PullServer(RouterThread):
    """A thread with its own ROUTER socket serving one :class:`SampleStore` (read + ack)."""

    def __init__(
        self,
        store_root: str,
        bind: str = "tcp://127.0.0.1:5557",
        auth: Optional[CurveConfig] = None,
        max_page_bytes: int = 16 << 20,
        guards: Optional[GuardRegistry] = None,
        lease_s: float = LEASE_S,
    ) -> None:
        if auth is None and not is_loopback(bind):
            raise ValueError(
                f"pull endpoint bind {bind!r} is not loopback: it hands out images, so it needs "
                "CurveZMQ authentication (configure a server key and an allowed-clients folder) "
                "or a loopback address such as tcp://127.0.0.1:5557"
            )
        self.store_root = store_root
        self.bind = bind
        self.auth = auth
        self.guards = guards
        self.max_page_bytes = int(max_page_bytes)
        self.endpoint: Optional[str] = None
        self.counters: Dict[str, int] = {"requests": 0, "samples_sent": 0, "acked": 0, "errors": 0}
        self.lease = Lease(ttl_s=lease_s)
        self._init_thread()

    @property
    def refused(self) -> int:
        """Connection attempts refused by authentication (0 without auth)."""
        return self.auth.refused if self.auth is not None else 0

    def start(self) -> "PullServer":
        """Bind (errors surface here) and serve in a background thread."""
        if self._thread is not None:
            raise RuntimeError("pull server already started")
        store = SampleStore(self.store_root, writer=False)
        try:  # requests are small JSON; anything over 1 MiB is dropped
            ctx, sock = self._bind_router(self.bind, "pull.bind", 1 << 20)
        except BaseException:
            store.close()
            raise
        self._start_thread(ctx, sock, (store,), "pull-server", "pull")
        return self

    def __enter__(self) -> "PullServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- serving --------------------------------------------------------------
    def _serve(self, sock: zmq.Socket, store: SampleStore) -> None:
        try:
            while not self._stop.is_set():
                if not self._poll(sock):
                    continue
                head, body = split_envelope(self._recv(sock))
                self.counters["requests"] += 1
                try:
                    reply = self._handle(store, body, head[0])
                except Exception as e:  # a bad request must not stop the endpoint
                    self.counters["errors"] += 1
                    log.warning("pull request failed: %s", e)
                    err: Dict[str, Any] = {"ok": False, "error": str(e)}
                    if isinstance(e, NotLeased):
                        err["not_leased"] = e.ids[:100]
                    reply = [json.dumps(err).encode()]
                sock.send_multipart([bytes(f) for f in head] + reply, copy=False)
        finally:
            sock.close(linger=0)
            store.close()

    def _holder(self, ident: Any, req: Dict[str, Any]) -> str:
        """Who holds the leases of this request: the client's CURVE key (under auth) or its connection,
        plus the ``session`` it names."""
        key = None
        if self.auth is not None:
            try:
                key = ident.get("User-Id")
            except (zmq.ZMQError, AttributeError):
                key = None
        who = f"key:{key}" if key else f"conn:{bytes(ident).hex()}"
        session = req.get("session")
        if isinstance(session, str) and 0 < len(session) <= 64:
            who = (f"key:{key}" if key else "loopback") + "|" + session
        return who

    def _handle(self, store: SampleStore, body: List[Any], ident: Any = b"") -> List[bytes]:
        if len(body) != 1:
            raise ValueError(f"expected one JSON request frame, got {len(body)} frames")
        try:
            req = json.loads(bytes(body[0]).decode("utf-8"))
        except (ValueError, RecursionError):
            raise ValueError("request is not valid UTF-8 JSON") from None
        if not isinstance(req, dict):
            raise ValueError("request must be a JSON object")
        check_version(req, "this pull endpoint")
        op = req.get("op")
        holder = self._holder(ident, req)
        if op == "hello":
            st = store.stats()
            return [_j({"ok": True, "v": PROTOCOL_VERSION, "store_id": store.store_id, "pending": st["pending"]})]
        if op == "page":
            return self._page(store, req, holder)
        if op == "ack":
            ids = self.lease.take(req.get("ids"), holder)
            n = store.mark_pulled(ids)
            self.counters["acked"] += n
            return [_j({"ok": True, "acked": n})]
        raise ValueError(f"unknown op {op!r}; expected hello, page or ack")

    def _page(self, store: SampleStore, req: Dict[str, Any], holder: str) -> List[bytes]:
        filters = req.get("filters") or {}
        if not isinstance(filters, dict) or set(filters) - set(FILTER_KEYS):
            raise ValueError(f"filters must be an object with keys from {FILTER_KEYS}, got {filters!r}")
        limit = req.get("limit", 64)
        after = req.get("after_id")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        if after is not None and (not isinstance(after, int) or isinstance(after, bool)):
            raise ValueError(f"after_id must be an integer or null, got {after!r}")
        limit = min(limit, MAX_PAGE)
        now = time.monotonic()
        rows: List[Dict[str, Any]] = []
        cursor, last_seen, elsewhere = after, None, 0
        while len(rows) < limit:  # rows leased to another client are skipped, not handed out twice
            got = store.query(after_id=cursor, limit=limit, pending_only=True, **filters)
            for r in got:
                if self.lease.held_elsewhere(r["id"], holder, now):
                    elsewhere += 1
                elif len(rows) < limit:
                    rows.append(r)
            if len(got) < limit:
                break
            cursor = last_seen = got[-1]["id"]
        out_rows, blobs, size, skipped = [], [], 0, 0
        for r in rows:
            try:
                data = store.read_image(r)
            except FileNotFoundError:  # removed by retention after the query
                skipped += 1
                continue
            if blobs and size + len(data) > self.max_page_bytes:
                break
            out_rows.append(r)
            blobs.append(data)
            size += len(data)
        self.counters["samples_sent"] += len(out_rows)
        self.lease.grant([r["id"] for r in out_rows], holder, now)
        header = {"ok": True, "samples": out_rows, "skipped": skipped, "leased_elsewhere": elsewhere,
                  "store_id": store.store_id}
        if not out_rows and (rows or last_seen is not None):  # nothing handed out: let the client move past
            header["next_after_id"] = rows[-1]["id"] if rows else last_seen
        return [_j(header)] + blobs


def _j(obj: Dict[str, Any]) -> bytes:
    return json.dumps(obj).encode("utf-8")
