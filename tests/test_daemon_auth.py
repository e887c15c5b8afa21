"""Daemon with every optional section on: store, shift monitor, pull endpoint, CurveZMQ auth (real sockets)."""

import json
import os
import shutil
import threading
import time
import urllib.request

import numpy as np
import pytest
import zmq

from nexedge.serve import config as serve_config
from nexedge.serve.auth import CurveClient, make_keypair
from nexedge.serve.client import CameraClient, VerdictSubscriber
from nexedge.serve.daemon import Daemon
from tests.support.daemon import base_config, build_tiny_onnx


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_onnx(str(tmp_path_factory.mktemp("model")))


def _keys(tmp_path):
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    make_keypair(str(keys), "server")
    pub, _ = make_keypair(str(keys), "cam")
    make_keypair(str(keys), "stranger")
    shutil.copy(pub, str(allowed / "cam.key"))  # at the top of the allow-list: a camera key
    puller, _ = make_keypair(str(keys), "puller")
    (allowed / "pullers").mkdir()
    shutil.copy(puller, str(allowed / "pullers" / "puller.key"))
    return keys, allowed


def test_all_sections_with_curve_auth(model, tmp_path):
    keys, allowed = _keys(tmp_path)
    store = str(tmp_path / "store")
    raw = base_config(
        model,
        store={"path": store, "quota": "50MB"},
        uncertain={"band": 50.0},
        monitor={"window": 20, "min_frames": 10, "limits": {"uncertain_frac": 0.3}},
        pull={"bind": "tcp://127.0.0.1:*"},
        auth={"server_secret_file": str(keys / "server.key_secret"), "allowed_clients_dir": str(allowed)},
    )
    d = Daemon(serve_config.from_dict(raw))
    d.setup()
    t = threading.Thread(target=d.serve)
    t.start()
    try:
        good = CurveClient(str(keys / "cam.key_secret"), str(keys / "server.key"))
        stranger = CurveClient(str(keys / "stranger.key_secret"), str(keys / "server.key"))
        im = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
        with CameraClient(d.endpoints["frames"], "camA", curve=good) as cam:
            verdicts = [cam.infer(im, timeout_ms=10000) for _ in range(12)]
        with CameraClient(d.endpoints["frames"], "camX", curve=stranger) as cam:
            cam.send(im)
            assert cam.recv(timeout_ms=1000) is None  # refused: never reaches the daemon
        with CameraClient(d.endpoints["frames"], "camP") as cam:  # plain TCP, no CURVE
            cam.send(im)
            assert cam.recv(timeout_ms=500) is None
        sub = VerdictSubscriber(d.endpoints["verdicts"], curve=good)
        sub.close()
        # pull endpoint (the store engineer's protocol) sees the stored samples, through CURVE with a
        # puller's key; the camera's key is refused there (wrong role)
        ctx = zmq.Context.instance()
        for client in (good, CurveClient(str(keys / "puller.key_secret"), str(keys / "server.key"))):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            client.apply_client(s)
            s.connect(d.endpoints["pull"])
            deadline = time.monotonic() + 10
            pending = 0
            while pending < 12 and time.monotonic() < deadline:
                s.send_multipart([b"", json.dumps({"v": 1, "op": "hello"}).encode()])
                if not s.poll(1000 if client is good else 5000):
                    break
                pending = json.loads(s.recv_multipart()[-1])["pending"]
            s.close()
            if client is good:
                assert pending == 0 and d.auth.counts()["wrong_role"] >= 1
        body = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5).read().decode()
    finally:
        d.request_stop()
        t.join(20)
    assert not t.is_alive()
    assert all(v["decision"] in ("PASS", "REJECT") and v["uncertain"] for v in verdicts)
    assert pending == 12
    saved = {ln.split('"')[1]: float(ln.split()[-1]) for ln in body.splitlines()
             if ln.startswith("nexedge_samples_saved_total")}
    # every frame is in the band; the frame that raised the shift alarm is filed as drift
    assert sum(saved.values()) == 12 and saved.get("drift", 0) >= 1
    assert 'nexedge_monitor_alarms_total{alarm="uncertain_frac",camera="camA"}' in body
    assert 'nexedge_monitor{camera="camA",key=' in body
    refused = [ln for ln in body.splitlines() if ln.startswith("nexedge_auth_refused_total")]
    assert sum(float(ln.split()[-1]) for ln in refused) >= 2, refused
    assert 'nexedge_frames_received_total{camera="camA"} 12.0' in body
    assert "camX" not in body and "camP" not in body
    assert os.path.exists(os.path.join(store, "samples.db"))
