"""Uncertain-sample store: real SQLite files, real image files, a real SIGKILL."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nexedge.store import SampleStore, blob_relpath, normalize_ext
from nexedge.store.samples import EVICT_ORDER, MIN_QUOTA


def _meta(i, kind="band", camera="cam0", **kw):
    m = {
        "camera": camera,
        "frame_id": f"f{i}",
        "ts": 1000.0 + i,
        "model_id": "m@12345678",
        "threshold": 0.4,
        "score": 0.39,
        "probs": {"good": 0.61, "scratch": 0.39},
        "decision": "PASS",
        "reason": "band",
        "kind": kind,
    }
    m.update(kw)
    return m


def _img(i, size=100):
    return (f"image-{i}-".encode() * size)[:size]


def test_add_query_read_roundtrip(tmp_path):
    with SampleStore(str(tmp_path / "s")) as st:
        sid = st.add(_img(1), ".PNG", _meta(1))
        assert isinstance(sid, int)
        (row,) = st.query()
        assert row["id"] == sid and row["camera"] == "cam0" and row["frame_id"] == "f1"
        assert row["probs"] == {"good": 0.61, "scratch": 0.39}
        assert row["ext"] == "png" and row["kind"] == "band" and row["pulled"] is None
        sha = hashlib.sha256(_img(1)).hexdigest()
        assert row["sha256"] == sha
        assert st.image_path(row) == os.path.join(st.root, "images", sha[:2], sha + ".png")
        assert st.read_image(row) == _img(1)
        assert st.integrity_check()["ok"]


def test_same_bytes_share_one_file_and_refcount(tmp_path):
    with SampleStore(str(tmp_path / "s")) as st:
        a = st.add(_img(1), "png", _meta(1))
        b = st.add(_img(1), "png", _meta(2))
        assert a != b
        assert st.stats()["images"] == 1 and st.stats()["samples"] == 2
        st.delete([a])
        assert os.path.exists(st.image_path(st.get(b)))
        st.delete([b])
        assert st.stats()["images"] == 0
        assert st.integrity_check()["ok"]


def test_filters_and_paging(tmp_path):
    with SampleStore(str(tmp_path / "s")) as st:
        for i in range(10):
            st.add(_img(i), "png", _meta(i, camera="a" if i % 2 else "b", decision="REJECT" if i < 3 else "PASS"))
        assert len(st.query(camera="a")) == 5
        assert [r["frame_id"] for r in st.query(since=1002, until=1005)] == ["f2", "f3", "f4"]
        assert len(st.query(decision="REJECT")) == 3
        page1 = st.query(limit=4)
        page2 = st.query(limit=4, after_id=page1[-1]["id"])
        assert [r["frame_id"] for r in page1 + page2] == [f"f{i}" for i in range(8)]
        assert st.mark_pulled([r["id"] for r in page1]) == 4
        assert st.mark_pulled([r["id"] for r in page1]) == 0  # already pulled
        assert len(st.query()) == 6 and len(st.query(pending_only=False)) == 10
        assert st.stats()["pulled"] == 4


def _disk_use(root):
    """Bytes a folder tree takes on disk (st_blocks), as ``du`` counts them."""
    total = 0
    for folder, _dirs, files in os.walk(root):
        total += os.stat(folder).st_blocks * 512
        for name in files:
            total += os.stat(os.path.join(folder, name)).st_blocks * 512
    return total


def test_retention_evicts_pulled_then_each_kind_in_the_stated_order_oldest_first(tmp_path):
    """Issue 30 item 4: every kind can be evicted, in the documented order; band samples used to be kept
    forever, so a store full of them dropped every new sample."""
    big = 64 << 10
    with SampleStore(str(tmp_path / "s"), quota_bytes=MIN_QUOTA) as st:
        ids = {}
        for i in range(40):
            kind = ("band", "drift", "shadow", "audit", "recheck")[i % 5]
            ids[st.add(_img(i, big), "png", _meta(i, kind=kind))] = kind
        assert None not in ids
        st.mark_pulled([i for i, k in ids.items() if k == "band"][:3])
        for i in range(100, 130):  # new band samples: room is made, nothing is dropped
            assert st.add(_img(i, big), "png", _meta(i, kind="band")) is not None
        left = {r["id"] for r in st.query(pending_only=False)}
        gone = set(ids) - left
        assert gone and st.dropped == 0 and st.evicted == len(gone)
        pulled = {r["id"] for r in st.query(pending_only=False) if r["pulled"]} | (gone & set(
            [i for i, k in ids.items() if k == "band"][:3]))
        rank = {"pulled": -1, **{k: n for n, k in enumerate(EVICT_ORDER)}}
        order = sorted(ids, key=lambda i: (rank["pulled" if i in pulled else ids[i]], i))
        # What went is exactly a prefix of (pulled, recheck, audit, shadow, drift, band), oldest first.
        assert set(order[: len(gone)]) == gone, (sorted(gone), order[: len(gone)])
        assert st.stats()["evicted_by_kind"]["recheck"] == 8
        assert st.stats()["used_bytes"] <= MIN_QUOTA and _disk_use(st.root) <= MIN_QUOTA
        assert st.integrity_check()["ok"]


def test_a_sample_never_evicts_a_kind_kept_longer_than_its_own(tmp_path):
    big = 64 << 10
    with SampleStore(str(tmp_path / "s"), quota_bytes=MIN_QUOTA) as st:
        audit = [st.add(_img(i, big), "png", _meta(i, kind="audit")) for i in range(60)]
        kept = [a for a in audit if a is not None]
        assert len(kept) == 60 and st.evicted > 0 and st.drops["quota"] == 0  # audit evicts older audit
        before = {r["id"] for r in st.query(pending_only=False)}
        # A RECHECK sample (never inspected) does not push out an audit sample: it is dropped, counted.
        assert st.add(_img(99, big), "png", _meta(99, kind="recheck")) is None
        assert st.drops["quota"] == 1 and st.full
        assert {r["id"] for r in st.query(pending_only=False)} == before
        # A shadow sample does push out the oldest audit sample.
        assert st.add(_img(100, big), "png", _meta(100, kind="shadow")) is not None and not st.full
        assert min(before) not in {r["id"] for r in st.query(pending_only=False)}


def test_quota_counts_blocks_folders_and_the_database_not_bytes_written(tmp_path):
    """Issue 30 item 4: 100-byte images take a 4 KiB block each; the quota counted 612 bytes per sample, so
    the store reported itself under quota while the disk filled."""
    with SampleStore(str(tmp_path / "s"), quota_bytes=MIN_QUOTA) as st:
        for i in range(1000):
            st.add(_img(i), "png", _meta(i))
        used = st.stats()["used_bytes"]
        assert st.evicted > 0 and st.dropped == 0
        assert _disk_use(st.root) <= used <= MIN_QUOTA
        assert st.integrity_check()["ok"]


def test_duplicate_images_are_counted_against_the_quota(tmp_path):
    """Same bytes again and again used to add rows for free: 72 -> 3,072 rows with the quota full. Rows now
    count as the database pages they take."""
    with SampleStore(str(tmp_path / "s"), quota_bytes=MIN_QUOTA) as st:
        st.add(_img(0), "png", _meta(0, kind="audit"))
        db0 = st.stats()["db_disk_bytes"]
        ids = [st.add(_img(0), "png", _meta(i, kind="audit")) for i in range(400)]
        s = st.stats()
        assert None not in ids and s["images"] == 1 and s["db_disk_bytes"] > db0
        assert _disk_use(st.root) <= s["used_bytes"] <= MIN_QUOTA


TMPFS_FILL = textwrap.dedent(
    """
    import json, os, sys
    from nexedge.store import SampleStore
    root, reserve, n = sys.argv[1] + "/s", int(sys.argv[2]), int(sys.argv[3])
    st = SampleStore(root, **({"reserve_bytes": reserve} if reserve else {}))
    errors, ids = [], []
    for i in range(n):
        try:
            ids.append(st.add(os.urandom(200 + i % 700), "png", {"camera": "c", "frame_id": str(i), "kind":
                       ("band", "audit", "recheck")[i % 3]}))
        except Exception as e:
            errors.append(repr(e)[:120])
    if reserve == 0:  # the disk is full now: fill the last bytes too, then try once more
        free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
        with open(sys.argv[1] + "/filler", "wb") as f:
            f.write(bytes(max(free - 4096, 0)))
        for i in range(5):
            try:
                ids.append(st.add(os.urandom(300), "png", {"camera": "c", "frame_id": "x%d" % i}))
            except Exception as e:
                errors.append(repr(e)[:120])
    check = st.integrity_check()
    s = st.stats()
    print(json.dumps({"errors": errors, "stored_last": sum(i is not None for i in ids[-50:]), "check": check,
                      "free": s["free_bytes"], "drops": s["drops"], "full": s["full"]}))
    """
)


def _on_tmpfs(tmp_path, script, size, *args):
    """Run ``script`` with a small tmpfs (a private mount namespace: no root needed) as argv[1]."""
    import shutil

    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) to mount a small tmpfs")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    (tmp_path / "run.py").write_text(script)
    cmd = (f"mount -t tmpfs -o size={size} tmpfs {mnt} && exec {sys.executable} {tmp_path / 'run.py'} {mnt} "
           + " ".join(str(a) for a in args))
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", cmd], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    if out.returncode != 0 and "mount" in out.stderr and "{" not in out.stdout:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {out.stderr.strip()[:200]}")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_full_file_system_costs_samples_not_the_store(tmp_path):
    """Issue 30 item 4: on a full file system adds raised ENOSPC (16,114 samples lost) and band samples were
    never evicted. Now the store keeps store.reserve free, evicts by the retention order and goes on."""
    res = _on_tmpfs(tmp_path, TMPFS_FILL, "3m", 256 << 10, 1200)
    assert res["errors"] == [] and res["check"]["ok"], res
    assert res["free"] >= (256 << 10) - 8192  # the reserve holds (a row's page may dip into it)
    assert res["stored_last"] > 0  # new samples still get in (older ones evicted)


def test_a_commit_refused_by_a_full_disk_leaves_no_orphan_image(tmp_path):
    """Issue 30 item 8: with no reserve the disk really fills; the image file of a row whose commit failed
    used to stay behind (``store check``: orphan), and the failed add raised."""
    res = _on_tmpfs(tmp_path, TMPFS_FILL, "2m", 0, 600)
    assert res["errors"] == [], res
    assert res["check"]["orphans"] == [] and res["check"]["ok"], res["check"]
    assert res["drops"]["disk_full"] > 0


def test_bad_input_is_refused_with_clear_errors(tmp_path):
    with SampleStore(str(tmp_path / "s")) as st:
        with pytest.raises(ValueError, match="extension"):
            st.add(_img(1), "../../etc", _meta(1))
        with pytest.raises(ValueError, match="kind"):
            st.add(_img(1), "png", _meta(1, kind="other"))
        with pytest.raises(ValueError, match="camera"):
            st.add(_img(1), "png", _meta(1, camera=""))
        with pytest.raises(ValueError, match="non-empty"):
            st.add(b"", "png", _meta(1))
        with pytest.raises(ValueError, match="score"):
            st.add(_img(1), "png", _meta(1, score="high"))
        assert st.stats()["samples"] == 0
    assert normalize_ext(".JPEG") == "jpg"
    with pytest.raises(ValueError):
        blob_relpath("../" + "a" * 61, "png")


def test_camera_id_never_reaches_a_path(tmp_path):
    with SampleStore(str(tmp_path / "s")) as st:
        sid = st.add(_img(1), "png", _meta(1, camera="../../evil"))
        row = st.get(sid)
        assert row["camera"] == "../../evil"
        assert os.path.realpath(st.image_path(row)).startswith(os.path.realpath(st.root) + os.sep)


def test_one_writer_many_readers(tmp_path):
    root = str(tmp_path / "s")
    st = SampleStore(root)
    with pytest.raises(RuntimeError, match="already has a writer"):
        SampleStore(root)
    reader = SampleStore(root, writer=False)
    with pytest.raises(RuntimeError, match="read-only"):
        reader.add(_img(1), "png", _meta(1))
    errors = []

    def write():
        try:
            for i in range(200):
                st.add(_img(i), "png", _meta(i))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=write)
    t.start()
    seen = 0
    while t.is_alive() or seen < 200:
        rows = reader.query(after_id=None)
        for r in rows:
            assert reader.read_image(r) == _img(int(r["frame_id"][1:]))
        reader.mark_pulled([r["id"] for r in rows])
        seen += len(rows)
        if not t.is_alive() and not reader.query():
            break
    t.join()
    assert not errors and seen == 200
    assert st.stats()["pulled"] == 200
    reader.close()
    st.close()
    with pytest.raises(FileNotFoundError):
        SampleStore(str(tmp_path / "nothing"), writer=False)


def test_recover_removes_temp_and_orphan_files(tmp_path):
    root = str(tmp_path / "s")
    with SampleStore(root) as st:
        sid = st.add(_img(1), "png", _meta(1))
        keep = st.image_path(st.get(sid))
    folder = os.path.join(root, "images", "ab")
    os.makedirs(folder)
    open(os.path.join(folder, ".tmp-123-abc"), "wb").write(b"half")
    open(os.path.join(folder, "ab" + "0" * 62 + ".png"), "wb").write(b"orphan")
    with SampleStore(root, writer=False) as rd:
        bad = rd.integrity_check()
        assert not bad["ok"] and bad["temp_files"] and bad["orphans"]
    with SampleStore(root) as st:
        assert st.integrity_check()["ok"]
        assert os.path.exists(keep)


WRITER = textwrap.dedent(
    """
    import sys, time
    from nexedge.store import SampleStore
    st = SampleStore(sys.argv[1], quota_bytes=int(sys.argv[2]))
    i = 0
    while True:
        data = (b"%d-" % i) * (1000 + (i * 7919) % 50000)
        kind = "audit" if i % 3 == 0 else "band"
        st.add(data, "png", {"camera": "cam%d" % (i % 4), "frame_id": str(i), "ts": time.time(),
                             "score": 0.5, "probs": {"good": 0.5, "bad": 0.5}, "kind": kind})
        if i % 5 == 0:
            st.mark_pulled([r["id"] for r in st.query(limit=3)])
        i += 1
        if i == 20:
            print("ready", flush=True)
    """
)


@pytest.mark.parametrize("quota", [None, 6 << 20])
def test_kill9_during_writes_leaves_a_consistent_store(tmp_path, quota):
    root = str(tmp_path / "s")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(script), root, str(quota or 10**12)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + 0.2 * round_)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with SampleStore(root, writer=False) as rd:  # as the crash left it, before any recovery
            raw = rd.integrity_check(verify_hashes=True)
            assert raw["sqlite"] == "ok" and not raw["missing"] and not raw["corrupt"] and not raw["refs"], raw
            # besides temp names, at most an image whose row never committed and one whose row
            # retention had just deleted may be left over
            assert len(raw["orphans"]) <= 2
        with SampleStore(root) as st:  # the writer's recovery runs here
            check = st.integrity_check(verify_hashes=True)
            assert check["ok"], check
            rows = st.query(pending_only=False)
            assert rows
            for r in rows:
                with open(st.image_path(r), "rb") as f:
                    assert hashlib.sha256(f.read()).hexdigest() == r["sha256"]
            if quota:
                assert st.stats()["used_bytes"] <= quota


def test_store_command_check_and_stats(tmp_path, capsys):
    """Issue 13 item 16: ``nexedge store check|stats PATH``; a malformed row is reported, not raised."""
    import sqlite3

    from nexedge.cli import main

    root = str(tmp_path / "s")
    with SampleStore(root) as st:
        for i in range(3):
            st.add(_img(i), "png", _meta(i))
    assert main(["store", "check", root]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["store", "stats", root, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == 3 and stats["rows"] == 3 and stats["bytes"] == 300
    assert stats["image_disk_bytes"] >= 300 and stats["used_bytes"] >= stats["db_disk_bytes"] > 0
    db = sqlite3.connect(os.path.join(root, "samples.db"))
    db.execute("UPDATE blobs SET ext = '../../x' WHERE rowid = 1")
    db.commit()
    db.close()
    assert main(["store", "check", root]) == 1
    out = capsys.readouterr().out
    assert "malformed rows: 1" in out and "PROBLEMS FOUND" in out
