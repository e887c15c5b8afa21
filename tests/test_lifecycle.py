"""Hot swap, shadow mode, promotion and rollback on a running daemon: real loopback sockets, real
ONNX Runtime sessions of tiny models, real SQLite store, the control endpoint over ZeroMQ."""

import json
import os
import re
import shutil
import threading
import time
import urllib.request

import numpy as np
import pytest
from _daemon_util import build_tiny_onnx, running

from nexedge import preprocess as pp
from nexedge.card import card_path_for, read_card
from nexedge.runtime import open_backend
from nexedge.serve import config as C
from nexedge.serve.client import CameraClient
from nexedge.serve.control import ControlClient, ControlServer, ControlTimeout
from nexedge.serve.lifecycle import PChart
from nexedge.store import SampleStore

N = 24


def _images(n=N):
    rng = np.random.default_rng(0)
    return [np.clip(rng.normal(30 + 8 * i, 20 + 3 * (i % 5), (40, 40)), 0, 255).astype(np.uint8) for i in range(n)]


def _scores(path, images):
    with open_backend(path, intra_threads=1) as b:
        return [float(s) for s in b.infer(np.stack([pp.prepare(im, b.card.input) for im in images])).defect_score]


def _gap_threshold(scores):
    """A threshold in the widest gap between the middle scores: no frame sits near it."""
    s = sorted(scores)
    lo, hi = len(s) // 4, 3 * len(s) // 4
    i = max(range(lo, hi), key=lambda k: s[k + 1] - s[k])
    assert s[i + 1] - s[i] > 1e-5
    return (s[i] + s[i + 1]) / 2


def _set_threshold(path, thr, status="measured", classes=None):
    card = read_card(card_path_for(path))
    for op in card.data["operating_points"]:
        op["threshold"] = thr
    card.data["operating_points_source"]["status"] = status
    if classes:
        card.data["classes"] = classes
    card.save_for(path)


def _copy(src, folder, name):
    os.makedirs(folder, exist_ok=True)
    dst = os.path.join(folder, name + ".onnx")
    shutil.copy(src, dst)
    shutil.copy(card_path_for(src), card_path_for(dst))
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """active (seed 0), twin (same bytes), other (seed 1), each with a threshold inside its scores."""
    root = tmp_path_factory.mktemp("lifecycle")
    ims = _images()
    for sub in ("a", "b"):
        (root / sub).mkdir()
    a = build_tiny_onnx(str(root / "a"), seed=0, name="alpha")
    b = build_tiny_onnx(str(root / "b"), seed=1, name="beta")
    sa, sb = _scores(a, ims), _scores(b, ims)
    ta, tb = _gap_threshold(sa), _gap_threshold(sb)
    _set_threshold(a, ta)
    _set_threshold(b, tb)
    out = {"active": a, "twin": _copy(a, str(root / "twin"), "alpha"), "other": b, "images": ims,
           "sa": sa, "sb": sb, "ta": ta, "tb": tb, "root": root}
    out["from_parent"] = _copy(b, str(root / "fp"), "beta_fp")
    _set_threshold(out["from_parent"], tb, status="from_parent")
    out["classes"] = _copy(b, str(root / "cls"), "beta_cls")
    _set_threshold(out["classes"], tb, classes=["good", "crack", "void"])
    return out


def _lc(**kw):
    base = {"control": "tcp://127.0.0.1:*", "shadow_queue": 64}
    base.update(kw)
    return base


def _ctl(d):
    return ControlClient(d.endpoints["control"], timeout_s=60)


def _stream_seq(d, images, camera="cam0"):
    """One frame at a time (no backlog: the shadow never skips)."""
    with CameraClient(d.endpoints["frames"], camera) as cam:
        return [cam.infer(im, timeout_ms=20000) for im in images]


