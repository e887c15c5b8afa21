"""``nexedge pull``: copy pending uncertain samples out of a store (local path or a
daemon's pull endpoint) into an export folder, then acknowledge them.

Order per page: write every image (content-hash name, atomic, skipped when
present) -> append the page's manifest rows (one write + fsync) -> acknowledge.
A pull killed anywhere re-sends at most the unacknowledged page on the next
run, and the manifest (keyed by ``sample_id`` = store id + row id) keeps each
sample exactly once.
"""

import hashlib
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from nexedge.relabel.formats import (
    ManifestWriter,
    manifest_row_from_sample,
)
from nexedge.store import SampleStore, normalize_ext, write_atomic
from nexedge.store.files import TMP_PREFIX, try_flock

log = logging.getLogger(__name__)

FILTER_KEYS = ("camera", "since", "until", "decision", "reason", "kind")


class LocalSource:
    """Pull straight from a store folder (reader connection; the daemon may be running)."""

    def __init__(self, store_root: str) -> None:
        self.store = SampleStore(store_root, writer=False)
        self.name = "store:" + os.path.abspath(store_root)

    def hello(self) -> Dict[str, Any]:
        return {"store_id": self.store.store_id, "pending": self.store.stats()["pending"]}

    def page(self, filters: Dict[str, Any], after_id: Optional[int], limit: int) -> Tuple[List[Dict[str, Any]], List[bytes], Optional[int]]:
        rows = self.store.query(after_id=after_id, limit=limit, pending_only=True, **filters)
        out, blobs = [], []
        for r in rows:
            try:
                blobs.append(self.store.read_image(r))
                out.append(r)
            except FileNotFoundError:  # retention removed it after the query
                continue
        nxt = rows[-1]["id"] if rows and not out else None
        return out, blobs, nxt

    def ack(self, ids: List[int]) -> int:
        return self.store.mark_pulled(ids)

    def close(self) -> None:
        self.store.close()


class LeaseLost(RuntimeError):
    """The endpoint no longer holds the page being acknowledged (e.g. it restarted): page again."""


class RemoteSource:
    """Pull from a daemon's :class:`~nexedge.serve.pullserver.PullServer` (REQ socket,
    Lazy-Pirate retries: a timed-out request is re-sent on a fresh socket)."""

    def __init__(
        self,
        connect: str,
        client_secret: Optional[str] = None,
        server_public: Optional[str] = None,
        timeout_s: float = 10.0,
        retries: int = 3,
    ) -> None:
        import zmq

        if (client_secret is None) != (server_public is None):
            raise ValueError("CURVE needs both --client-key (your *.key_secret) and --server-key (the daemon's *.key)")
        self._zmq = zmq
        self.connect = connect
        self.name = connect
        self.timeout_ms = int(timeout_s * 1000)
        self.retries = int(retries)
        self.curve = None
        if client_secret is not None:
            from nexedge.serve.auth import CurveClient

            self.curve = CurveClient(client_secret, server_public)
        self.ctx = zmq.Context()
        self.sock = None
        import uuid

        self.session = uuid.uuid4().hex  # the pull endpoint leases pages to this session, across retries

    def _socket(self) -> Any:
        zmq = self._zmq
        s = self.ctx.socket(zmq.REQ)
        s.linger = 0
        if self.curve is not None:
            self.curve.apply_client(s)
        s.connect(self.connect)
        return s

    def _call(self, req: Dict[str, Any]) -> Tuple[Dict[str, Any], List[bytes]]:
        req = dict(req, v=1, session=self.session)
        for attempt in range(self.retries + 1):
            if self.sock is None:
                self.sock = self._socket()
            self.sock.send(json.dumps(req).encode("utf-8"))
            if self.sock.poll(self.timeout_ms):
                frames = self.sock.recv_multipart()
                head = json.loads(frames[0].decode("utf-8"))
                if not head.get("ok") and "not_leased" in head:
                    raise LeaseLost(f"pull endpoint {self.connect}: {head.get('error')}")
                if not head.get("ok"):
                    raise RuntimeError(f"pull endpoint {self.connect} refused {req['op']!r}: {head.get('error')}")
                return head, frames[1:]
            self.sock.close(linger=0)  # REQ is stuck after a lost reply: start over
            self.sock = None
            log.warning("no reply from %s within %.1f s (attempt %d of %d)", self.connect,
                        self.timeout_ms / 1000, attempt + 1, self.retries + 1)
        raise RuntimeError(
            f"pull endpoint {self.connect} did not answer after {self.retries + 1} attempts "
            "(daemon down, pull endpoint off, or authentication refused: check keys)"
        )

    def hello(self) -> Dict[str, Any]:
        head, _ = self._call({"op": "hello"})
        return head

    def page(self, filters: Dict[str, Any], after_id: Optional[int], limit: int) -> Tuple[List[Dict[str, Any]], List[bytes], Optional[int]]:
        head, blobs = self._call({"op": "page", "filters": filters, "after_id": after_id, "limit": limit})
        rows = head["samples"]
        if len(rows) != len(blobs):
            raise RuntimeError(f"pull endpoint sent {len(rows)} rows but {len(blobs)} images")
        return rows, blobs, head.get("next_after_id")

    def ack(self, ids: List[int]) -> int:
        head, _ = self._call({"op": "ack", "ids": ids})
        return int(head["acked"])

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.ctx.term()


