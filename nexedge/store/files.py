"""File side of the sample store: content-addressed paths and atomic writes.

Python 3.8, no torch.
"""

import os
import re
import uuid
from typing import Optional

IMAGES = "images"
TMP_PREFIX = ".tmp-"
_EXT_RE = re.compile(r"^[a-z0-9]{1,8}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def normalize_ext(ext: str) -> str:
    """``".PNG"`` -> ``"png"``; raise ValueError unless 1-8 letters/digits."""
    e = str(ext).strip().lower().lstrip(".")
    if e == "jpeg":
        e = "jpg"
    if not _EXT_RE.match(e):
        raise ValueError(f"bad image extension {ext!r}; expected 1-8 letters or digits such as 'png' or 'jpg'")
    return e


def blob_relpath(sha256: str, ext: str) -> str:
    """Content-addressed relative path ``images/ab/<sha256>.<ext>``."""
    if not _SHA_RE.match(sha256):
        raise ValueError(f"bad sha256 {sha256!r}; expected 64 lowercase hex digits")
    return os.path.join(IMAGES, sha256[:2], f"{sha256}.{normalize_ext(ext)}")


def write_atomic(path: str, data: bytes) -> None:
    """Temp file in the same folder, fsync, ``os.replace``, fsync the folder."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def try_flock(path: str) -> Optional[int]:
    """Open ``path`` and take an exclusive, non-blocking flock on it.

    Returns the open fd (closing it releases the lock), or None when another process
    holds the lock. Where flock does not exist (not POSIX) the fd comes back unlocked.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd
