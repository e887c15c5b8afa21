"""Issue 13: hostile traffic against the daemon over real loopback sockets, one test per hole.

Each test reproduces an attack that hurt the daemon before and checks the fix: every frame
with a readable identity gets exactly one answer, in time; other cameras are not harmed;
memory and threads stay bounded.
"""

import json
import logging
import os
import socket
import stat
import threading
import time
import urllib.request
import zlib

import cv2
import numpy as np
import pytest
import zmq
from test_daemon_serve import FailingBackend, scrape

from nexedge.runtime import open_backend
from nexedge.serve import protocol
from nexedge.serve.client import CameraClient
from nexedge.serve.decode import image_dims
from tests.support.daemon import build_tiny_onnx, png_header, running


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_onnx(str(tmp_path_factory.mktemp("model")))


class Raw:
    """A DEALER that sends arbitrary multipart messages (with the empty delimiter) and reads verdicts."""

    def __init__(self, endpoint):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, *parts):
        self.sock.send_multipart([b""] + list(parts))

    def recv(self, timeout_ms=5000):
        if not self.sock.poll(timeout_ms):
            return None
        return json.loads(self.sock.recv_multipart()[-1])

    def recv_n(self, n, timeout_s=20.0):
        out, end = [], time.monotonic() + timeout_s
        while len(out) < n and time.monotonic() < end:
            v = self.recv(int(max(end - time.monotonic(), 0.001) * 1000))
            if v is not None:
                out.append(v)
        return out

    def close(self):
        self.sock.close()
        self.ctx.term()


def header(camera, frame_id, encoding="png", **kw):
    h = {"v": 1, "camera": camera, "frame_id": frame_id, "encoding": encoding}
    h.update(kw)
    return json.dumps(h).encode()  # ensure_ascii: a lone surrogate goes out as the escape "\ud800"


def _png(seed, shape=(40, 52)):
    img = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


# -- 1. camera ids that cannot be encoded -------------------------------------------------------


def test_surrogate_camera_id_is_refused_and_harms_no_other_frame(model):
    png = _png(1)
    with running(model, batching={"max_batch": 8, "max_delay_ms": 50}) as d:
        raw = Raw(d.endpoints["frames"])
        for i in range(12):  # frames of 12 cameras batched together with the bad one
            raw.send(header(f"cam{i}", i), png)
            if i == 5:
                raw.send(header("cam\ud800", "bad-1"), png)
        got = raw.recv_n(13)
        raw.close()
        assert scrape(d)  # /metrics still renders
    by_id = {v["frame_id"]: v for v in got}
    assert len(got) == 13 and len(by_id) == 13
    assert (by_id["bad-1"]["decision"], by_id["bad-1"]["reason"]) == ("RECHECK", protocol.GARBAGE_HEADER)
    assert all(by_id[i]["decision"] in ("PASS", "REJECT") for i in range(12)), got


# -- 2. multipart memory bomb ------------------------------------------------------------------


def test_many_part_messages_are_refused_with_a_readable_frame_id(model):
    """Passes on the old code too: libzmq assembles a whole multipart message before handing
    over its first part, so the peak is inside libzmq either way (bounded per part by
    ZMQ_MAXMSGSIZE); the daemon now reads it part by part and keeps none past the bounds."""
    big = bytes(256 << 10)
    with running(model, sockets={"max_message_bytes": 1 << 20}) as d:
        raw = Raw(d.endpoints["frames"])
        raw.send(header("c", "many-small"), *([b"x"] * 500))
        raw.send(header("c", "few-large"), *([big] * 12))
        raw.send(header("c", "ok"), _png(2))
        got = {v["frame_id"]: v for v in raw.recv_n(3)}
        raw.close()
        m = scrape(d)
    assert got["many-small"]["reason"] == protocol.WRONG_FRAME_COUNT
    assert got["few-large"]["reason"] == protocol.OVERSIZE
    assert got["ok"]["decision"] in ("PASS", "REJECT")
    assert m[("nexedge_recheck_total", (("reason", protocol.OVERSIZE),))] == 1


# -- 3. decompression bombs and deadlines at every stage --------------------------------------


@pytest.fixture(scope="module")
def png_bomb():
    """A real 7000 x 7000 16-bit RGBA PNG of zeros: ~380 KB that decodes to 392 MB."""
    row = bytes(1 + 7000 * 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(7000)) + z.flush()
    return png_header(7000, 7000, depth=16, color=6, idat=idat)


