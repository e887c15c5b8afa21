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

Disk use (``quota_bytes`` and ``reserve_bytes``) is what the files take on the
file system, not what was written into them: each image file's allocated blocks
(a 100-byte image takes a whole 4 KiB block on most file systems), the image
folders, the database file, its WAL (kept to about ``WAL_BYTES`` by checkpoints,
and counted at least at that size) and its shared-memory index. A new sample
must fit under the quota with ``ROW_HEADROOM`` to spare for its row, and leave at
least ``reserve_bytes`` (and a few inodes) free on the file system, so the store
never fills the disk it shares with the rest of the line machine.

Retention: when a new sample does not fit, samples are deleted, oldest first, in
``EVICT_ORDER``: samples already pulled (any kind), then pending ``recheck``
(frames never inspected), ``audit``, ``shadow``, ``drift`` and last ``band``
samples. A new sample only evicts pending samples of its own kind or of kinds
before it in that order (a RECHECK sample never pushes out an audit one); if it
still does not fit it is dropped and counted (:attr:`SampleStore.drops`,
``quota`` or ``disk_full``). A write the file system refuses (ENOSPC, SQLite
"disk is full") loses nothing committed: the new sample's file is removed, the
transaction rolled back, room is made by the same rules and the write retried once.

Python 3.8, no torch.
"""

import errno
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from nexedge.store.files import IMAGES, TMP_PREFIX, blob_relpath, normalize_ext, write_atomic

try:  # POSIX only; without it the single-writer rule is not enforced
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: 2 added ``samples.shadow`` (the candidate model's verdict on a shadow disagreement); 3 added
#: ``blobs.disk`` (bytes the image file takes on disk). Older stores are migrated in place by their
#: writer, and read as they are by readers.
SCHEMA_VERSION = 3
#: Room a new row may need in the database (the row, four index entries, page splits) on top of its
#: image file: a sample is only added when usage + image blocks + this stays under the quota.
ROW_HEADROOM = 32 << 10
#: The WAL is checkpointed every WAL_PAGES pages and truncated to WAL_BYTES after a checkpoint; it is
#: counted as at least WAL_BYTES (it grows that far between checkpoints).
WAL_PAGES = 200
WAL_BYTES = 1 << 20
#: Smallest quota that holds the database, its WAL and a few samples.
MIN_QUOTA = 4 << 20
KINDS = ("band", "audit", "recheck", "drift", "shadow")
#: Pending samples are evicted in this order (pulled samples of any kind go first).
EVICT_ORDER = ("recheck", "audit", "shadow", "drift", "band")
DB_NAME = "samples.db"
DB_FILES = (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY,
    ext TEXT NOT NULL,
    size INTEGER NOT NULL,
    refs INTEGER NOT NULL,
    disk INTEGER
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


def _block_size(path: str) -> int:
    """Allocation unit of the file system holding ``path`` (4096 on most)."""
    try:
        v = os.statvfs(path if os.path.exists(path) else os.path.dirname(path) or ".")
        return max(int(v.f_frsize or v.f_bsize), 512)
    except OSError:  # pragma: no cover
        return 4096


def _allocated(path: str, size: int, block: int) -> int:
    """Bytes ``path`` takes on disk (st_blocks); ``size`` rounded up to ``block`` when it cannot be
    stat'ed (0 for a missing file when ``block`` is 0)."""
    try:
        return int(os.stat(path).st_blocks) * 512
    except (OSError, AttributeError):
        return -(-size // block) * block if block else 0


def _is_full(err: BaseException) -> bool:
    """True for the errors of a full file system or quota (ENOSPC, EDQUOT, SQLite ``SQLITE_FULL``)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))
    return "full" in str(err).lower()


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
        reserve_bytes: int = 0,
    ) -> None:
        if quota_bytes is not None and int(quota_bytes) < MIN_QUOTA:
            raise ValueError(f"quota_bytes must be at least {MIN_QUOTA} ({MIN_QUOTA >> 20} MiB: the database, its WAL "
                             f"and a few samples) or None, got {quota_bytes!r}")
        if int(reserve_bytes) < 0:
            raise ValueError(f"reserve_bytes must be >= 0, got {reserve_bytes!r}")
        self.root = os.path.abspath(root)
        self.quota_bytes = None if quota_bytes is None else int(quota_bytes)
        self.reserve_bytes = int(reserve_bytes)
        self.writer = bool(writer)
        self.drops: Dict[str, int] = {"quota": 0, "disk_full": 0}  # adds refused, by why
        self.evicted_by_kind: Dict[str, int] = {k: 0 for k in KINDS}  # samples deleted by retention
        self.write_errors = 0  # writes the file system refused (ENOSPC, SQLite full)
        self.full = False  # the last add could not make room (quota or free space)
        self.full_reason = ""  # why: quota or disk_full
        self._lock = threading.RLock()
        self._lock_fd: Optional[int] = None
        self._dirs: Dict[str, int] = {}  # image folder -> bytes it takes on disk
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
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_BYTES}")
            self._init_schema()
        self.store_id = self._meta_get("store_id") or ""
        self._has_disk = "disk" in [r[1] for r in self._db.execute("PRAGMA table_info(blobs)")]
        self._block = _block_size(self.root)
        if self.writer:
            self.recover()
            self._fill_disk_column()
        self._disk = self._count_disk()
        self._scan_dirs()

    @property
    def dropped(self) -> int:
        """Adds refused because neither the quota nor the free-space reserve could be met."""
        return sum(self.drops.values())

    @property
    def evicted(self) -> int:
        """Samples deleted by retention."""
        return sum(self.evicted_by_kind.values())

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
                if version not in (0, 1, 2, SCHEMA_VERSION):
                    raise RuntimeError(
                        f"sample store {self.root} has schema version {version}; this nexedge reads {SCHEMA_VERSION}"
                    )
                for stmt in _SCHEMA.split(";"):  # executescript() would commit mid-transaction
                    if stmt.strip():
                        self._db.execute(stmt)
                for table, col, decl in (("samples", "shadow", "TEXT"), ("blobs", "disk", "INTEGER")):
                    if col not in [r[1] for r in self._db.execute(f"PRAGMA table_info({table})")]:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
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

    def _fill_disk_column(self) -> None:
        """Writer: measure ``blobs.disk`` where an older store did not record it."""
        with self._lock:
            todo = self._db.execute("SELECT sha256, ext, size FROM blobs WHERE disk IS NULL").fetchall()
            if not todo:
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sha, ext, size in todo:
                    disk = _allocated(os.path.join(self.root, blob_relpath(sha, ext)), int(size), self._block)
                    self._db.execute("UPDATE blobs SET disk = ? WHERE sha256 = ?", (disk, sha))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _count_disk(self) -> int:
        """Bytes the image files take on disk (from the rows; sizes rounded up to blocks where unrecorded)."""
        col = f"COALESCE(disk, (size + {self._block - 1}) / {self._block} * {self._block})" if self._has_disk else \
            f"(size + {self._block - 1}) / {self._block} * {self._block}"
        return int(self._db.execute(f"SELECT COALESCE(SUM({col}), 0) FROM blobs").fetchone()[0])

    def _scan_dirs(self) -> None:
        top = os.path.join(self.root, IMAGES)
        self._dirs = {top: _allocated(top, 0, 0)}
        for sub in os.listdir(top) if os.path.isdir(top) else []:
            path = os.path.join(top, sub)
            if os.path.isdir(path):
                self._dirs[path] = _allocated(path, 0, 0)

    def _db_disk(self) -> int:
        """Database, WAL (at least WAL_BYTES) and shared-memory index, as allocated on disk."""
        total = 0
        for name in DB_FILES:
            n = _allocated(os.path.join(self.root, name), 0, 0)
            total += max(n, WAL_BYTES) if name.endswith("-wal") else n
        return total

    def _usage(self) -> int:
        """What counts against the quota: everything the store takes on disk."""
        return self._disk + sum(self._dirs.values()) + self._db_disk()

    def _free(self) -> Tuple[int, int, int]:
        """(free bytes, free inodes, inodes to keep free) of the store's file system for this user."""
        try:
            v = os.statvfs(self.root)
        except OSError:  # pragma: no cover - statvfs exists wherever the store runs
            return 1 << 62, 1 << 30, 0
        if v.f_files == 0:  # no fixed inode count (btrfs, some network file systems)
            return v.f_bavail * v.f_frsize, 1 << 30, 0
        return v.f_bavail * v.f_frsize, v.f_favail, min(1024, v.f_files // 20)

    def _fits(self, need: int) -> Optional[str]:
        """None when ``need`` more bytes fit; else why not (``quota`` or ``disk_full``)."""
        if self.quota_bytes is not None and self._usage() + need > self.quota_bytes:
            return "quota"
        free, inodes, keep = self._free()
        if free - need < self.reserve_bytes or inodes <= keep:
            return "disk_full"
        return None

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
            for attempt in (0, 1):
                try:
                    return self._add_locked(data, e, sha, kind, camera, row)
                except (OSError, sqlite3.OperationalError, sqlite3.DatabaseError) as err:
                    if not _is_full(err):
                        raise
                    self.write_errors += 1
                    if not self.full:
                        log.error("sample store %s: the file system refused a write (%s); making room", self.root,
                                  err)
                    try:
                        room = attempt == 0 and self._make_room(self._need(len(data)) + self._block, kind)
                    except (OSError, sqlite3.Error) as err2:  # deleting needs a little room too
                        if not self.full:
                            log.error("sample store %s: could not make room: %s", self.root, err2)
                        room = False
                    if not room:
                        return self._drop("disk_full", kind, camera)
        return None  # pragma: no cover - the loop returns

    def _need(self, nbytes: int) -> int:
        """Disk a new image of ``nbytes`` takes (whole blocks) plus the row's headroom."""
        return -(-nbytes // self._block) * self._block + ROW_HEADROOM

    def _drop(self, why: str, kind: str, camera: str) -> None:
        self.drops[why] += 1
        self.full_reason = why
        if not self.full:
            free = self._free()[0]
            log.warning("sample store %s full (%s: %d bytes used, quota %s, %d bytes free, reserve %d): dropping "
                        "%s samples (from %s first) until room is made; inspection continues", self.root, why,
                        self._usage(), self.quota_bytes, free, self.reserve_bytes, kind, camera)
        self.full = True
        return None

    def _add_locked(self, data: bytes, e: str, sha: str, kind: str, camera: str, row: Tuple[Any, ...]) -> Optional[int]:
        while True:  # again after making room: eviction may have removed this image's blob
            have = self._db.execute("SELECT ext FROM blobs WHERE sha256 = ?", (sha,)).fetchone()
            need = self._need(len(data)) if have is None else ROW_HEADROOM
            why = self._fits(need)
            if why is None:
                break
            if not self._make_room(need, kind):
                return self._drop(self._fits(need) or why, kind, camera)
        wrote: Optional[str] = None
        disk = 0
        if have is None:
            path = os.path.join(self.root, blob_relpath(sha, e))
            folder = os.path.dirname(path)
            if not os.path.exists(path):
                write_atomic(path, data)
                wrote = path
            disk = _allocated(path, len(data), self._block)
            self._dirs[folder] = _allocated(folder, 0, 0)
        else:
            e = have[0]
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if have is None:
                    self._db.execute("INSERT INTO blobs (sha256, ext, size, refs, disk) VALUES (?, ?, ?, 1, ?)",
                                     (sha, e, len(data), disk))
                else:
                    self._db.execute("UPDATE blobs SET refs = refs + 1 WHERE sha256 = ?", (sha,))
                cur = self._db.execute(
                    "INSERT INTO samples (sha256, camera, frame_id, ts, model_id, threshold, score, probs,"
                    " decision, reason, kind, created, shadow) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (sha,) + row,
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except BaseException:
            if wrote is not None:  # the row never committed: its new file must not stay behind as an orphan
                try:
                    os.unlink(wrote)
                except OSError:
                    pass
            raise
        if have is None:
            self._disk += disk
        self.full = False
        return int(cur.lastrowid)

    def _make_room(self, need: int, kind: str = "band") -> bool:
        """Delete samples, oldest first, in the retention order (pulled samples, then pending samples
        of each kind in EVICT_ORDER up to ``kind`` itself) until ``need`` bytes fit under the quota and
        above the free-space reserve. False when they still do not fit."""
        self._disk = self._count_disk()
        rank = EVICT_ORDER.index(kind) if kind in EVICT_ORDER else len(EVICT_ORDER) - 1
        order = ["SELECT id FROM samples WHERE pulled IS NOT NULL ORDER BY id LIMIT 64"]
        order += [f"SELECT id FROM samples WHERE pulled IS NULL AND kind = '{k}' ORDER BY id LIMIT 64"
                  for k in EVICT_ORDER[: rank + 1]]
        for sql in order:
            while self._fits(need) is not None:
                ids = [r[0] for r in self._db.execute(sql)]
                if not ids:
                    break
                for sid in ids:  # one at a time: stop as soon as the new sample fits
                    self._delete([sid])
                    if self._fits(need) is None:
                        return True
        return self._fits(need) is None

    def _delete(self, ids: Sequence[int]) -> None:
        """Delete rows; files whose last reference went are unlinked after the commit."""
        gone: List[str] = []
        freed = 0
        kinds: List[str] = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for sid in ids:
                r = self._db.execute("SELECT sha256, kind FROM samples WHERE id = ?", (int(sid),)).fetchone()
                if r is None:
                    continue
                sha = r[0]
                self._db.execute("DELETE FROM samples WHERE id = ?", (int(sid),))
                kinds.append(r[1])
                self._db.execute("UPDATE blobs SET refs = refs - 1 WHERE sha256 = ?", (sha,))
                b = self._db.execute("SELECT refs, ext, size, disk FROM blobs WHERE sha256 = ?", (sha,)).fetchone()
                if b is not None and b[0] <= 0:
                    self._db.execute("DELETE FROM blobs WHERE sha256 = ?", (sha,))
                    gone.append(blob_relpath(sha, b[1]))
                    freed += int(b[3]) if b[3] is not None else -(-int(b[2]) // self._block) * self._block
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        for k in kinds:
            self.evicted_by_kind[k] = self.evicted_by_kind.get(k, 0) + 1
        self._disk -= freed
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
        """Counts (total, pending, pulled, by kind), bytes written and taken on disk, quota, free
        space and reserve, drops by reason and evictions by kind."""
        with self._lock:
            total, pending = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(pulled IS NULL), 0) FROM samples"
            ).fetchone()
            kinds = dict(self._db.execute("SELECT kind, COUNT(*) FROM samples GROUP BY kind").fetchall())
            blobs, nbytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs").fetchone()
            self._disk = self._count_disk()
            self._scan_dirs()
            db = self._db_disk()
            used = self._usage()
            folders = sum(self._dirs.values())
        free, inodes, _ = self._free()
        return {
            "samples": int(total),
            "rows": int(total),
            "pending": int(pending),
            "pulled": int(total) - int(pending),
            "by_kind": {k: int(kinds.get(k, 0)) for k in KINDS},
            "images": int(blobs),
            "bytes": int(nbytes),
            "image_disk_bytes": self._disk,
            "folder_disk_bytes": folders,
            "db_disk_bytes": db,
            "used_bytes": used,
            "quota_bytes": self.quota_bytes,
            "free_bytes": free,
            "free_inodes": inodes,
            "reserve_bytes": self.reserve_bytes,
            "full": self.full,
            "dropped": self.dropped,
            "drops": dict(self.drops),
            "evicted": self.evicted,
            "evicted_by_kind": dict(self.evicted_by_kind),
            "write_errors": self.write_errors,
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
