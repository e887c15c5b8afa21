"""Uncertain-sample store: SQLite (WAL) rows plus content-addressed image files.

Layout under ``root``::

    samples.db                 SQLite, WAL journal; one row per logged frame
    images/ab/<sha256>.<ext>   the original image bytes, written atomically
    writer.lock                held (flock) by the one writing process

Write order: the image file is written to a temp name, fsynced and
``os.replace``d into place *before* the row that names it is committed, so a
committed row always has its file. A crash can leave a temp file or an
unreferenced image; the writer removes both when it opens the store.

One writer (the daemon's background writer thread) adds rows; any number of
readers (pull server, ``nexedge pull --store``) query, read images and mark
samples pulled. Readers open with ``writer=False``.

Retention (``quota_bytes`` counts image bytes on disk plus ``ROW_BYTES`` per
row, so duplicates of one image cannot grow the database without bound): when a
new sample would exceed the quota, samples already pulled are deleted first
(oldest first), then not-yet-pulled ``recheck`` samples (frames that were never
inspected), then not-yet-pulled ``audit`` samples. Pending ``band`` and
``drift`` samples are never deleted to make room; if the quota still cannot be
met, :meth:`SampleStore.add` returns None and counts a drop.

Python 3.8, no torch.
"""

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from typing import Any, Dict, Iterable, List, Optional, Sequence

from nexedge.store.files import IMAGES, TMP_PREFIX, blob_relpath, normalize_ext, write_atomic

