"""Daemon building blocks without sockets: protocol parsing, decoding, config, decisions, batching, sd_notify."""

import json
import os
import socket
import threading
import time
import zlib

import cv2
import numpy as np
import pytest

from nexedge.card import CardError, ModelCard
from nexedge.metrics import logit_exact as logit
from nexedge.serve import config as serve_config
from nexedge.serve import notify, protocol
from nexedge.serve.batcher import Batcher
from nexedge.serve.decide import Decider
from nexedge.serve.decode import decode, image_dims, sniff
from tests.support.daemon import png_header


def _parse(frames):
    env, body = protocol.split_envelope(frames)
    return protocol.parse_body(env, body, protocol.SeqCounter())


def _reason(frames):
    with pytest.raises(protocol.ProtocolError) as ei:
        req = _parse(frames)
        decode(req, 10_000_000)
    return ei.value.reason


# -- protocol ---------------------------------------------------------------
def test_native_header_roundtrip_and_envelopes():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    h = protocol.native_header("cam1", 7, "raw", "uint8", arr.shape, ts=1.5)
    req = _parse([b"id", b"", h, arr.tobytes()])
    assert req.envelope == [b"id", b""] and req.kind == "native"
    assert (req.camera, req.frame_id, req.encoding, req.shape, req.ts) == ("cam1", 7, "raw", (3, 4), 1.5)
    assert np.array_equal(decode(req, 100), arr)
    # DEALER without the empty delimiter: reply envelope is just the identity
    req2 = _parse([b"id", h, arr.tobytes()])
    assert req2.envelope == [b"id"]


def test_imagezmq_headers_raw_and_jpg():
    arr = np.full((5, 6, 3), 9, np.uint8)
    h = json.dumps({"msg": "line3-cam", "dtype": "uint8", "shape": [5, 6, 3]}).encode()
    seq = protocol.SeqCounter()
    env, body = protocol.split_envelope([b"id", b"", h, arr.tobytes()])
    a = protocol.parse_body(env, body, seq)
    b = protocol.parse_body(env, body, seq)
    assert (a.kind, a.camera, a.frame_id, b.frame_id) == ("imagezmq", "line3-cam", 1, 2)
    ok, jpg = cv2.imencode(".jpg", arr)
    j = _parse([b"id", b"", json.dumps({"msg": "cam9|frame-42"}).encode(), jpg.tobytes()])
    assert (j.camera, j.frame_id, j.encoding) == ("cam9", "frame-42", "auto")
    assert decode(j, 100).shape == (5, 6, 3)


@pytest.mark.parametrize("frames, reason", [
    ([b"i", b"", b"{not json", b"x"], protocol.GARBAGE_HEADER),
    ([b"i", b"", b"[1,2]", b"x"], protocol.GARBAGE_HEADER),
    ([b"i", b"", b'{"x": 1}', b"x"], protocol.GARBAGE_HEADER),
    ([b"i", b"", protocol.native_header("c", 1, "png")], protocol.WRONG_FRAME_COUNT),
    ([b"i", b"", protocol.native_header("c", 1, "png"), b"a", b"b"], protocol.WRONG_FRAME_COUNT),
    ([b"i", b"", b'{"v": 2, "camera": "c", "frame_id": 1}', b"x"], protocol.UNSUPPORTED_VERSION),
    ([b"i", b"", b'{"v": 1, "camera": "c", "frame_id": 1, "encoding": "webp"}', b"x"], protocol.UNKNOWN_ENCODING),
    ([b"i", b"", protocol.native_header("c", 1, "raw", "float32", (2, 2)), bytes(16)], protocol.BAD_DTYPE),
    ([b"i", b"", protocol.native_header("c", 1, "raw", "uint8", (4, 4)), bytes(15)], protocol.BAD_SHAPE),
    ([b"i", b"", protocol.native_header("c", 1, "raw", "uint8", (2, 2, 5)), bytes(20)], protocol.BAD_SHAPE),
    ([b"i", b"", protocol.native_header("c", 1, "raw", "uint8", (0, 4)), b""], protocol.EMPTY_IMAGE),
    ([b"i", b"", protocol.native_header("c", 1, "png"), b""], protocol.EMPTY_IMAGE),
    ([b"i", b"", protocol.native_header("c", 1, "png"), b"\x89PNG\r\n\x1a\n" + bytes(8) + bytes([0, 0, 0, 1] * 2) + bytes(40)],
     protocol.UNDECODABLE),
    ([b"i", b"", protocol.native_header("c", 1, "png"), b"\x89PNG\r\n\x1a\n" + bytes(40)], protocol.UNDECODABLE),
    ([b"i", b"", protocol.native_header("c", 1, "png"), png_header(0, 5)], protocol.EMPTY_IMAGE),
    ([b"i", b"", protocol.native_header("c", 1, "jpeg"), b"hello world"], protocol.UNDECODABLE),
    ([b"i", b"", protocol.native_header("", 1, "png"), b"x"], protocol.GARBAGE_HEADER),
])
def test_bad_messages_name_their_reason(frames, reason):
    assert _reason(frames) == reason


