"""Issue 13 fuzz test: 10,000+ malformed and hostile messages of every known shape (seeded,
tests/support/hostile.py) against a real nexedge-daemon process over loopback TCP.

Asserts: every message gets exactly one reply, carrying its frame id when it has a readable
one; no PASS without a score (a device that was not inspected is never passed); the well-formed
camera between the attackers is inspected; the daemon stays up, /metrics and /ready answer
throughout; RSS stays under a bound; SIGTERM still drains to exit 0.
"""

import json
import os
import time

import cv2
import numpy as np
import pytest
import zmq

from tests.support.daemon import build_tiny_onnx
from tests.support.daemon_proc import DaemonProc
from tests.support.hostile import Hostile

N_HOSTILE = 10_000
CLIENTS = 4
WINDOW = 32  # messages in flight per client
RSS_BOUND = 600 << 20
MAX_MSG = 256 << 10


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_onnx(str(tmp_path_factory.mktemp("model")))


def test_fuzz_10k_hostile_messages_against_a_real_daemon(model, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p))
    raw = {
        "model": {"path": model, "warmup": 1, "options": {"intra_threads": 1}},
        "sockets": {"frames": "tcp://127.0.0.1:*", "verdicts": "tcp://127.0.0.1:*", "decode_workers": 1,
                    "max_message_bytes": MAX_MSG, "max_cameras": 16},
        "batching": {"max_batch": 8, "max_delay_ms": 5, "max_queue": 64, "deadline_ms": 5000},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "store": {"path": str(tmp_path / "store"), "quota": "20MB"},
        "monitor": {"window": 50, "min_frames": 10},
    }
    good_png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (48, 64), np.uint8))[1].tobytes()
    d = DaemonProc(raw, env=env).wait_ready()
    t0 = time.monotonic()
    ctx = zmq.Context()
    socks = []
    for _ in range(CLIENTS + 1):  # the last one is a well-formed line camera
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(d.frames)
        socks.append(s)
    gens = [Hostile(1000 + i, good_png, MAX_MSG) for i in range(CLIENTS)]
    expect = [dict() for _ in socks]  # frame id -> replies seen (ids are unique per client)
    null_sent = [0] * len(socks)
    null_got = [0] * len(socks)
    outstanding = [0] * len(socks)
    replies = []
    sent = seq = good_seq = 0
    health = []
    next_health = 2000
    try:
        while True:
            for i, s in enumerate(socks):
                while outstanding[i] < WINDOW:
                    if i < CLIENTS:
                        if sent >= N_HOSTILE:
                            break
                        parts, fid = gens[i].next(seq)
                        seq += 1
                        sent += 1
                    else:
                        if sent >= N_HOSTILE:
                            break
                        fid = f"good{good_seq}"
                        good_seq += 1
                        parts = [json.dumps({"v": 1, "camera": "line", "frame_id": fid, "encoding": "png"}).encode(),
                                 good_png]
                    s.send_multipart([b""] + parts)
                    outstanding[i] += 1
                    if fid is None:
                        null_sent[i] += 1
                    else:
                        assert fid not in expect[i]
                        expect[i][fid] = 0
            busy = False
            for i, s in enumerate(socks):
                while s.poll(0):
                    busy = True
                    v = json.loads(s.recv_multipart()[-1])
                    outstanding[i] -= 1
                    replies.append((i, v))
                    fid = v.get("frame_id")
                    if fid is None:
                        null_got[i] += 1
                    else:
                        assert fid in expect[i], (i, v)
                        expect[i][fid] += 1
            if sent >= next_health:
                health.append((d.http("/metrics"), d.http("/ready"), d.status()["rss"]))
                next_health += 2000
            if sent >= N_HOSTILE and not any(outstanding):
                break
            if not busy:
                if time.monotonic() - t0 > 240:
                    break
                socks[0].poll(5)
            assert d.proc.poll() is None, "daemon died:\n" + d.log()[-3000:]
        elapsed = time.monotonic() - t0
        final_health = (d.http("/metrics"), d.http("/ready"))
        st = d.status()
        metrics = d.metrics_text()
    finally:
        for s in socks:
            s.close()
        ctx.term()
        code = d.stop()
    missing = {i: [f for f, n in e.items() if n == 0][:5] for i, e in enumerate(expect) if any(n == 0 for n in e.values())}
    dup = {i: [f for f, n in e.items() if n > 1][:5] for i, e in enumerate(expect) if any(n > 1 for n in e.values())}
    assert not missing, f"frames without a reply: {missing}"
    assert not dup, f"frames with more than one reply: {dup}"
    assert null_got == null_sent
    assert not [v for _, v in replies if v["decision"] == "PASS" and v.get("score") is None]
    good = [v for i, v in replies if i == CLIENTS]
    assert sum(v["decision"] in ("PASS", "REJECT") for v in good) >= len(good) // 2  # the line is inspected
    assert all(h[0] == 200 and h[1] == 200 for h in health) and final_health == (200, 200), health
    assert st["hwm"] < RSS_BOUND, f"peak RSS {st['hwm'] >> 20} MB"
    assert st["threads"] < 40 and "nexedge_frames_received_total" in metrics
    series = [ln for ln in metrics.splitlines() if ln.startswith("nexedge_frames_received_total{")]
    assert len(series) <= 16 + 2  # max_cameras plus _other and _unknown
    assert code == 0, d.log()[-2000:]
    assert elapsed < 180, f"fuzz took {elapsed:.0f} s"
    print(f"fuzz: {sent} hostile + {good_seq} good messages, {len(replies)} replies in {elapsed:.1f} s; "
          f"peak RSS {st['hwm'] >> 20} MB; threads {st['threads']}")