def _wait_report(c, n, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rep = c.call("report")["report"]
        if rep.get("frames", 0) + rep.get("skipped", 0) >= n:
            return rep
        time.sleep(0.05)
    raise AssertionError(f"shadow did not score {n} frames: {rep}")


def _scrape(d):
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def test_shadow_identical_100_percent_then_different_exact_counts(models, tmp_path):
    ims, sa, sb, ta, tb = models["images"], models["sa"], models["sb"], models["ta"], models["tb"]
    active_dec = ["REJECT" if s >= ta else "PASS" for s in sa]
    cand_dec = ["REJECT" if s >= tb else "PASS" for s in sb]
    expect = {f"{a}/{c}": 0 for a in ("PASS", "REJECT") for c in ("PASS", "REJECT")}
    for a, c in zip(active_dec, cand_dec):
        expect[f"{a}/{c}"] += 1
    assert 0 < expect["PASS/REJECT"] + expect["REJECT/PASS"] < N, expect  # a real, partial disagreement
    with running(models["active"], lifecycle=_lc(), store={"path": str(tmp_path / "store")},
                 uncertain={"band": 0.0, "audit_fraction": 0.0}) as d, _ctl(d) as c:
        active_id = d.card.model_id
        r = c.call("load", path=models["twin"])
        assert r["ok"], r
        assert r["status"]["candidate"]["sha256"] == r["status"]["active"]["sha256"]
        got = _stream_seq(d, ims, "camA")
        rep = _wait_report(c, N)
        assert rep["frames"] == N and rep["skipped"] == 0 and rep["agreement"] == 1.0
        cam = rep["cameras"]["camA"]
        assert cam["matrix"]["PASS/REJECT"] == cam["matrix"]["REJECT/PASS"] == 0
        assert cam["matrix"]["PASS/PASS"] == active_dec.count("PASS")
        assert cam["correlation"] == pytest.approx(1.0, abs=1e-9)
        # the candidate changes nothing about the verdicts
        assert [v["decision"] for v in got] == active_dec and {v["model_id"] for v in got} == {active_id}

        r = c.call("load", path=models["other"], **{"as": "candidate"})
        assert r["ok"], r
        cand_id = r["status"]["candidate"]["model_id"]
        got = _stream_seq(d, ims, "camB")
        rep = _wait_report(c, N)
        assert rep["candidate"] == cand_id
        assert rep["cameras"]["camB"]["matrix"] == expect
        assert rep["disagree"] == expect["PASS/REJECT"] + expect["REJECT/PASS"]
        assert [v["decision"] for v in got] == active_dec and {v["model_id"] for v in got} == {active_id}
        assert [v["score"] for v in got] == pytest.approx(sa, abs=1e-5)
        metrics = _scrape(d)
        key = (("active", "PASS"), ("camera", "camB"), ("candidate", "REJECT"))
        assert metrics[("nexedge_shadow_frames_total", key)] == expect["PASS/REJECT"]
        assert metrics[("nexedge_model_slot", (("model_id", cand_id), ("slot", "candidate")))] == 1.0
        assert metrics[("nexedge_shadow_score_correlation", (("camera", "camB"),))] < 1.0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and d.sampler.written < rep["disagree"]:
            time.sleep(0.05)
    store = SampleStore(str(tmp_path / "store"), writer=False)
    rows = store.query(kind="shadow")
    assert len(rows) == rep["disagree"]
    for row in rows:
        i = int(row["frame_id"]) - 1
        assert row["model_id"] == active_id and row["decision"] == active_dec[i]
        assert row["score"] == pytest.approx(sa[i], abs=1e-5)
        assert row["shadow"]["model_id"] == cand_id and row["shadow"]["decision"] == cand_dec[i]
        assert row["shadow"]["score"] == pytest.approx(sb[i], abs=1e-5)
    store.close()
    # people label exactly the frames where the models differ
    from nexedge.cli import main as nexedge_main

    assert nexedge_main(["pull", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "pulled"), "--kind",
                         "shadow", "--no-progress"]) == 0
    manifest = [json.loads(x) for x in (tmp_path / "pulled" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == rep["disagree"] and all(m["kind"] == "shadow" and m["shadow"] for m in manifest)


def test_swap_under_load_loses_nothing_and_rollback_acts_within_a_batch(models):
    ims = models["images"]
    verdicts, sent_at, errors = {}, {}, []
    stop = threading.Event()

    def camera(k, endpoint):
        try:
            with CameraClient(endpoint, f"cam{k}") as cam:
                i = 0
                while not stop.is_set() or cam.pending:
                    while not stop.is_set() and len(cam.pending) < 6:
                        t = time.monotonic()
                        sent_at[(k, cam.send(ims[i % N]))] = t
                        i += 1
                    v = cam.recv(timeout_ms=20000)
                    if v is None:
                        errors.append(f"cam{k}: no verdict within 20 s")
                        return
                    verdicts[(k, v["frame_id"])] = (v, time.monotonic())
        except Exception as e:  # reported by the assertion below
            errors.append(repr(e))

    with running(models["active"], lifecycle=_lc(), batching={"max_queue": 64}) as d, _ctl(d) as c:
        a_id = d.card.model_id
        threads = [threading.Thread(target=camera, args=(k, d.endpoints["frames"])) for k in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        assert c.call("load", path=models["other"])["ok"]
        time.sleep(0.3)
        r = c.call("promote")
        assert r["ok"] and r["status"]["previous"]["model_id"] == a_id
        b_id = r["status"]["active"]["model_id"]
        time.sleep(0.4)
        r = c.call("rollback")
        t_rollback = time.monotonic()
        assert r["ok"] and r["status"]["active"]["model_id"] == a_id and r["status"]["previous"] is None
        time.sleep(0.4)
        t_load_start = time.monotonic()
        r = c.call("load", path=models["other"], **{"as": "active"})
        t_load_active = time.monotonic()
        assert r["ok"] and r["status"]["active"]["model_id"] == b_id
        time.sleep(0.4)
        stop.set()
        for t in threads:
            t.join(60)
        status = c.call("status")["status"]
    assert not errors, errors
    assert set(verdicts) == set(sent_at), "a frame got no verdict"
    decisions = {v["decision"] for v, _ in verdicts.values()}
    assert decisions <= {"PASS", "REJECT"}, "a frame was RECHECKed during a swap"
    ids = [v["model_id"] for v, _ in verdicts.values()]
    assert ids.count(a_id) > 0 and ids.count(b_id) > 0
    # every frame sent after the rollback returned (and answered before the next swap began) was decided
    # by the old model; every frame sent after the later `load --as active` returned, by the new one:
    # a swap takes effect at the next batch
    after_rollback = after_load = 0
    for key, (v, t_answer) in verdicts.items():
        if t_rollback < sent_at[key] and t_answer < t_load_start:
            assert v["model_id"] == a_id, (key, v)
            after_rollback += 1
        if sent_at[key] > t_load_active:
            assert v["model_id"] == b_id, (key, v)
            after_load += 1
    assert after_rollback > 0 and after_load > 0
    assert status["changes"] == {"load": 2, "promote": 1, "rollback": 1}
    assert [h["event"] for h in status["history"]] == ["model_load", "model_promote", "model_rollback", "model_load"]
    assert all(h["who"].startswith("loopback") for h in status["history"])


def test_restart_resumes_promoted_model_and_survives_a_broken_pointer(models, tmp_path):
    mdir = tmp_path / "models"
    lc = _lc(models_dir=str(mdir))
    im = models["images"][0]
    with running(models["active"], lifecycle=lc) as d, _ctl(d) as c:
        assert c.call("load", path=models["other"], who="alice")["ok"]
        r = c.call("promote", who="alice")
        assert r["ok"], r
        b_id = r["status"]["active"]["model_id"]
        promoted_path = r["status"]["active"]["path"]
    assert promoted_path.startswith(str(mdir / "versions"))
    pointer = json.loads((mdir / "active.json").read_text())
    assert pointer["active"]["model_id"] == b_id and "alice" in pointer["by"]
    with running(models["active"], lifecycle=lc) as d:
        with CameraClient(d.endpoints["frames"], "cam") as cam:
            assert cam.infer(im, timeout_ms=20000)["model_id"] == b_id
        assert d.models.active.source == "models_dir pointer"
    (mdir / "active.json").write_text("{not json")
    with running(models["active"], lifecycle=lc) as d:  # broken pointer: logged, starts on model.path
        with CameraClient(d.endpoints["frames"], "cam") as cam:
            assert cam.infer(im, timeout_ms=20000)["model_id"] == read_card(card_path_for(models["active"])).model_id


def test_refusals_are_clear_and_the_line_keeps_running(models, tmp_path):
    corrupt = _copy(models["other"], str(tmp_path / "corrupt"), "broken")
    with open(corrupt, "r+b") as f:
        f.write(b"garbage!")
    im = models["images"][0]
    with running(models["active"], lifecycle=_lc(memory_limit="1GiB")) as d, _ctl(d) as c:
        a_id = d.card.model_id
        cases = [
            (dict(op="load", path=models["classes"]), "classes"),
            (dict(op="load", path=models["from_parent"]), "not measured on this artifact"),
            (dict(op="load", path=str(tmp_path / "missing.onnx")), "does not exist"),
            (dict(op="load", path=corrupt), "sha256"),
            (dict(op="load", path=models["other"], **{"as": "boss"}), "expected 'candidate' or 'active'"),
            (dict(op="load"), "load needs 'path'"),
            (dict(op="promote"), "no candidate"),
            (dict(op="rollback"), "no previous model"),
            (dict(op="unload"), "no candidate"),
            (dict(op="unload", slot="active"), "the active model stays"),
            (dict(op="explode"), "unknown op 'explode'"),
            (dict(op="status", v=7), "protocol version 7"),
        ]
        for req, needle in cases:
            op = req.pop("op")
            r = c.call(op, **req)
            assert not r["ok"] and needle in r["error"], (op, req, r)
        for raw in (b"not json", b"[1, 2]", b"\xff\xfe"):
            c.sock.send(raw)
            r = json.loads(c.sock.recv())
            assert not r["ok"] and ("JSON" in r["error"]), r
        c.sock.send_multipart([b"{}", b"{}"])
        assert "one JSON request frame" in json.loads(c.sock.recv())["error"]
        # the memory limit: a limit below what is resident refuses every load
        d.models.limit = 1024
        r = c.call("load", path=models["other"])
        assert not r["ok"] and "lifecycle.memory_limit" in r["error"], r
        d.models.limit = None
        st = c.call("status")["status"]
        assert st["active"]["model_id"] == a_id and st["candidate"] is None and st["changes"] == {}
        with CameraClient(d.endpoints["frames"], "cam") as cam:
            v = cam.infer(im, timeout_ms=20000)
        assert v["model_id"] == a_id and v["decision"] in ("PASS", "REJECT")
        # SIGHUP with a bad model.path: logged, nothing changes
        d.models.hup(lambda: str(tmp_path / "nope.onnx"))
        time.sleep(0.5)
        assert c.call("status")["status"]["active"]["model_id"] == a_id
        # SIGHUP with a good one: hot swap to it
        d.models.hup(lambda: models["other"])
        end = time.monotonic() + 20
        while time.monotonic() < end and d.card.model_id == a_id:
            time.sleep(0.05)
        assert d.card.model_id != a_id and d.models.history[-1]["who"] == "SIGHUP"
        # max_models 2 with active + previous resident: a new candidate first unloads the previous model
        assert c.call("status")["status"]["previous"]["model_id"] == a_id
        d.models.lc.max_models = 2
        st = c.call("load", path=models["twin"])["status"]
        assert st["previous"] is None and st["candidate"]["path"] == models["twin"]


def test_auto_rollback_on_reject_rate_and_rule_based_promotion(models, tmp_path):
    ims = models["images"]
    high = _copy(models["active"], str(tmp_path / "hi"), "allpass")
    _set_threshold(high, 0.999)  # the active model PASSes every frame: baseline reject rate 0
    low = _copy(models["active"], str(tmp_path / "lo"), "allreject")
    _set_threshold(low, 0.01)  # this candidate REJECTs every frame
    twin = _copy(high, str(tmp_path / "tw"), "allpass2")
    lc = _lc(auto_rollback_baseline=16, auto_rollback_subgroup=8, auto_rollback_watch=64,
             auto_promote_frames=8, auto_promote_max_disagreement=0.0)
    with running(high, lifecycle=lc) as d, _ctl(d) as c:
        a_id = d.card.model_id
        assert all(v["decision"] == "PASS" for v in _stream_seq(d, ims[:16]))
        r = c.call("load", path=low)
        assert r["ok"]
        got = _stream_seq(d, ims[:8])
        rep = _wait_report(c, 8)
        assert rep["disagree"] == 8 and c.call("status")["status"]["candidate"] is not None  # no auto promotion
        r = c.call("promote")
        assert r["ok"] and r["status"]["auto_rollback"]["ucl"] < 1.0
        bad_id = r["status"]["active"]["model_id"]
        got = _stream_seq(d, ims[:8])
        assert [v["model_id"] for v in got] == [bad_id] * 8  # one subgroup on the new model ...
        end = time.monotonic() + 20
        while time.monotonic() < end and c.call("status")["status"]["active"]["model_id"] != a_id:
            time.sleep(0.05)
        assert {v["model_id"] for v in _stream_seq(d, ims[:8])} == {a_id}  # ... then it is rolled back
        st = c.call("status")["status"]
        assert st["active"]["model_id"] == a_id and st["history"][-1]["who"] == "auto-rollback"
        assert _scrape(d)[("nexedge_model_changes_total", (("action", "auto_rollback"),))] == 1.0
        # rule-based promotion: 8 shadow frames in full agreement promote the candidate
        assert c.call("load", path=twin)["ok"]
        _stream_seq(d, ims[:8])
        end = time.monotonic() + 20
        while time.monotonic() < end and c.call("status")["status"]["candidate"] is not None:
            time.sleep(0.05)
        st = c.call("status")["status"]
        assert st["active"]["path"] == twin and st["history"][-1]["who"] == "auto-promote"


def test_pchart_limits():
    pc = PChart(baseline=100, subgroup=50, watch=200)
    assert pc.arm() is None  # no baseline yet: not armed
    pc.observe([i % 10 == 0 for i in range(100)])  # 10 % rejects
    lim = pc.arm()
    assert lim["p"] == pytest.approx(0.1) and lim["ucl"] == pytest.approx(0.1 + 3 * (0.09 / 50) ** 0.5)
    assert pc.observe([i % 8 == 0 for i in range(50)]) is None  # 14 %: inside
    rate, _ = pc.observe([i % 2 == 0 for i in range(50)])  # 50 %: out
    assert rate == 0.5 and pc.armed is None


def test_control_endpoint_auth_rules(models, tmp_path):
    with pytest.raises(C.ConfigError, match="not loopback"):
        C.from_dict({"model": {"path": models["active"]}, "lifecycle": {"control": "tcp://0.0.0.0:5558"}})
    with pytest.raises(ValueError, match="not loopback"):
        ControlServer(None, "tcp://0.0.0.0:5558")
    for key, value, needle in (("max_models", 1, "must be 2 or 3"), ("memory_limit", "lots", "not a size"),
                               ("shadow_fraction", 1.5, "[0, 1]"), ("control", "localhost:5558", "not a ZeroMQ")):
        with pytest.raises(C.ConfigError, match=f"lifecycle.{key}.*{re.escape(needle)}"):
            C.from_dict({"model": {"path": models["active"]}, "lifecycle": {key: value}})
    from nexedge.serve.auth import CurveClient, make_keypair

    keys = tmp_path / "keys"
    allowed = keys / "allowed"
    make_keypair(str(keys), "server")
    make_keypair(str(keys), "alice")
    make_keypair(str(keys), "mallory")
    allowed.mkdir()
    shutil.copy(keys / "alice.key", allowed / "alice.key")
    auth = {"server_secret_file": str(keys / "server.key_secret"), "allowed_clients_dir": str(allowed)}
    with running(models["active"], lifecycle=_lc(), auth=auth) as d:
        ep = d.endpoints["control"]
        with ControlClient(ep, timeout_s=2, curve=CurveClient(str(keys / "mallory.key_secret"),
                                                                 str(keys / "server.key"))) as bad:
            with pytest.raises(ControlTimeout):
                bad.call("load", path=models["other"])
        with ControlClient(ep, timeout_s=2) as plain:  # no CURVE at all
            with pytest.raises(ControlTimeout):
                plain.call("status")
        with ControlClient(ep, timeout_s=60, curve=CurveClient(str(keys / "alice.key_secret"),
                                                                  str(keys / "server.key"))) as good:
            r = good.call("load", path=models["other"], who="bob")
            assert r["ok"], r
            assert r["status"]["history"][-1]["who"] == "alice"  # the key's name, not the claim
        assert d.models.candidate is not None and d.auth.refused >= 1


def test_store_schema_1_is_migrated_and_readable(tmp_path):
    import sqlite3

    root = tmp_path / "old"
    s = SampleStore(str(root))
    s.add(b"\x89PNG fake", "png", {"camera": "c", "kind": "band", "score": 0.5})
    s.close()
    db = sqlite3.connect(str(root / "samples.db"))  # make it look like a store written by schema 1
    cols = "id, sha256, camera, frame_id, ts, model_id, threshold, score, probs, decision, reason, kind, created, pulled"
    db.execute(f"CREATE TABLE s1 AS SELECT {cols} FROM samples")
    db.execute("DROP TABLE samples")
    db.execute("CREATE TABLE samples (id INTEGER PRIMARY KEY AUTOINCREMENT, sha256 TEXT NOT NULL, camera TEXT NOT "
               "NULL, frame_id TEXT, ts REAL NOT NULL, model_id TEXT, threshold REAL, score REAL, probs TEXT, decision "
               "TEXT, reason TEXT, kind TEXT NOT NULL, created REAL NOT NULL, pulled REAL)")
    db.execute(f"INSERT INTO samples ({cols}) SELECT {cols} FROM s1")
    db.execute("DROP TABLE s1")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    r = SampleStore(str(root), writer=False)
    assert r.query()[0]["shadow"] is None
    r.close()
    w = SampleStore(str(root))
    w.add(b"\x89PNG other", "png", {"camera": "c", "kind": "shadow", "score": 0.2,
                                    "shadow": {"model_id": "m@1", "score": 0.9}})
    rows = w.query()
    assert [r["kind"] for r in rows] == ["band", "shadow"] and rows[1]["shadow"]["score"] == 0.9
    with pytest.raises(ValueError, match="shadow"):
        w.add(b"x", "png", {"camera": "c", "shadow": "nope"})
    w.close()


def test_cli_and_sighup_on_a_daemon_process(models, tmp_path):
    """`nexedge line` against a real nexedge-daemon process; SIGHUP re-reads the config's model.path."""
    import signal
    import subprocess
    import sys

    import yaml
    from _daemon_util import base_config, free_port

    port = free_port()
    ctl = f"tcp://127.0.0.1:{port}"
    cfg = base_config(models["active"], lifecycle={"control": ctl}, logging={"level": "INFO", "format": "json"})
    cfg_path = tmp_path / "line.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))

    def line(*args):
        return subprocess.run([sys.executable, "-m", "nexedge.cli", "line", "--connect", ctl, "--timeout", "60",
                               *args], capture_output=True, text=True, timeout=90, env=env)

    proc = subprocess.Popen([sys.executable, "-c", "import sys; from nexedge.serve.daemon import main; "
                             "sys.exit(main())", "--config", str(cfg_path)], stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        end = time.monotonic() + 60
        for raw in proc.stderr:
            if '"event": "ready"' in raw or time.monotonic() > end:
                break
        a_id = read_card(card_path_for(models["active"])).model_id
        r = line("status")
        assert r.returncode == 0 and a_id in r.stdout and "candidate  -" in r.stdout, r.stdout + r.stderr
        r = line("load", models["classes"])
        assert r.returncode == 1 and "refused" in r.stderr and "classes" in r.stderr
        r = line("load", models["other"])
        assert r.returncode == 0, r.stderr
        r = line("report")
        assert r.returncode == 0 and "candidate beta.onnx@" in r.stdout
        r = line("--json", "promote")
        assert r.returncode == 0 and json.loads(r.stdout)["status"]["previous"]["model_id"] == a_id
        r = line("rollback")
        assert r.returncode == 0 and r.stdout.startswith("active     " + a_id)
        with ControlClient(ctl, timeout_s=60) as c:
            # SIGHUP: a config whose model.path is broken changes nothing ...
            cfg["model"]["path"] = str(tmp_path / "gone.onnx")
            cfg_path.write_text(yaml.safe_dump(cfg))
            proc.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            assert proc.poll() is None and c.call("status")["status"]["active"]["model_id"] == a_id
            # ... a good one is hot-swapped in
            cfg["model"]["path"] = models["other"]
            cfg_path.write_text(yaml.safe_dump(cfg))
            proc.send_signal(signal.SIGHUP)
            end = time.monotonic() + 30
            while time.monotonic() < end and c.call("status")["status"]["active"]["model_id"] == a_id:
                time.sleep(0.1)
            st = c.call("status")["status"]
        assert st["active"]["path"] == models["other"] and st["history"][-1]["who"] == "SIGHUP"
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=30)[1]
        assert proc.returncode == 0
        assert "SIGHUP" in err and "gone.onnx" in err  # the bad path was logged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_shift_monitor_rebases_on_a_model_change(models):
    """After a swap the monitor compares against the new card's references with fresh windows."""
    from nexedge.serve.monitor import ShiftMonitor

    a, b = read_card(card_path_for(models["active"])), read_card(card_path_for(models["other"]))
    a.data["val_scores"] = {"edges": [0.0, 0.5, 1.0], "good": [90, 10], "defect": [10, 90]}
    mon = ShiftMonitor(a, window=10, min_frames=5)
    for _ in range(8):
        mon.observe("cam", 0.2, "PASS", False, (0.5, 0.1, 0.1))
    assert mon.snapshot()["cam"]["frames"] == 8 and mon._ref is not None
    mon.rebase(b)  # b's card has no val_scores: no score reference, windows start again
    assert mon.snapshot() == {} and mon._ref is None
