"""nexedge-daemon as a real process: config errors, systemd notify, SIGTERM drain."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

from nexedge.serve.client import CameraClient
from tests.support.daemon import base_config, build_tiny_onnx


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_onnx(str(tmp_path_factory.mktemp("model")))


def _cmd(*args):
    return [sys.executable, "-c", "import sys; from nexedge.serve.daemon import main; sys.exit(main())", *args]


def _start(cfg_path, env=None):
    return subprocess.Popen(_cmd("--config", cfg_path), stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=dict(os.environ, **(env or {})), text=True)


def _read_until(proc, event, timeout=60.0):
    """Parse JSON log lines from stderr until one has ``event``; return it and the lines seen."""
    lines = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            return rec, lines
    raise AssertionError(f"no {event!r} log line; got:\n" + "".join(lines))


def test_config_error_exits_2_with_a_clear_message(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {path: m.onnx}\nbatching: {max_batch: -3}\n")
    r = subprocess.run(_cmd("--config", str(p)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "batching.max_batch" in r.stderr and "-3" in r.stderr


def test_missing_model_exits_1(tmp_path):
    p = tmp_path / "line.yaml"
    p.write_text(yaml.safe_dump(base_config(str(tmp_path / "nope.onnx"))))
    r = subprocess.run(_cmd("--config", str(p)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "nope.onnx" in r.stderr


def test_sigterm_drains_every_frame_answered_exit_0(model, tmp_path):
    cfg = base_config(model, batching={"max_batch": 4, "max_delay_ms": 20, "max_queue": 256},
                      logging={"level": "INFO", "format": "json"})
    cfg_path = tmp_path / "line.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    notify_path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(notify_path)
    ns.settimeout(60)
    proc = _start(str(cfg_path), env={"NOTIFY_SOCKET": notify_path})
    try:
        ready, _ = _read_until(proc, "ready")
        assert ns.recv(200).startswith(b"READY=1")
        endpoint = ready["endpoints"]["frames"]
        im = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
        got = []
        sent_before = []
        stop_sending = threading.Event()
        cam = CameraClient(endpoint, "camT")
        first = cam.infer(im, timeout_ms=10000)
        assert first["decision"] in ("PASS", "REJECT")
        for _ in range(150):
            sent_before.append(cam.send(im))
        while len(got) < 5:
            v = cam.recv(timeout_ms=10000)
            assert v is not None
            got.append(v)
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        sent_after = []
        while not stop_sending.is_set() and time.monotonic() - t_term < 0.3:
            sent_after.append(cam.send(im))
            time.sleep(0.002)
        stopped, _ = _read_until(proc, "stopped", timeout=30)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t_term
        got += cam.drain(2000)
        cam.close()
        assert b"STOPPING=1" in ns.recv(200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ns.close()
    assert rc == 0 and took < 15
    ids = [v["frame_id"] for v in got]
    assert len(ids) == len(set(ids)), "a frame got two verdicts"
    assert set(sent_before) <= set(ids), "a frame sent before SIGTERM got no verdict"
    # every frame the daemon took in was answered, including those arriving while it drained
    assert stopped["received"] == stopped["answered"] == len(got) + 1
    reasons = {v["reason"] for v in got if v["decision"] == "RECHECK"}
    assert reasons <= {"shutting_down"}
    late = [v for v in got if v["frame_id"] in set(sent_after)]
    assert all(v["decision"] == "RECHECK" for v in late)


def test_check_config_prints_merged_config(model, tmp_path):
    import shutil

    from nexedge.card import card_path_for

    shutil.copy(model, tmp_path / "m.onnx")
    shutil.copy(card_path_for(model), tmp_path / "m.card.json")
    p = tmp_path / "line.yaml"
    p.write_text("model: {path: m.onnx}\n")
    r = subprocess.run(_cmd("--config", str(p), "--set", "batching.max_batch=16", "--metrics-port", "0",
                            "--check-config"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["batching"]["max_batch"] == 16 and cfg["metrics"]["port"] == 0
    assert cfg["model"]["path"] == str(tmp_path / "m.onnx") and cfg["store"] is None
