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
  client has written the samples and its manifest; they become *pulled*. Only
  integer ids handed out by a ``page`` of this server (the current lease: the
  last ``MAX_LEASE`` ids handed out and not yet acknowledged, for ``LEASE_S``
  seconds) are accepted; anything else refuses the whole ack with
  ``{"ok": false, "error": "... not leased ...", "not_leased": [...]}`` and the
  client pages again.
* any error -> ``{"ok": false, "error": "..."}``.

The endpoint hands out proprietary images: binding anything but loopback
(127.0.0.0/8, ::1, localhost, ipc://, inproc://) needs a :class:`CurveConfig`.

Python 3.8, no torch.
"""

import collections
import json
import logging
import threading
import time
from typing import Any, Dict, List, Optional, Tuple
from typing import OrderedDict as OrderedDictT

import zmq

from nexedge.serve.auth import CurveConfig
from nexedge.store import SampleStore

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_PAGE = 256
#: The lease: ids handed out by ``page`` and not yet acknowledged (bounded; oldest forgotten first).
MAX_LEASE = 8192
LEASE_S = 600.0


class NotLeased(ValueError):
    """An ack named ids this server did not hand out (or whose lease lapsed)."""

    def __init__(self, ids: List[Any]) -> None:
        super().__init__(f"ids {ids[:10]} were not leased by a page of this endpoint (never handed out, already "
                         "acknowledged, or the lease lapsed); page them again before acknowledging")
        self.ids = ids


class Lease:
    """Ids handed out to clients, with the time they were handed out."""

    def __init__(self, max_ids: int = MAX_LEASE, ttl_s: float = LEASE_S) -> None:
        self.max_ids, self.ttl_s = max_ids, ttl_s
        self._ids: OrderedDictT[int, float] = collections.OrderedDict()

    def grant(self, ids: List[int], now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        for i in ids:
            self._ids.pop(i, None)
            self._ids[i] = now
        while len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)

    def take(self, ids: Any, now: Optional[float] = None) -> List[int]:
        """Validate an ack's ids (integers, all leased and current) and end their lease."""
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"ack needs 'ids': a list of integers (not booleans), got {str(ids)[:80]}")
        now = time.monotonic() if now is None else now
        bad = [i for i in ids if now - self._ids.get(i, -1e18) > self.ttl_s]
        if bad:
            raise NotLeased(bad)
        for i in ids:
            self._ids.pop(i, None)
        return ids
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


def bind_router(bind: str, auth: Optional[CurveConfig], key: str, max_message_bytes: int) -> Tuple[zmq.Context,
                                                                                                 zmq.Socket]:
    """A ROUTER socket on its own context for a small request/reply endpoint (pull, control): CURVE
    server when ``auth`` is given, requests over ``max_message_bytes`` dropped, bound to ``bind``
    (RuntimeError naming config ``key`` when that fails; nothing is left open then)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    try:
        if auth is not None:
            auth.apply_server(sock)
        try:
            sock.bind(bind)
        except zmq.ZMQError as e:
            raise RuntimeError(f"cannot bind {key}={bind!r}: {e}") from e
    except BaseException:
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
    DEALER peers may omit the delimiter."""
    if len(msg) >= 3 and bytes(msg[1]) == b"":
        return msg[:2], msg[2:]
    return msg[:1], msg[1:]


class RouterThread:
    """Start/stop of a ROUTER socket served by ``self._serve(sock, *args)`` on a background thread:
    the pull and the control endpoints."""

    auth: Optional[CurveConfig]
    endpoint: Optional[str]
    _log = log

    def _init_thread(self) -> None:
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._ctx: Optional[zmq.Context] = None

    def _serve(self, sock: zmq.Socket, *args: Any) -> None:
        raise NotImplementedError

    def _start_thread(self, ctx: zmq.Context, sock: zmq.Socket, args: Tuple[Any, ...], name: str, what: str) -> None:
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ctx = ctx
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, args=(sock,) + args, name=name, daemon=True)
        self._thread.start()
        self._log.info("%s endpoint on %s (%s)", what, self.endpoint, "CURVE" if self.auth else "loopback, no auth")

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        self._thread = None
        if self._ctx is not None:
            close_router(self._ctx, None, self.auth)
        self._ctx = None


class PullServer(RouterThread):
    """A thread with its own ROUTER socket serving one :class:`SampleStore` (read + ack)."""

    def __init__(
        self,
        store_root: str,
        bind: str = "tcp://127.0.0.1:5557",
        auth: Optional[CurveConfig] = None,
        max_page_bytes: int = 16 << 20,
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
        self.max_page_bytes = int(max_page_bytes)
        self.endpoint: Optional[str] = None
        self.counters: Dict[str, int] = {"requests": 0, "samples_sent": 0, "acked": 0, "errors": 0}
        self.lease = Lease()
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
            ctx, sock = bind_router(self.bind, self.auth, "pull.bind", 1 << 20)
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
                if not sock.poll(100):
                    continue
                head, body = split_envelope(sock.recv_multipart())
                self.counters["requests"] += 1
                try:
                    reply = self._handle(store, body)
                except Exception as e:  # a bad request must not stop the endpoint
                    self.counters["errors"] += 1
                    log.warning("pull request failed: %s", e)
                    err: Dict[str, Any] = {"ok": False, "error": str(e)}
                    if isinstance(e, NotLeased):
                        err["not_leased"] = e.ids[:100]
                    reply = [json.dumps(err).encode()]
                sock.send_multipart(head + reply, copy=False)
        finally:
            sock.close(linger=0)
            store.close()

    def _handle(self, store: SampleStore, body: List[bytes]) -> List[bytes]:
        if len(body) != 1:
            raise ValueError(f"expected one JSON request frame, got {len(body)} frames")
        try:
            req = json.loads(body[0].decode("utf-8"))
        except (ValueError, RecursionError):
            raise ValueError("request is not valid UTF-8 JSON") from None
        if not isinstance(req, dict):
            raise ValueError("request must be a JSON object")
        if req.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {req.get('v')!r} not supported; this server speaks {PROTOCOL_VERSION}")
        op = req.get("op")
        if op == "hello":
            st = store.stats()
            return [_j({"ok": True, "v": PROTOCOL_VERSION, "store_id": store.store_id, "pending": st["pending"]})]
        if op == "page":
            return self._page(store, req)
        if op == "ack":
            ids = self.lease.take(req.get("ids"))
            n = store.mark_pulled(ids)
            self.counters["acked"] += n
            return [_j({"ok": True, "acked": n})]
        raise ValueError(f"unknown op {op!r}; expected hello, page or ack")

    def _page(self, store: SampleStore, req: Dict[str, Any]) -> List[bytes]:
        filters = req.get("filters") or {}
        if not isinstance(filters, dict) or set(filters) - set(FILTER_KEYS):
            raise ValueError(f"filters must be an object with keys from {FILTER_KEYS}, got {filters!r}")
        limit = req.get("limit", 64)
        after = req.get("after_id")
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        if after is not None and not isinstance(after, int):
            raise ValueError(f"after_id must be an integer or null, got {after!r}")
        rows = store.query(after_id=after, limit=min(limit, MAX_PAGE), pending_only=True, **filters)
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
        self.lease.grant([r["id"] for r in out_rows])
        header = {"ok": True, "samples": out_rows, "skipped": skipped, "store_id": store.store_id}
        if not out_rows and rows:  # everything in this page vanished: let the client move past it
            header["next_after_id"] = rows[-1]["id"]
        return [_j(header)] + blobs


def _j(obj: Dict[str, Any]) -> bytes:
    return json.dumps(obj).encode("utf-8")