def test_png_bomb_is_refused_before_decoding_and_other_cameras_stay_on_time(model, png_bomb):
    png = _png(3)
    with running(model, sockets={"decode_workers": 1}, batching={"deadline_ms": 2000}) as d:
        raw = Raw(d.endpoints["frames"])
        for i in range(4):
            raw.send(header("attacker", f"bomb{i}"), png_bomb)
            raw.send(header("line", i), png)
        got = {v["frame_id"]: v for v in raw.recv_n(8, 60)}
        raw.close()
    for i in range(4):
        assert got[f"bomb{i}"]["reason"] == protocol.TOO_MANY_PIXELS
        assert got[i]["decision"] in ("PASS", "REJECT") and got[i]["latency_ms"] < 2000, got[i]


def _slow_decode_png(min_total_s=2.0):
    """(PNG bytes, how many of them keep one decode thread busy for >= ``min_total_s``, their decode time)."""
    big = cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (2500, 2500), np.uint8))[1].tobytes()
    t0 = time.monotonic()
    cv2.imdecode(np.frombuffer(big, np.uint8), cv2.IMREAD_UNCHANGED)
    one = max(time.monotonic() - t0, 0.02)
    n = min(int(min_total_s / one) + 1, 40)
    return big, n, n * one


def test_frame_waiting_for_a_decode_thread_is_answered_at_its_deadline(model):
    big, n, busy_s = _slow_decode_png()
    with running(model, sockets={"decode_workers": 1}, batching={"max_queue": 64}) as d:
        raw = Raw(d.endpoints["frames"])
        for i in range(n):  # keep the one decode thread busy for busy_s seconds (the same camera: cameras
            raw.send(header("line", f"big{i}"), big)  # take turns, so another camera's frame would not wait)
        raw.send(header("line", "urgent", deadline_ms=100), _png(4))
        got = {v["frame_id"]: v for v in raw.recv_n(n + 1, 120)}
        raw.close()
    urgent = got["urgent"]
    assert (urgent["decision"], urgent["reason"]) == ("RECHECK", protocol.DEADLINE_PASSED)
    # at its deadline, not after the decodes queued before it (the old code: after all of them)
    assert urgent["latency_ms"] < min(1000.0, busy_s * 1000 / 2), (urgent, busy_s)


# -- 4. JPEG size read past filler segments ---------------------------------------------------


def test_jpeg_frame_header_is_found_behind_large_app_segments(model):
    jpg = cv2.imencode(".jpg", np.zeros((3000, 4000), np.uint8))[1].tobytes()
    filler = b"\xff\xe1" + (65533).to_bytes(2, "big") + bytes(65531)  # two maximal APP1 segments
    padded = jpg[:2] + filler + filler + jpg[2:]
    assert image_dims(padded, "jpeg") == (3000, 4000)
    with running(model, sockets={"max_pixels": 1_000_000}) as d:
        raw = Raw(d.endpoints["frames"])
        raw.send(header("c", "padded", "jpeg"), padded)
        v = raw.recv(20000)
        raw.close()
    assert v["reason"] == protocol.TOO_MANY_PIXELS


# -- 5. bounded cameras in the shift monitor and its gauges (issue 14 item 5) -----------------


def _card_with_references(model):
    from nexedge.card import card_path_for

    path = card_path_for(model)
    with open(path) as f:
        card = json.load(f)
    edges = list(np.linspace(0, 1, 11))
    card["val_scores"] = {"edges": edges, "good": [30] * 10, "defect": [15] * 10}  # = n_good, n_defects
    card["image_stats"] = {k: {"mean": 0.5, "std": 0.1} for k in ("brightness", "contrast", "sharpness")}
    with open(path, "w") as f:
        json.dump(card, f)


def test_monitor_bounds_cameras_and_exports_its_values(tmp_path):
    model = build_tiny_onnx(str(tmp_path))
    _card_with_references(model)
    png = _png(5)
    with running(model, sockets={"max_cameras": 4},
                 monitor={"window": 10, "min_frames": 2}) as d:
        raw = Raw(d.endpoints["frames"])
        for i in range(60):
            raw.send(header(f"cam{i % 30}", i), png)
        assert len(raw.recv_n(60)) == 60
        raw.close()
        m = scrape(d)
        assert len(d.monitor._cams) <= 5
    cams = {dict(k[1])["camera"] for k in m if k[0] == "nexedge_monitor_psi"}
    assert cams and len(cams) <= 5 and "_other" in cams
    for name in ("psi", "brightness", "contrast", "sharpness", "uncertain_frac"):
        assert ("nexedge_monitor_" + name, (("camera", "cam0"),)) in m, name
    assert m[("nexedge_monitor_other_frames_total", ())] > 0
    series = [k for k in m if k[0].startswith("nexedge_monitor")]
    assert len(series) < 100


# -- 6. RECHECK sampling: rate-limited, deduplicated, bounded by bytes -------------------------