def test_oversized_dimensions_refused_before_decoding():
    ok, png = cv2.imencode(".png", np.zeros((20, 30), np.uint8))
    data = bytearray(png.tobytes())
    assert sniff(bytes(data)) == "png" and image_dims(bytes(data), "png") == (20, 30)
    data[16:24] = (100000).to_bytes(4, "big") * 2  # header claims 100000 x 100000 (with a valid CRC)
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    req = _parse([b"i", b"", protocol.native_header("c", 1, "png"), bytes(data)])
    with pytest.raises(protocol.ProtocolError) as ei:
        decode(req, 50_000_000)
    assert ei.value.reason == protocol.TOO_MANY_PIXELS


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp"])
def test_image_dims_from_headers(ext):
    ok, buf = cv2.imencode(ext, np.zeros((37, 53, 3), np.uint8))
    data = buf.tobytes()
    fmt = sniff(data)
    assert image_dims(data, fmt) == (37, 53)


def test_verdict_json_fields():
    v = protocol.verdict("cam", 3, "PASS", 0.1234567, 0.5, False, "", "m@1", 2.5)
    d = json.loads(protocol.encode_verdict(v))
    assert set(d) == {"v", "frame_id", "camera", "decision", "score", "threshold", "uncertain", "reason",
                      "model_id", "latency_ms"}


# -- config -----------------------------------------------------------------
def test_config_defaults_and_optional_sections(tmp_path):
    p = tmp_path / "line.yaml"
    p.write_text("model: {path: m.onnx}\nstore: {path: /tmp/s, quota: 2GiB}\n")
    cfg = serve_config.load(str(p))
    assert cfg.model.path == str(tmp_path / "m.onnx")
    assert cfg.batching.max_batch == 8 and cfg.decision.target_tpr is None
    assert cfg.store is not None and serve_config.parse_size(cfg.store.quota, "q") == 2 << 30
    assert cfg.monitor is None and cfg.pull is None and cfg.auth is None


@pytest.mark.parametrize("raw, words", [
    ({"model": {"path": "m.onnx"}, "batching": {"max_batch": "8"}}, ["batching.max_batch", "integer", "'8'"]),
    ({"model": {"path": "m.onnx"}, "batching": {"max_btch": 8}}, ["batching.max_btch", "unknown", "max_batch"]),
    ({"model": {"path": "m.onnx"}, "decison": {}}, ["decison", "unknown section"]),
    ({"model": {}}, ["model.path", "missing"]),
    ({"model": {"path": "m"}, "decision": {"threshold": 0.3, "target_tpr": 1.0}}, ["either threshold or target_tpr"]),
    ({"model": {"path": "m"}, "batching": {"max_queue": 2, "max_batch": 8}}, ["max_queue", "max_batch"]),
    ({"model": {"path": "m"}, "sockets": {"frames": "localhost:5555"}}, ["sockets.frames", "tcp://"]),
    ({"model": {"path": "m"}, "store": {"path": "s", "quota": "lots"}}, ["store.quota", "'lots'"]),
    ({"model": {"path": "m"}, "uncertain": {"audit_fraction": 2}}, ["uncertain.audit_fraction", "[0, 1]"]),
])
def test_config_errors_name_key_value_expected(raw, words):
    with pytest.raises(serve_config.ConfigError) as ei:
        serve_config.from_dict(raw)
    for w in words:
        assert w in str(ei.value)


