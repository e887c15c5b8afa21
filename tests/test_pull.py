"""nexedge pull: local store and PullServer over loopback TCP, crash/restart resumption."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import zmq

from nexedge.relabel.pull import LocalSource, RemoteSource, pull, pull_and_export
from nexedge.serve.pullserver import PullServer, is_loopback
from nexedge.store import SampleStore


def fill(root, n, size=2000, quota=None, start=0):
    with SampleStore(root, quota_bytes=quota) as st:
        for i in range(start, start + n):
            data = (f"img{i}|".encode() * size)[:size]
            st.add(data, "png", {
                "camera": f"cam{i % 3}", "frame_id": str(i), "ts": 1_000_000.0 + i, "model_id": "m@1",
                "threshold": 0.4, "score": 0.41, "probs": {"good": 0.59, "scratch": 0.41},
                "decision": "REJECT" if i % 2 else "PASS", "reason": "band", "kind": "band",
            })


def manifest(out):
    with open(os.path.join(out, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


def lines(out):
    """Complete manifest lines so far (safe while a writer appends)."""
    try:
        with open(os.path.join(out, "manifest.jsonl"), "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_exact(out, store_root, n):
    rows = manifest(out)
    ids = [r["sample_id"] for r in rows]
    assert len(ids) == n and len(set(ids)) == n
    names = sorted(os.listdir(os.path.join(out, "images")))
    assert len(names) == len({r["sha256"] for r in rows}) and not [x for x in names if x.startswith(".")]
    with SampleStore(store_root, writer=False) as st:
        s = st.stats()
        assert s["pending"] == 0 and s["pulled"] == n


def test_local_pull_with_filters_then_the_rest(tmp_path):
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    fill(store, 30)
    c = pull(LocalSource(store), out, filters={"camera": "cam1", "decision": "REJECT"}, page_size=4)
    rows = manifest(out)
    assert c["received"] == c["new"] == len(rows) == 5  # cam1 & odd among 0..29: 1, 7, 13, 19, 25
    assert {r["camera"] for r in rows} == {"cam1"} and {r["decision"] for r in rows} == {"REJECT"}
    r = rows[0]
    assert r["path"].startswith("images/") and r["time"].startswith("1970-01-12T")
    assert set(r) >= {"path", "sha256", "camera", "time", "model_id", "threshold", "score", "probs", "decision",
                      "reason"}
    c = pull(LocalSource(store), out, filters={"since": 1_000_010, "until": 1_000_020}, limit=3)
    assert c["received"] == 3
    c = pull(LocalSource(store), out)
    assert c["received"] == 22
    check_exact(out, store, 30)
    assert pull(LocalSource(store), out)["received"] == 0  # nothing left


class CrashAfter:
    """Wraps a source and dies at a chosen point of the second page (deterministic crash points)."""

    def __init__(self, src, where):
        self.src, self.where, self.pages, self.name = src, where, 0, src.name

    def hello(self):
        return self.src.hello()

    def page(self, *a):
        self.pages += 1
        return self.src.page(*a)

    def ack(self, ids):
        if self.pages == 2 and self.where == "before_ack":
            raise KeyboardInterrupt("simulated crash after the manifest, before the ack")
        if self.pages == 2 and self.where == "after_ack":
            self.src.ack(ids)
            raise KeyboardInterrupt("simulated crash right after the ack")
        return self.src.ack(ids)


@pytest.mark.parametrize("where", ["before_ack", "after_ack"])
def test_crash_points_resume_exactly_once(tmp_path, where):
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    fill(store, 20)
    with pytest.raises(KeyboardInterrupt):
        pull(CrashAfter(LocalSource(store), where), out, page_size=5)
    assert len(manifest(out)) == 10
    c = pull(LocalSource(store), out, page_size=5)
    assert c["already"] == (5 if where == "before_ack" else 0)
    check_exact(out, store, 20)


def test_torn_manifest_line_is_repaired(tmp_path):
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    fill(store, 6)
    pull(LocalSource(store), out, limit=3)
    with open(os.path.join(out, "manifest.jsonl"), "ab") as f:
        f.write(b'{"sample_id": "half')  # what kill -9 mid-write leaves
    pull(LocalSource(store), out)
    check_exact(out, store, 6)


def test_pull_server_over_loopback_and_bad_requests(tmp_path):
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    fill(store, 25)
    with PullServer(store, "tcp://127.0.0.1:*") as srv:
        src = RemoteSource(srv.endpoint, timeout_s=5)
        try:
            c = pull(src, out, page_size=7)
        finally:
            src.close()
        assert c["received"] == 25 and srv.counters["acked"] == 25
        ctx = zmq.Context()
        s = ctx.socket(zmq.REQ)
        s.connect(srv.endpoint)
        for bad in (b"not json", b"[]", json.dumps({"op": "drop"}).encode(),
                    json.dumps({"op": "page", "filters": {"sql": "1"}}).encode(),
                    json.dumps({"op": "ack", "ids": ["x"]}).encode(), json.dumps({"v": 9, "op": "hello"}).encode()):
            s.send(bad)
            assert s.poll(5000)
            head = json.loads(s.recv())
            assert head["ok"] is False and head["error"]
        s.send(json.dumps({"op": "hello"}).encode())  # no "v": refused (it must be the integer 1)
        assert "protocol version missing" in json.loads(s.recv())["error"]
        s.send(json.dumps({"v": 1, "op": "hello"}).encode())
        assert json.loads(s.recv())["pending"] == 0  # still serving
        s.close(0)
        ctx.term()
    check_exact(out, store, 25)
    out2 = str(tmp_path / "out2")
    fill(store, 5, start=100)
    res = pull_and_export(out2, ("manifest", "labelstudio"), store=store)
    assert res["counts"]["received"] == 5 and len(res["written"]["labelstudio"]) == 2


def test_non_loopback_bind_needs_auth(tmp_path):
    fill(str(tmp_path / "s"), 1)
    for ep in ("tcp://*:5560", "tcp://0.0.0.0:5560", "tcp://10.1.2.3:5560", "tcp://eth0:5560"):
        assert not is_loopback(ep)
        with pytest.raises(ValueError, match="authentication"):
            PullServer(str(tmp_path / "s"), ep)
    for ep in ("tcp://127.0.0.1:5560", "tcp://localhost:1", "tcp://[::1]:5", "ipc:///tmp/x", "inproc://p"):
        assert is_loopback(ep)


def test_server_restart_mid_pull(tmp_path):
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    fill(store, 120, size=5000)
    ep = f"tcp://127.0.0.1:{free_port()}"
    srv = PullServer(store, ep).start()
    result = {}

    def client():
        src = RemoteSource(ep, timeout_s=0.5, retries=20)
        try:
            result["c"] = pull(src, out, page_size=4)
        except Exception as e:  # pragma: no cover - reported by the assert below
            result["e"] = e
        finally:
            src.close()

    t = threading.Thread(target=client)
    t.start()
    deadline = time.time() + 20
    while time.time() < deadline and lines(out) < 20:
        time.sleep(0.01)
    srv.stop()  # the daemon goes away mid-pull...
    time.sleep(0.8)
    srv = PullServer(store, ep).start()  # ...and comes back
    t.join(60)
    srv.stop()
    assert "e" not in result, result.get("e")
    check_exact(out, store, 120)


CLIENT = [sys.executable, "-m", "nexedge.cli", "pull", "--page-size", "1", "--no-progress", "--timeout", "5"]


def test_kill9_of_pull_client_mid_transfer_then_rerun(tmp_path):
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    fill(store, 200, size=20000)
    with PullServer(store, "tcp://127.0.0.1:*") as srv:
        for stop_at in (10, 50, 90):
            proc = subprocess.Popen(CLIENT + ["--connect", srv.endpoint, "--out", out],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.time() + 60
            while time.time() < deadline and proc.poll() is None and lines(out) < stop_at:
                time.sleep(0.005)
            assert proc.poll() is None, "client finished before it could be killed"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        done = subprocess.run(CLIENT + ["--connect", srv.endpoint, "--out", out], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    check_exact(out, store, 200)


def test_daemon_store_to_pull_over_curve_to_import(tmp_path):
    """The real daemon (tiny ONNX model) logs uncertain frames; `nexedge pull --connect` with keys gets
    them, a plain client gets nothing; labels go back into a data set the trainer reads."""
    import numpy as np

    from nexedge.cli import main
    from nexedge.relabel.importer import import_labels
    from nexedge.serve import config as serve_config
    from nexedge.serve.auth import CurveClient
    from nexedge.serve.client import CameraClient
    from nexedge.serve.daemon import Daemon
    from nexedge.train.data import list_classes, scan_split
    from tests.support.daemon import CLASSES, base_config, build_tiny_onnx

    (tmp_path / "model").mkdir()
    model = build_tiny_onnx(str(tmp_path / "model"))
    keys, allowed = str(tmp_path / "keys"), tmp_path / "allowed"
    allowed.mkdir()
    for name in ("daemon", "cam", "alice"):
        assert main(["keys", "--out", keys, "--name", name]) == 0
    (allowed / "cameras").mkdir()
    (allowed / "pullers").mkdir()
    os.link(os.path.join(keys, "cam.key"), str(allowed / "cameras" / "cam.key"))
    os.link(os.path.join(keys, "alice.key"), str(allowed / "pullers" / "alice.key"))
    store = str(tmp_path / "store")
    # an ephemeral port: a port probed free beforehand could go to the daemon's own "*" sockets
    cfg = base_config(model, store={"path": store}, uncertain={"band": 50.0, "audit_fraction": 0.0},
                      pull={"bind": "tcp://127.0.0.1:*"},
                      auth={"server_secret_file": os.path.join(keys, "daemon.key_secret"),
                            "allowed_clients_dir": str(allowed)})
    d = Daemon(serve_config.from_dict(cfg))
    d.setup()
    t = threading.Thread(target=d.serve)
    t.start()
    try:
        curve = CurveClient(os.path.join(keys, "cam.key_secret"), os.path.join(keys, "daemon.key"))
        with CameraClient(d.endpoints["frames"], "line3-cam1", curve=curve) as cam:
            for i in range(8):
                cam.infer(np.random.default_rng(i).integers(0, 256, (40, 40), dtype=np.uint8))
        deadline = time.time() + 10
        while time.time() < deadline:
            with SampleStore(store, writer=False) as st:
                if st.stats()["samples"] == 8:
                    break
            time.sleep(0.05)
        ep = d.endpoints["pull"]
        assert main(["pull", "--connect", ep, "--out", str(tmp_path / "plain"), "--timeout", "0.5",
                     "--retries", "0", "--no-progress"]) == 1
        # a camera's key cannot pull (issue 30 item 5: it could page and ack the store empty)
        assert main(["pull", "--connect", ep, "--client-key", os.path.join(keys, "cam.key_secret"),
                     "--server-key", os.path.join(keys, "daemon.key"), "--out", str(tmp_path / "cam"),
                     "--timeout", "0.5", "--retries", "0", "--no-progress"]) == 1
        assert d.auth.counts()["wrong_role"] >= 1
        out = str(tmp_path / "out")
        assert main(["pull", "--connect", ep, "--client-key", os.path.join(keys, "alice.key_secret"),
                     "--server-key", os.path.join(keys, "daemon.key"), "--out", out, "--format", "labelstudio",
                     "--no-progress"]) == 0
        assert d.auth.counts()["handshake"] >= 1
    finally:
        d.request_stop()
        t.join(20)
    rows = manifest(out)
    assert len(rows) == 8 and {r["camera"] for r in rows} == {"line3-cam1"} and set(rows[0]["probs"]) == set(CLASSES)
    with SampleStore(store, writer=False) as st:
        assert st.stats()["pulled"] == 8
    ds = tmp_path / "ds"
    for cls in CLASSES:
        (ds / "train" / cls).mkdir(parents=True)
        (ds / "train" / cls / "seed.png").write_bytes(cls.encode() * 10)
    tasks = json.load(open(os.path.join(out, "labelstudio", "tasks.json")))
    export = [dict(tk, id=i, annotations=[{"completed_by": 3, "result": [
        {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [CLASSES[i % 2]]}}]}])
        for i, tk in enumerate(tasks)]
    (tmp_path / "export.json").write_text(json.dumps(export))
    res = import_labels(str(tmp_path / "export.json"), str(ds), images_dir=out)
    assert res["counts"]["add"] == len({r["sha256"] for r in rows})
    assert len(scan_split(str(ds), "train", list_classes(str(ds)))) == len(CLASSES) + res["counts"]["add"]


def test_ack_accepts_only_integer_ids_of_the_current_lease(tmp_path):
    """Issue 13 item 10: ``ack [true]`` marked sample 1 pulled, and ids never handed out were acked."""
    store = str(tmp_path / "store")
    fill(store, 10)
    with PullServer(store, "tcp://127.0.0.1:*") as srv:
        ctx = zmq.Context()
        s = ctx.socket(zmq.REQ)
        s.connect(srv.endpoint)

        def call(req):
            s.send(json.dumps(dict(req, v=1)).encode())
            assert s.poll(5000)
            return json.loads(s.recv_multipart()[0])

        for ids in ([True], [1.0], ["1"], [1], [5, 6]):  # nothing handed out yet
            head = call({"op": "ack", "ids": ids})
            assert head["ok"] is False, ids
        page = call({"op": "page", "after_id": None, "limit": 3})
        leased = [r["id"] for r in page["samples"]]
        head = call({"op": "ack", "ids": leased + [9]})  # one id outside the lease refuses the whole ack
        assert head["ok"] is False and head["not_leased"] == [9]
        assert call({"op": "ack", "ids": leased}) == {"ok": True, "acked": 3}
        assert call({"op": "ack", "ids": leased})["ok"] is False  # the lease ended with the ack
        s.close(0)
        ctx.term()
    with SampleStore(store, writer=False) as st:
        assert st.stats()["pulled"] == 3


def test_leases_are_per_client_expire_and_only_the_holder_acks(tmp_path):
    """Issue 30 item 6: the lease was global: two concurrent pulls exported the same 128 samples, and a
    client that never paged acknowledged ids leased to another."""
    store = str(tmp_path / "store")
    fill(store, 40)
    with PullServer(store, "tcp://127.0.0.1:*", lease_s=0.5) as srv:
        ctx = zmq.Context()

        def client():
            s = ctx.socket(zmq.REQ)
            s.linger = 0
            s.connect(srv.endpoint)
            return s

        def call(s, **req):
            s.send(json.dumps(dict(req, v=1)).encode())
            assert s.poll(5000)
            return json.loads(s.recv_multipart()[0])

        a, b, c = client(), client(), client()
        pa = call(a, op="page", after_id=None, limit=16)
        pb = call(b, op="page", after_id=None, limit=16)
        ids_a, ids_b = [r["id"] for r in pa["samples"]], [r["id"] for r in pb["samples"]]
        assert len(ids_a) == len(ids_b) == 16 and not set(ids_a) & set(ids_b)  # never handed out twice
        assert pb["leased_elsewhere"] == 16
        refused = call(c, op="ack", ids=ids_a[:10])  # c never paged: a's lease is not c's to ack
        assert refused["ok"] is False and refused["not_leased"] == ids_a[:10]
        assert call(b, op="ack", ids=ids_a[:1])["ok"] is False
        assert call(a, op="ack", ids=ids_a[:8]) == {"ok": True, "acked": 8}
        # a session names the client across connections (nexedge pull keeps one per export folder)
        s1, s2 = client(), client()
        ps = call(s1, op="page", after_id=None, limit=4, session="folder-1")
        assert call(s2, op="ack", ids=[r["id"] for r in ps["samples"]], session="folder-1")["acked"] == 4
        time.sleep(0.6)  # leases lapse: the rest of a's page goes to whoever pages next; a may not ack it
        pc = call(c, op="page", after_id=None, limit=64)
        assert set(ids_a[8:]) <= {r["id"] for r in pc["samples"]}
        assert call(a, op="ack", ids=ids_a[8:])["ok"] is False
        for s in (a, b, c, s1, s2):
            s.close()
        ctx.term()
    with SampleStore(store, writer=False) as st:
        assert st.stats()["pulled"] == 12