def clean_filters(**kw: Any) -> Dict[str, Any]:
    """Drop unset filters; validate the time range."""
    f = {k: v for k, v in kw.items() if v is not None}
    bad = set(f) - set(FILTER_KEYS)
    if bad:
        raise ValueError(f"unknown pull filters {sorted(bad)}; expected some of {FILTER_KEYS}")
    if "since" in f and "until" in f and float(f["since"]) >= float(f["until"]):
        raise ValueError(f"empty time range: since {f['since']} is not before until {f['until']}")
    return f


def pull(
    source: Any,
    out_dir: str,
    filters: Optional[Dict[str, Any]] = None,
    limit: Optional[int] = None,
    page_size: int = 64,
    progress: bool = False,
    stop_after_pages: Optional[int] = None,
) -> Dict[str, int]:
    """Copy pending samples from ``source`` into ``out_dir`` and acknowledge them.

    Returns counts: ``received`` (samples handled), ``new`` (manifest rows
    added), ``already`` (in the manifest from an interrupted run), ``files``
    (image files written), ``acked``.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if page_size < 1:
        raise ValueError(f"page size must be >= 1, got {page_size}")
    filters = clean_filters(**(filters or {}))
    with _OutLock(out_dir):
        if hasattr(source, "session"):  # the lease follows the export folder: a rerun after a crash keeps it
            source.session = _folder_session(out_dir)
        return _pull(source, out_dir, filters, limit, page_size, progress, stop_after_pages)


def _folder_session(out_dir: str) -> str:
    """The pull session id of an export folder (``.pull.session``, made on first use)."""
    import uuid

    path = os.path.join(out_dir, ".pull.session")
    try:
        with open(path, encoding="ascii") as f:
            sid = f.read().strip()
        if 0 < len(sid) <= 64 and sid.isalnum():
            return sid
    except (OSError, UnicodeDecodeError):
        pass
    sid = uuid.uuid4().hex
    write_atomic(path, sid.encode("ascii"))
    return sid


class _OutLock:
    """One pull at a time per export folder; clears temp files a killed pull left."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.fd: Optional[int] = None

    def __enter__(self) -> "_OutLock":
        images = os.path.join(self.out_dir, "images")
        os.makedirs(images, exist_ok=True)
        self.fd = try_flock(os.path.join(self.out_dir, ".pull.lock"))
        if self.fd is None:
            raise RuntimeError(f"another pull is writing into {self.out_dir}; wait for it or use another --out")
        for name in os.listdir(images):
            if name.startswith(TMP_PREFIX):
                os.unlink(os.path.join(images, name))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _pull(source: Any, out_dir: str, filters: Dict[str, Any], limit: Optional[int], page_size: int,
          progress: bool, stop_after_pages: Optional[int]) -> Dict[str, int]:
    manifest = ManifestWriter(out_dir)
    info = source.hello()
    store_id = info.get("store_id") or ""
    counts = {"received": 0, "new": 0, "already": 0, "files": 0, "acked": 0}
    bar = None
    if progress:
        from nexedge.progress import progress as _bar

        total = info.get("pending")
        bar = _bar(total=min(total, limit) if (limit is not None and total is not None) else total,
                   unit="img", desc="pull", leave=True)
    after: Optional[int] = None
    pages = relet = 0
    try:
        while limit is None or counts["received"] < limit:
            n = page_size if limit is None else min(page_size, limit - counts["received"])
            rows, blobs, nxt = source.page(filters, after, n)
            if not rows:
                if nxt is None:
                    break
                after = nxt  # a page whose images all vanished: move past it
                continue
            new_rows = []
            for row, data in zip(rows, blobs):
                if hashlib.sha256(data).hexdigest() != row["sha256"]:
                    raise RuntimeError(
                        f"sample {row['id']}: received bytes do not match sha256 {row['sha256']} (nothing acknowledged)"
                    )
                rel = os.path.join("images", "{}.{}".format(row["sha256"], normalize_ext(row["ext"])))
                path = os.path.join(out_dir, rel)
                if not os.path.exists(path):
                    write_atomic(path, data)
                    counts["files"] += 1
                rec = manifest_row_from_sample(row, rel, store_id, source.name)
                if manifest.has(rec["sample_id"]):
                    counts["already"] += 1
                else:
                    new_rows.append(rec)
            manifest.append(new_rows)
            counts["new"] += len(new_rows)
            try:
                counts["acked"] += source.ack([r["id"] for r in rows])
            except LeaseLost as e:  # the manifest has these rows: paging again re-sends them as "already"
                relet += 1
                if relet > 3:
                    raise
                log.warning("%s; paging again", e)
                continue
            relet = 0
            counts["received"] += len(rows)
            after = rows[-1]["id"]
            if bar is not None:
                bar.update(len(rows))
            pages += 1
            if stop_after_pages is not None and pages >= stop_after_pages:
                break
    finally:
        if bar is not None:
            bar.close()
    log.info("pulled %d samples from %s into %s (%d new, %d files)", counts["received"], source.name, out_dir,
             counts["new"], counts["files"])
    return counts