def test_cli_overrides():
    raw = serve_config.apply_overrides({"model": {"path": "a"}}, [serve_config.parse_set("batching.max_batch=16"),
                                                      ("model.path", "b.onnx")])
    cfg = serve_config.from_dict(raw)
    assert cfg.batching.max_batch == 16 and cfg.model.path == "b.onnx"
    with pytest.raises(serve_config.ConfigError):
        serve_config.parse_set("no-equals-sign")


# -- decisions --------------------------------------------------------------
def _card():
    card = ModelCard.new(["good", "bad"], kind="onnx")
    card.data["operating_points"] = [{"target_tpr": 1.0, "threshold": 0.2, "tpr_lower95": 0.98},
                                     {"target_tpr": 0.995, "threshold": 0.4, "tpr_lower95": 0.97}]
    return card


def test_threshold_from_card_explicit_and_missing():
    d = Decider(_card(), serve_config.DecisionCfg(), serve_config.UncertainCfg())
    assert d.threshold == 0.2 and d.info["source"] == "card" and d.info["tpr_lower95"] == 0.98
    d = Decider(_card(), serve_config.DecisionCfg(target_tpr=99.5), serve_config.UncertainCfg())
    assert d.threshold == 0.4
    d = Decider(_card(), serve_config.DecisionCfg(threshold=0.7), serve_config.UncertainCfg())
    assert d.threshold == 0.7 and d.info["source"] == "explicit"
    with pytest.raises(CardError, match="0.9"):
        Decider(_card(), serve_config.DecisionCfg(target_tpr=0.9), serve_config.UncertainCfg())


def test_decide_band_and_audit():
    d = Decider(_card(), serve_config.DecisionCfg(threshold=0.5), serve_config.UncertainCfg(band=1.0, audit_fraction=0.25, seed=1))
    assert d.decide(0.5) == ("REJECT", True)
    assert d.decide(0.49) == ("PASS", True)
    assert d.decide(0.72) == ("REJECT", True)  # logit(0.72) = 0.94 <= 1.0
    assert d.decide(0.75) == ("REJECT", False)  # logit(0.75) = 1.10
    assert d.decide(0.0) == ("PASS", False) and d.decide(1.0) == ("REJECT", False)
    assert abs(logit(0.5)) < 1e-12
    draws = sum(d.audit() for _ in range(4000))
    assert 850 < draws < 1150
    assert not any(d.audit(0.0) for _ in range(100))


# -- batching ---------------------------------------------------------------
class _Item:
    def __init__(self, deadline=1e18):
        self.deadline = deadline
        self.t_queued = 0.0


def test_batch_closes_at_max_batch_immediately():
    b = Batcher(max_batch=4, max_delay_s=10.0, max_queue=8)
    for _ in range(6):
        assert b.put(_Item())
    t0 = time.monotonic()
    batch, expired = b.next_batch(timeout=1.0)
    assert len(batch) == 4 and not expired and time.monotonic() - t0 < 0.5


def test_batch_closes_after_max_delay_from_first_frame():
    b = Batcher(max_batch=8, max_delay_s=0.05, max_queue=8)
    b.put(_Item())
    t0 = time.monotonic()
    batch, _ = b.next_batch(timeout=1.0)
    dt = time.monotonic() - t0
    assert len(batch) == 1 and 0.04 <= dt < 0.5


def test_batch_wakes_when_frames_arrive_while_waiting():
    b = Batcher(max_batch=3, max_delay_s=5.0, max_queue=8)
    threading.Timer(0.05, lambda: [b.put(_Item()) for _ in range(3)]).start()
    t0 = time.monotonic()
    batch, _ = b.next_batch(timeout=2.0)
    assert len(batch) == 3 and time.monotonic() - t0 < 1.0