def test_recheck_samples_are_rate_limited_and_deduplicated(model, tmp_path):
    from nexedge.store import SampleStore

    store = str(tmp_path / "store")
    imgs = [_png(100 + i, (64, 64)) for i in range(20)]
    with running(model, batching={"max_batch": 4, "max_queue": 4, "max_delay_ms": 50},
                 store={"path": store, "recheck_per_minute": 3}, uncertain={"band": 0.0, "audit_fraction": 0.0}) as d:
        raw = Raw(d.endpoints["frames"])
        for i in range(400):  # far more than max_queue: most get queue_full
            raw.send(header("flood", i), imgs[i % 20])
        got = raw.recv_n(400, 60)
        raw.close()
    assert sum(v["reason"] == protocol.QUEUE_FULL for v in got) > 100
    with SampleStore(store, writer=False) as st:
        rows = st.query(pending_only=False)
    assert len(rows) <= 3  # one minute's budget for one camera
    assert len({r["sha256"] for r in rows}) == len(rows)


def test_sample_queue_is_bounded_by_bytes(tmp_path):
    from nexedge.serve.prometheus import DaemonMetrics
    from nexedge.serve.sampler import Sampler

    class SlowStore:
        def __init__(self):
            self.gate = threading.Event()

        def add(self, data, ext, meta):
            self.gate.wait(10)
            return 1

        def close(self):
            pass

    store, m = SlowStore(), DaemonMetrics()
    s = Sampler(store, m, max_queue=512, max_queue_bytes=4 << 20)
    accepted = sum(s.submit(bytes(1 << 20), "png", {"camera": "c", "kind": "band"}) for _ in range(50))
    assert accepted <= 5 and s.queued_bytes <= 4 << 20
    store.gate.set()
    s.close(5)


# -- 7. deeply nested headers, also during drain ----------------------------------------------


class SlowBackend(FailingBackend):
    """The real ORT backend, delayed (to hold a drain open)."""

    delay = 0.0

    def infer(self, images):
        time.sleep(self.delay)
        return super().infer(images)


def test_deeply_nested_header_gets_one_reply_even_during_drain(model):
    deep = b'{"v": 1, "camera": "c", "frame_id": 1, "x": ' + b"[" * 50000 + b"]" * 50000 + b"}"
    sb = SlowBackend(open_backend(model, intra_threads=1))
    with running(model, backend=sb, sockets={"max_header_bytes": 1 << 20}) as d:
        raw = Raw(d.endpoints["frames"])
        raw.send(deep, b"x")
        v = raw.recv()
        assert v is not None and (v["decision"], v["reason"]) == ("RECHECK", protocol.GARBAGE_HEADER)
        sb.delay = 1.0
        raw.send(header("c", "slow"), _png(6))
        time.sleep(0.3)
        d.request_stop()  # drains while the slow batch runs
        time.sleep(0.2)
        raw.send(deep, b"x")
        got = raw.recv_n(2, 10)
        raw.close()
    assert sorted(v["reason"] for v in got if v["frame_id"] is None) in ([protocol.GARBAGE_HEADER], [protocol.SHUTTING_DOWN])
    assert [v["decision"] for v in got if v["frame_id"] == "slow"] in (["PASS"], ["REJECT"])


# -- 12. metrics HTTP: bounded connections, timeouts ------------------------------------------


def test_idle_http_connections_are_bounded_and_time_out(model):
    with running(model, metrics={"max_connections": 4, "timeout_s": 0.5}) as d:
        before = threading.active_count()
        conns = [socket.create_connection(("127.0.0.1", d.metrics_port)) for _ in range(100)]
        time.sleep(0.3)
        during = threading.active_count()
        time.sleep(1.0)  # past timeout_s: the idle ones are dropped
        body = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/ready", timeout=5).read()
        for c in conns:
            c.close()
    assert during - before <= 1, (before, during)  # one thread serves every connection
    assert body == b"ready\n"


# -- 13. protocol strictness ------------------------------------------------------------------


