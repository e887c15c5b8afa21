"""Integrity check of a sample store: SQLite plus the file invariants.

Python 3.8, no torch.
"""

import hashlib
import os
from typing import Any, Dict

from nexedge.store.files import IMAGES, TMP_PREFIX, blob_relpath


def check_store(store: Any, verify_hashes: bool = True) -> Dict[str, Any]:
    """SQLite ``PRAGMA integrity_check`` plus the file invariants.

    Returns {ok, sqlite, missing, corrupt, temp_files, orphans, refs, bad_rows}:
    every blob row has its file (with the right sha256 when ``verify_hashes``),
    no temp files, no unreferenced files, blob reference counts match the rows,
    no row with a malformed hash or extension. Problems are reported, never raised.
    """
    with store._lock:
        sqlite_msg = "; ".join(r[0] for r in store._db.execute("PRAGMA integrity_check").fetchall())
        blobs = store._db.execute("SELECT sha256, ext, refs FROM blobs").fetchall()
        counts = dict(store._db.execute("SELECT sha256, COUNT(*) FROM samples GROUP BY sha256").fetchall())
    missing, corrupt, bad_refs, bad_rows = [], [], [], []  # type: List[str], List[str], List[str], List[str]
    names = set()
    for sha, ext, refs in blobs:
        try:
            rel = blob_relpath(sha, ext)
        except (ValueError, TypeError) as e:  # a row no nexedge wrote: report it, check the rest
            bad_rows.append(f"blob {str(sha)[:80]!r}: {e}")
            continue
        names.add(os.path.basename(rel))
        path = os.path.join(store.root, rel)
        if not os.path.exists(path):
            missing.append(rel)
        elif verify_hashes:
            with open(path, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != sha:
                    corrupt.append(rel)
        if counts.get(sha, 0) != refs:
            bad_refs.append(sha)
    known = {b[0] for b in blobs}
    bad_refs += [str(sha) for sha in counts if sha not in known]
    temps, orphans = [], []
    top = os.path.join(store.root, IMAGES)
    for sub in sorted(os.listdir(top)) if os.path.isdir(top) else []:
        folder = os.path.join(top, sub)
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.startswith(TMP_PREFIX):
                temps.append(os.path.join(IMAGES, sub, name))
            elif name not in names:
                orphans.append(os.path.join(IMAGES, sub, name))
    ok = sqlite_msg == "ok" and not (missing or corrupt or temps or orphans or bad_refs or bad_rows)
    return {
        "ok": ok,
        "sqlite": sqlite_msg,
        "missing": missing,
        "corrupt": corrupt,
        "temp_files": temps,
        "orphans": orphans,
        "refs": bad_refs,
        "bad_rows": bad_rows,
    }