def test_queue_bounded_and_expiry_and_close():
    b = Batcher(max_batch=2, max_delay_s=1.0, max_queue=3)
    now = time.monotonic()
    assert b.put(_Item(now - 1)) and b.put(_Item()) and b.put(_Item())
    assert not b.put(_Item())  # full: the caller answers RECHECK queue_full
    batch, expired = b.next_batch(timeout=0.1)
    assert batch == [] and len(expired) == 1
    assert len(b.close()) == 2 and not b.put(_Item()) and b.closed
    assert b.next_batch(timeout=0.1) == ([], [])


# -- sd_notify ----------------------------------------------------------------
def test_sd_notify_and_watchdog_over_a_real_unix_datagram_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(2)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert notify.notify("READY=1")
        assert srv.recv(100) == b"READY=1"
        wd = notify.Watchdog()
        assert wd.interval == pytest.approx(0.1)
        wd.tick(10.0, healthy=False)
        wd.tick(10.0, healthy=True)
        assert srv.recv(100) == b"WATCHDOG=1"
        wd.tick(10.05, healthy=True)  # too soon: no second ping
        srv.settimeout(0.1)
        with pytest.raises(socket.timeout):
            srv.recv(100)
    finally:
        srv.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify.notify("READY=1")


# -- shipped files ------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_example_config_validates_and_packaged_copy_matches():
    path = os.path.join(ROOT, "deploy", "line.example.yaml")
    cfg = serve_config.load(path)
    assert cfg.store is not None and cfg.monitor is not None and cfg.pull is not None and cfg.auth is None
    assert cfg.decision.target_tpr == 1.0 and cfg.batching.max_batch == 8
    with open(path, "rb") as a, open(os.path.join(ROOT, "nexedge", "serve", "line.example.yaml"), "rb") as b:
        assert a.read() == b.read()


def test_systemd_unit_is_notify_with_watchdog_and_restart():
    with open(os.path.join(ROOT, "deploy", "nexedge-daemon.service")) as f:
        lines = {ln.split("=", 1)[0]: ln.split("=", 1)[1].strip() for ln in f if "=" in ln and not ln.startswith("#")}
    assert lines["Type"] == "notify" and lines["Restart"] == "on-failure"
    assert int(lines["WatchdogSec"]) > 0 and "nexedge-daemon --config" in lines["ExecStart"]


def test_json_log_lines_carry_fields():
    import logging

    from nexedge.serve.logjson import JsonFormatter

    rec = logging.LogRecord("nexedge.serve", logging.WARNING, __file__, 1, "bad frame %s", ("x",), None)
    rec.fields = {"reason": "oversize", "camera": "c1"}
    d = json.loads(JsonFormatter().format(rec))
    assert d["msg"] == "bad frame x" and d["level"] == "WARNING" and d["reason"] == "oversize" and "ts" in d


# -- robustness -----------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_header = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(
        st.sampled_from(["v", "camera", "frame_id", "encoding", "dtype", "shape", "msg", "ts", "deadline_ms"]),
        st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=True),
                  st.text(max_size=8), st.lists(st.integers(-2, 40), max_size=4),
                  st.sampled_from(["raw", "png", "jpeg", "bmp", "uint8", "uint16", "float32"])),
        max_size=8)),
)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.one_of(_header, st.binary(max_size=300)), min_size=0, max_size=4), delim=st.booleans())
def test_parser_and_decoder_only_ever_raise_protocol_errors(frames, delim):
    msg = [b"peer"] + ([b""] if delim else []) + frames
    env, body = protocol.split_envelope(msg)
    try:
        req = protocol.parse_body(env, body, protocol.SeqCounter())
        decode(req, 1_000_000)
    except protocol.ProtocolError as e:
        assert e.reason in protocol.REASONS


def test_camera_label_cardinality_is_bounded():
    from nexedge.serve.prometheus import OTHER_CAMERA, DaemonMetrics

    m = DaemonMetrics(max_cameras=3)
    labels = [m.camera_label(f"cam{i}") for i in range(10)]
    assert labels[:3] == ["cam0", "cam1", "cam2"] and set(labels[3:]) == {OTHER_CAMERA}
    assert m.camera_label("cam1") == "cam1"