def open_source(
    store: Optional[str] = None,
    connect: Optional[str] = None,
    client_key: Optional[str] = None,
    server_key: Optional[str] = None,
    timeout_s: float = 10.0,
    retries: int = 3,
) -> Any:
    """A LocalSource for ``store`` or a RemoteSource for ``connect`` (exactly one)."""
    if (store is None) == (connect is None):
        raise ValueError("give exactly one of --store PATH or --connect tcp://HOST:PORT")
    if store is not None:
        return LocalSource(store)
    return RemoteSource(connect, client_key, server_key, timeout_s=timeout_s, retries=retries)


def pull_and_export(
    out_dir: str,
    formats: Tuple[str, ...] = ("manifest",),
    store: Optional[str] = None,
    connect: Optional[str] = None,
    client_key: Optional[str] = None,
    server_key: Optional[str] = None,
    filters: Optional[Dict[str, Any]] = None,
    limit: Optional[int] = None,
    classes: Optional[List[str]] = None,
    progress: bool = False,
) -> Dict[str, Any]:
    """One call for the whole loop's first half: pull, then write the export formats
    from the (complete) manifest. Returns the pull counts and the files written."""
    from nexedge.relabel.formats import export_formats

    src = open_source(store, connect, client_key, server_key)
    try:
        counts = pull(src, out_dir, filters=filters, limit=limit, progress=progress)
    finally:
        src.close()
    written = export_formats(out_dir, formats, classes=classes)
    return {"counts": counts, "written": written, "time": time.time()}