@pytest.mark.parametrize("hdr,reason,fid", [
    (b'{"v": true, "camera": "c", "frame_id": 1, "encoding": "png"}', protocol.UNSUPPORTED_VERSION, 1),
    (b'{"v": 1.0, "camera": "c", "frame_id": 2, "encoding": "png"}', protocol.UNSUPPORTED_VERSION, 2),
    (b'{"v": 1, "camera": "c\\u007f", "frame_id": 3, "encoding": "png"}', protocol.GARBAGE_HEADER, 3),
    (b'{"v": 1, "camera": "c\\u0085", "frame_id": 4, "encoding": "png"}', protocol.GARBAGE_HEADER, 4),
    (b'{"v": 1, "camera": 12, "frame_id": 5, "encoding": "png"}', protocol.GARBAGE_HEADER, 5),
    (b'{"v": 1, "camera": ["c"], "frame_id": "f6", "encoding": "png"}', protocol.GARBAGE_HEADER, "f6"),
    (b'{"v": 1, "camera": "c", "frame_id": true, "encoding": "png"}', protocol.GARBAGE_HEADER, None),
    (b'{"v": 1, "camera": "c", "frame_id": 99999999999999999999999, "encoding": "png"}', protocol.GARBAGE_HEADER,
     None),
    (b'{"msg": "c\\u2028|f9"}', protocol.GARBAGE_HEADER, "f9"),
])
def test_protocol_is_strict_and_errors_keep_a_readable_frame_id(model, hdr, reason, fid):
    with running(model) as d:
        raw = Raw(d.endpoints["frames"])
        raw.send(hdr, _png(7))
        v = raw.recv()
        raw.close()
    assert (v["decision"], v["reason"], v["frame_id"]) == ("RECHECK", reason, fid)


# -- 14. shutdown ----------------------------------------------------------------------------


def test_second_signal_is_logged_as_such_and_decode_waiters_are_answered_at_once(model, caplog):
    big, n, busy_s = _slow_decode_png(3.0)
    sb = SlowBackend(open_backend(model, intra_threads=1))
    caplog.set_level(logging.INFO, logger="nexedge.serve")
    with running(model, backend=sb, sockets={"decode_workers": 1}, shutdown={"timeout_s": 30},
                 batching={"max_queue": 64}) as d:
        raw = Raw(d.endpoints["frames"])
        sb.delay = 5.0
        raw.send(header("c", "inflight"), _png(8))
        time.sleep(0.3)
        for i in range(n):
            raw.send(header("c", f"big{i}"), big)
        for i in range(3):
            raw.send(header("c", f"wait{i}"), _png(9 + i))
        time.sleep(0.2)
        t0 = time.monotonic()
        d.request_stop()
        got = raw.recv_n(n + 3, busy_s / 2)
        t_waiters = time.monotonic() - t0
        d.request_stop()  # second signal
        got += raw.recv_n(1, 10)
        raw.close()
    ids = {v["frame_id"]: v for v in got}
    for i in range(3):  # answered at once, not after the decodes before them (busy_s)
        assert ids[f"wait{i}"]["reason"] == protocol.SHUTTING_DOWN
    assert t_waiters < busy_s / 2, (t_waiters, busy_s)
    assert ids["inflight"]["reason"] == protocol.SHUTTING_DOWN
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "drain timed out after 30" not in text
    assert "second stop signal" in text


# -- 15. exceptions after decode --------------------------------------------------------------


def test_exception_after_decode_is_answered_not_lost(model, monkeypatch):
    from nexedge import preprocess as pp

    def broken(_img):
        raise RuntimeError("injected image_stats failure")

    with running(model, monitor={"window": 10, "min_frames": 2}) as d:
        monkeypatch.setattr(pp, "image_stats", broken)
        with CameraClient(d.endpoints["frames"], "c") as cam:
            v = cam.wait_for(cam.send(_png(10), deadline_ms=3000), 2000)
    assert v is not None and (v["decision"], v["reason"]) == ("RECHECK", protocol.BACKEND_ERROR)


# -- 11. key files ---------------------------------------------------------------------------


def test_secret_key_file_is_never_readable_by_others(tmp_path, monkeypatch):
    from nexedge.serve.auth import load_secret, make_keypair

    seen = []
    real_chmod = os.chmod

    def spy(path, mode, *a, **kw):  # the old code chmod-ed after writing: record what others could see
        seen.append(stat.S_IMODE(os.stat(path).st_mode))
        return real_chmod(path, mode, *a, **kw)

    monkeypatch.setattr(os, "chmod", spy)
    old = os.umask(0o022)
    try:
        public, secret = make_keypair(str(tmp_path / "keys"), "cam")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert all(mode & 0o077 == 0 for mode in seen), [oct(m) for m in seen]
    load_secret(secret)
    real_chmod(secret, 0o644)
    with pytest.raises(ValueError, match="other users can read"):
        load_secret(secret)


def test_metrics_on_a_non_loopback_address_warns(caplog):
    from nexedge.serve.prometheus import DaemonMetrics, HealthServer

    caplog.set_level(logging.WARNING, logger="nexedge.serve")
    srv = HealthServer(DaemonMetrics(), "0.0.0.0", 0, lambda: True, lambda: True)
    srv.stop()
    assert any("not loopback" in r.getMessage() and "reverse proxy" in r.getMessage() for r in caplog.records)
    caplog.clear()
    HealthServer(DaemonMetrics(), "127.0.0.1", 0, lambda: True, lambda: True).stop()
    assert not caplog.records