try:  # POSIX only; without it the single-writer rule is not enforced
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: 2 added ``samples.shadow`` (the candidate model's verdict on a shadow disagreement); a version-1
#: store is migrated in place by its writer, and read as it is (shadow NULL) by readers.
SCHEMA_VERSION = 2
#: What one row costs against the quota (SQLite row, its four index entries, page slack; measured
#: about 300-400 bytes for typical metadata). Counted so duplicate images cannot grow the
#: database without bound while the image bytes stay under the quota.
ROW_BYTES = 512
KINDS = ("band", "audit", "recheck", "drift", "shadow")
DB_NAME = "samples.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY,
    ext TEXT NOT NULL,
    size INTEGER NOT NULL,
    refs INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL REFERENCES blobs(sha256),
    camera TEXT NOT NULL,
    frame_id TEXT,
    ts REAL NOT NULL,
    model_id TEXT,
    threshold REAL,
    score REAL,
    probs TEXT,
    decision TEXT,
    reason TEXT,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    pulled REAL,
    shadow TEXT
);
CREATE INDEX IF NOT EXISTS samples_pending ON samples (pulled, id);
CREATE INDEX IF NOT EXISTS samples_camera_ts ON samples (camera, ts);
CREATE INDEX IF NOT EXISTS samples_kind ON samples (kind, pulled, id);
CREATE INDEX IF NOT EXISTS samples_sha ON samples (sha256);
"""

_COLUMNS = (
    "id", "sha256", "camera", "frame_id", "ts", "model_id", "threshold", "score",
    "probs", "decision", "reason", "kind", "created", "pulled", "shadow",
)


def _opt_float(meta: Dict[str, Any], key: str) -> Optional[float]:
    v = meta.get(key)
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"sample meta {key!r} must be a number, got {v!r}") from None


class SampleStore:
    """SQLite + content-addressed files. See the module docstring for the rules.

    ``writer=True`` (default) takes the store's writer lock, cleans up after a
    crash and allows :meth:`add`; readers pass ``writer=False`` and may query,
    read images and :meth:`mark_pulled`.
    """

    def __init__(
        self,
        root: str,
        quota_bytes: Optional[int] = None,
        writer: bool = True,
        busy_timeout_ms: int = 10000,
    ) -> None:
        if quota_bytes is not None and int(quota_bytes) <= 0:
            raise ValueError(f"quota_bytes must be positive or None, got {quota_bytes!r}")
        self.root = os.path.abspath(root)
        self.quota_bytes = None if quota_bytes is None else int(quota_bytes)
        self.writer = bool(writer)
        self.dropped = 0  # adds refused because the quota could not be met
        self.evicted = 0  # samples deleted by retention
        self._lock = threading.RLock()
        self._lock_fd: Optional[int] = None
        db_path = os.path.join(self.root, DB_NAME)
        if self.writer:
            os.makedirs(os.path.join(self.root, IMAGES), exist_ok=True)
            self._take_writer_lock()
        elif not os.path.exists(db_path):
            raise FileNotFoundError(f"no sample store at {self.root} ({DB_NAME} not found)")
        self._db = sqlite3.connect(
            db_path, timeout=busy_timeout_ms / 1000.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        if self.writer:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._init_schema()
        self.store_id = self._meta_get("store_id") or ""
        self._bytes = self._count_bytes()
        self._rows = self._count_rows()
        if self.writer:
            self.recover()

    # -- setup -----------------------------------------------------------
    def _take_writer_lock(self) -> None:
        if fcntl is None:
            return
        path = os.path.join(self.root, "writer.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                other = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            raise RuntimeError(
                f"sample store {self.root} already has a writer (pid {other or '?'}); "
                "open it with writer=False to read"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        self._lock_fd = fd

    def _init_schema(self) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, 1, SCHEMA_VERSION):
                    raise RuntimeError(
                        f"sample store {self.root} has schema version {version}; this nexedge reads {SCHEMA_VERSION}"
                    )
                for stmt in _SCHEMA.split(";"):  # executescript() would commit mid-transaction
                    if stmt.strip():
                        self._db.execute(stmt)
                if version == 1:
                    self._db.execute("ALTER TABLE samples ADD COLUMN shadow TEXT")
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self._db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)", (uuid.uuid4().hex,)
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _has_shadow(self) -> bool:
        """Whether the samples table has the ``shadow`` column (a reader of a version-1 store: no)."""
        if getattr(self, "_shadow_col", None) is None:
            with self._lock:
                cols = [r[1] for r in self._db.execute("PRAGMA table_info(samples)")]
            self._shadow_col = "shadow" in cols
        return bool(self._shadow_col)

    def _meta_get(self, key: str) -> Optional[str]:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _count_bytes(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0])

    def _count_rows(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def _usage(self) -> int:
        """What counts against the quota: image bytes plus ROW_BYTES per row."""
        return self._bytes + self._rows * ROW_BYTES

    def recover(self) -> Dict[str, int]:
        """Writer only: remove temp files and image files no row refers to (crash leftovers)."""
        if not self.writer:
            raise RuntimeError("recover() needs the writer (open the store with writer=True)")
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT sha256 FROM blobs")}
        temps = orphans = 0
        top = os.path.join(self.root, IMAGES)
        for sub in sorted(os.listdir(top)):
            folder = os.path.join(top, sub)
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if name.startswith(TMP_PREFIX):
                    os.unlink(path)
                    temps += 1
                elif name.split(".", 1)[0] not in known:
                    os.unlink(path)
                    orphans += 1
        if temps or orphans:
            log.warning("sample store %s: removed %d temp and %d orphan files left by a crash", self.root, temps, orphans)
        return {"temp_files": temps, "orphan_files": orphans}

    # -- writing -----------------------------------------------------------
    def add(self, image_bytes: bytes, ext: str, meta: Dict[str, Any]) -> Optional[int]:
        """Store one sample; return its row id, or None when the quota cannot be met.

        ``meta``: camera, frame_id, ts, model_id, threshold, score, probs
        (dict class -> p), decision, reason, kind (band | audit | recheck | drift | shadow), and for
        kind shadow ``shadow``: the candidate's {model_id, score, decision, threshold}.
        """
        if not self.writer:
            raise RuntimeError("this SampleStore was opened read-only (writer=False)")
        if not isinstance(image_bytes, (bytes, bytearray, memoryview)) or len(image_bytes) == 0:
            raise ValueError("image_bytes must be non-empty bytes")
        data = bytes(image_bytes)
        e = normalize_ext(ext)
        kind = meta.get("kind", "band")
        if kind not in KINDS:
            raise ValueError(f"sample kind {kind!r} unknown; expected one of {KINDS}")
        camera = str(meta.get("camera") or "")
        if not camera:
            raise ValueError("sample meta needs a non-empty 'camera'")
        probs = meta.get("probs")
        if probs is not None and not isinstance(probs, dict):
            raise ValueError(f"sample meta 'probs' must be a dict class -> probability, got {type(probs).__name__}")
        ts = _opt_float(meta, "ts")
        shadow = meta.get("shadow")
        if shadow is not None and not isinstance(shadow, dict):
            raise ValueError(f"sample meta 'shadow' must be a dict (the candidate's verdict), got {type(shadow).__name__}")
        row = (
            camera,
            None if meta.get("frame_id") is None else str(meta.get("frame_id")),
            time.time() if ts is None else ts,
            None if meta.get("model_id") is None else str(meta.get("model_id")),
            _opt_float(meta, "threshold"),
            _opt_float(meta, "score"),
            None if probs is None else json.dumps({str(k): float(v) for k, v in probs.items()}),
            None if meta.get("decision") is None else str(meta.get("decision")),
            None if meta.get("reason") is None else str(meta.get("reason")),
            kind,
            time.time(),
            None if shadow is None else json.dumps(shadow),
        )
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            while True:  # again after making room: eviction may have removed this image's blob
                have = self._db.execute("SELECT ext FROM blobs WHERE sha256 = ?", (sha,)).fetchone()
                need = ROW_BYTES + (len(data) if have is None else 0)
                if self.quota_bytes is None or self._usage() + need <= self.quota_bytes:
                    break
                if not self._make_room(need, kind):
                    self.dropped += 1
                    log.warning(
                        "sample store %s full (%d of %d bytes with %d rows; pending samples are kept): "
                        "dropped a %s sample from %s", self.root, self._usage(), self.quota_bytes, self._rows,
                        kind, camera,
                    )
                    return None
            if have is None:
                path = os.path.join(self.root, blob_relpath(sha, e))
                if not os.path.exists(path):
                    write_atomic(path, data)
            else:
                e = have[0]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if have is None:
                    self._db.execute(
                        "INSERT INTO blobs (sha256, ext, size, refs) VALUES (?, ?, ?, 1)", (sha, e, len(data))
                    )
                else:
                    self._db.execute("UPDATE blobs SET refs = refs + 1 WHERE sha256 = ?", (sha,))
                cur = self._db.execute(
                    "INSERT INTO samples (sha256, camera, frame_id, ts, model_id, threshold, score, probs,"
                    " decision, reason, kind, created, shadow) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (sha,) + row,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if have is None:
                self._bytes += len(data)
            self._rows += 1
            return int(cur.lastrowid)

    def _make_room(self, need: int, kind: str = "band") -> bool:
        """Delete pulled samples, then pending RECHECK samples (frames never inspected: the cheapest
        to produce, the least worth keeping), then pending audit samples, oldest first, until ``need``
        bytes fit. A RECHECK sample never evicts an audit one. Band and drift samples are never evicted."""
        self._bytes = self._count_bytes()
        self._rows = self._count_rows()
        order = [
            "SELECT id FROM samples WHERE pulled IS NOT NULL ORDER BY id LIMIT 256",
            "SELECT id FROM samples WHERE pulled IS NULL AND kind = 'recheck' ORDER BY id LIMIT 256",
        ]
        if kind != "recheck":
            order.append("SELECT id FROM samples WHERE pulled IS NULL AND kind = 'audit' ORDER BY id LIMIT 256")
        for sql in order:
            while self._usage() + need > self.quota_bytes:
                ids = [r[0] for r in self._db.execute(sql)]
                if not ids:
                    break
                for sid in ids:  # one at a time: stop as soon as the new sample fits
                    self._delete([sid])
                    if self._usage() + need <= self.quota_bytes:
                        return True
        return self._usage() + need <= self.quota_bytes

    def _delete(self, ids: Sequence[int]) -> None:
        """Delete rows; files whose last reference went are unlinked after the commit."""
        gone: List[str] = []
        freed = rows = 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for sid in ids:
                r = self._db.execute("SELECT sha256 FROM samples WHERE id = ?", (int(sid),)).fetchone()
                if r is None:
                    continue
                sha = r[0]
                self._db.execute("DELETE FROM samples WHERE id = ?", (int(sid),))
                rows += 1
                self._db.execute("UPDATE blobs SET refs = refs - 1 WHERE sha256 = ?", (sha,))
                b = self._db.execute("SELECT refs, ext, size FROM blobs WHERE sha256 = ?", (sha,)).fetchone()
                if b is not None and b[0] <= 0:
                    self._db.execute("DELETE FROM blobs WHERE sha256 = ?", (sha,))
                    gone.append(blob_relpath(sha, b[1]))
                    freed += int(b[2])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self.evicted += rows
        self._bytes -= freed
        self._rows -= rows
        for rel in gone:  # a crash here leaves an orphan file; recover() removes it
            try:
                os.unlink(os.path.join(self.root, rel))
            except FileNotFoundError:
                pass

    def delete(self, ids: Iterable[int]) -> None:
        """Writer only: delete samples by id (and their files when no other row uses them)."""
        if not self.writer:
            raise RuntimeError("delete() needs the writer (open the store with writer=True)")
        with self._lock:
            self._delete([int(i) for i in ids])

    # -- reading -----------------------------------------------------------
    def query(
        self,
        camera: Optional[str] = None,
        since: Optional[float] = None,
        until: Optional[float] = None,
        decision: Optional[str] = None,
        reason: Optional[str] = None,
        pending_only: bool = True,
        limit: Optional[int] = None,
        after_id: Optional[int] = None,
        kind: Optional[str] = None,
    ) -> List[Dict[str, Any]]:
        """Rows in id order as dicts (``probs`` decoded, plus ``ext``, ``size``, ``path``).

        ``since``/``until`` are epoch seconds on the frame time ``ts`` (since <= ts < until).
        """
        where, args = [], []  # type: List[str], List[Any]
        for col, val in (("s.camera", camera), ("s.decision", decision), ("s.reason", reason), ("s.kind", kind)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if since is not None:
            where.append("s.ts >= ?")
            args.append(float(since))
        if until is not None:
            where.append("s.ts < ?")
            args.append(float(until))
        if pending_only:
            where.append("s.pulled IS NULL")
        if after_id is not None:
            where.append("s.id > ?")
            args.append(int(after_id))
        sql = "SELECT {}, b.ext, b.size FROM samples s JOIN blobs b ON b.sha256 = s.sha256".format(
            ", ".join("s." + c if c != "shadow" or self._has_shadow() else "NULL" for c in _COLUMNS)
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY s.id"
        if limit is not None:
            if int(limit) < 0:
                raise ValueError(f"limit must be >= 0, got {limit!r}")
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        out = []
        for r in rows:
            d = dict(zip(_COLUMNS + ("ext", "size"), r))
            d["probs"] = None if d["probs"] is None else json.loads(d["probs"])
            d["shadow"] = None if d["shadow"] is None else json.loads(d["shadow"])
            d["path"] = blob_relpath(d["sha256"], d["ext"])
            out.append(d)
        return out

    def get(self, sample_id: int) -> Optional[Dict[str, Any]]:
        rows = self.query(pending_only=False, after_id=int(sample_id) - 1, limit=1)
        return rows[0] if rows and rows[0]["id"] == int(sample_id) else None

    def image_path(self, row: Dict[str, Any]) -> str:
        """Absolute path of a row's image file."""
        return os.path.join(self.root, blob_relpath(row["sha256"], row["ext"]))

    def read_image(self, row: Dict[str, Any]) -> bytes:
        """The row's image bytes; FileNotFoundError if retention removed it meanwhile."""
        with open(self.image_path(row), "rb") as f:
            return f.read()

    def mark_pulled(self, ids: Iterable[int]) -> int:
        """Mark samples pulled (acknowledged by a client); returns how many changed state.

        ``ids`` must be integers (not booleans, not strings)."""
        ids = list(ids)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int)]
        if bad:
            raise ValueError(f"sample ids must be integers, got {bad[:5]!r}")
        if not ids:
            return 0
        now = time.time()
        n = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    cur = self._db.execute(
                        "UPDATE samples SET pulled = ? WHERE pulled IS NULL AND id IN ({})".format(
                            ",".join("?" * len(chunk))
                        ),
                        [now] + chunk,
                    )
                    n += cur.rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return n

    def stats(self) -> Dict[str, Any]:
        """Counts (total, pending, pulled, by kind), image bytes, quota, drops and evictions."""
        with self._lock:
            total, pending = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(pulled IS NULL), 0) FROM samples"
            ).fetchone()
            kinds = dict(self._db.execute("SELECT kind, COUNT(*) FROM samples GROUP BY kind").fetchall())
            blobs, nbytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs").fetchone()
        return {
            "samples": int(total),
            "rows": int(total),
            "row_bytes": int(total) * ROW_BYTES,
            "used_bytes": int(nbytes) + int(total) * ROW_BYTES,
            "pending": int(pending),
            "pulled": int(total) - int(pending),
            "by_kind": {k: int(kinds.get(k, 0)) for k in KINDS},
            "images": int(blobs),
            "bytes": int(nbytes),
            "quota_bytes": self.quota_bytes,
            "dropped": self.dropped,
            "evicted": self.evicted,
        }

    def integrity_check(self, verify_hashes: bool = True) -> Dict[str, Any]:
        """SQLite ``PRAGMA integrity_check`` plus the file invariants (see :func:`check_store`)."""
        from nexedge.store.check import check_store

        return check_store(self, verify_hashes)

    # -- lifecycle ---------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None  # type: ignore[assignment]
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> "SampleStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
