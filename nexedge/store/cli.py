"""``nexedge store check|stats PATH``: inspect a sample store from the command line.

Opens the store read-only (``writer=False``), so it runs next to a live daemon.
Python 3.8, no torch.
"""

import argparse
import json
import sys
from typing import Any, Dict

from nexedge.cliopts import uses_globals


def configure_store(p: argparse.ArgumentParser) -> None:
    p.epilog = ("check exits 0 when the store is consistent, 1 when it found problems (each is listed); "
                "stats prints counts and sizes. Both open the store read-only.")
    p.add_argument("action", choices=("check", "stats"), help="check: SQLite integrity + file invariants; "
                   "stats: rows, pending, bytes, quota use")
    p.add_argument("path", help="store folder (the daemon's store.path)")
    p.add_argument("--no-hashes", action="store_true", help="check: skip re-hashing every image file (faster)")
    uses_globals(p, "--json")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)  # pragma: no cover


def _print_check(res: Dict[str, Any]) -> None:
    print(f"sqlite integrity: {res['sqlite']}")
    for key, what in (("missing", "image files missing"), ("corrupt", "image files with a wrong sha256"),
                      ("temp_files", "temp files left by a crash"), ("orphans", "image files no row refers to"),
                      ("refs", "blobs whose reference count is wrong"), ("bad_rows", "malformed rows")):
        items = res.get(key) or []
        print(f"{what}: {len(items)}")
        for it in items[:20]:
            print(f"  {it}")
        if len(items) > 20:
            print(f"  ... and {len(items) - 20} more")
    print("OK" if res["ok"] else "PROBLEMS FOUND")


def run_store(args: argparse.Namespace) -> int:
    from nexedge.store import SampleStore

    st = SampleStore(args.path, writer=False)
    try:
        if args.action == "check":
            res = st.integrity_check(verify_hashes=not args.no_hashes)
            if args.json:
                print(json.dumps(res, indent=2))
            else:
                _print_check(res)
            return 0 if res["ok"] else 1
        stats = st.stats()
    finally:
        st.close()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    quota = stats["quota_bytes"]
    print(f"store        {args.path}")
    print(f"samples      {stats['samples']} ({stats['pending']} pending, {stats['pulled']} pulled)")
    print("by kind      " + ", ".join(f"{k} {v}" for k, v in stats["by_kind"].items()))
    print(f"images       {stats['images']} files, {_human(stats['bytes'])} written, "
          f"{_human(stats['image_disk_bytes'])} on disk")
    print(f"disk use     {_human(stats['used_bytes'])} (images, {_human(stats['folder_disk_bytes'])} folders, "
          f"{_human(stats['db_disk_bytes'])} database + WAL)" + ("" if quota is None else f" of {_human(quota)} quota"))
    print(f"free space   {_human(stats['free_bytes'])} on the file system ({stats['free_inodes']} inodes), reserve "
          f"{_human(stats['reserve_bytes'])} (as opened here; the daemon uses store.reserve)")
    sys.stdout.flush()
    return 0
