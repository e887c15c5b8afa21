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
from nexedge.store.samples import ROW_BYTES


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


def test_retention_order_pulled_then_recheck_then_audit_never_pending_band(tmp_path):
    unit = 100 + ROW_BYTES  # one 100-byte image and its row
    with SampleStore(str(tmp_path / "s"), quota_bytes=8 * unit) as st:
        band = [st.add(_img(i), "png", _meta(i, kind="band")) for i in range(4)]
        audit = [st.add(_img(10 + i), "png", _meta(10 + i, kind="audit")) for i in range(4)]  # full
        st.mark_pulled(band[:2])
        # Two more: the two pulled band samples go, nothing else.
        new = st.add(_img(20), "png", _meta(20, kind="band"))
        new2 = st.add(_img(21), "png", _meta(21, kind="band"))
        assert new and new2
        left = {r["id"] for r in st.query(pending_only=False)}
        assert not (set(band[:2]) & left) and set(band[2:]) <= left and set(audit) <= left
        # A RECHECK sample (never inspected) does not push out an audit sample: refused.
        assert st.add(_img(22), "png", _meta(22, kind="recheck")) is None
        assert {r["id"] for r in st.query(pending_only=False)} == left
        # A band sample pushes out the oldest audit sample.
        new3 = st.add(_img(23), "png", _meta(23, kind="band"))
        left = {r["id"] for r in st.query(pending_only=False)}
        assert new3 in left and audit[0] not in left and set(audit[1:]) <= left
        assert st.evicted == 3
        # Fill with band samples until only pending band rows remain -> refused, counted.
        ids = [st.add(_img(30 + i), "png", _meta(30 + i, kind="band")) for i in range(5)]
        assert None not in ids[:3] and ids[3:] == [None, None]
        assert st.dropped == 3 and st.evicted == 6
        kinds = {r["kind"] for r in st.query(pending_only=False)}
        assert kinds == {"band"}
        assert st.stats()["used_bytes"] == 8 * unit
        assert st.integrity_check()["ok"]


def test_pending_recheck_junk_is_evicted_before_audit_samples(tmp_path):
    unit = 100 + ROW_BYTES
    with SampleStore(str(tmp_path / "s"), quota_bytes=6 * unit) as st:
        junk = [st.add(_img(i), "png", _meta(i, kind="recheck")) for i in range(4)]
        audit = [st.add(_img(10 + i), "png", _meta(10 + i, kind="audit")) for i in range(2)]  # full
        new = [st.add(_img(20 + i), "png", _meta(20 + i, kind="band")) for i in range(4)]
        assert None not in new
        left = {r["id"] for r in st.query(pending_only=False)}
        assert not (set(junk) & left) and set(audit) <= left


def test_duplicate_images_are_counted_against_the_quota(tmp_path):
    """Same bytes again and again used to add rows for free: 72 -> 3,072 rows with the quota full."""
    quota = 4 * (100 + ROW_BYTES)
    with SampleStore(str(tmp_path / "s"), quota_bytes=quota) as st:
        ids = [st.add(_img(0), "png", _meta(i, kind="band")) for i in range(50)]
        kept = [i for i in ids if i is not None]
        st_ = st.stats()
        assert st_["rows"] == len(kept) <= 4 and st_["used_bytes"] <= quota
        assert st.dropped == 50 - len(kept)


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


@pytest.mark.parametrize("quota", [None, 400000])
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
                assert st.stats()["bytes"] <= quota


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
    db = sqlite3.connect(os.path.join(root, "samples.db"))
    db.execute("UPDATE blobs SET ext = '../../x' WHERE rowid = 1")
    db.commit()
    db.close()
    assert main(["store", "check", root]) == 1
    out = capsys.readouterr().out
    assert "malformed rows: 1" in out and "PROBLEMS FOUND" in out
