"""The daemon over real loopback TCP with a real ONNX Runtime model, native and imagezmq clients."""

import json
import threading
import time
import urllib.request

import cv2
import imagezmq
import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from nexedge import preprocess as pp
from nexedge.runtime import open_backend
from nexedge.serve import config as serve_config
from nexedge.serve import protocol
from nexedge.serve.client import CameraClient, VerdictSubscriber
from nexedge.serve.daemon import Daemon
from tests.support.daemon import CLASSES, base_config, build_tiny_onnx, make_images, running


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_onnx(str(tmp_path_factory.mktemp("model")))




def scrape(d):
    body = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _img(seed, shape=(40, 52)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_concurrent_native_cameras_every_frame_one_verdict_matching_backend(model):
    ref = open_backend(model, intra_threads=1)
    images = [_img(i, (40 + i, 50, 3) if i % 2 else (44, 40 + i)) for i in range(6)]
    card_in = ref.card.input
    expected = ref.infer(np.stack([pp.prepare(im, card_in) for im in images])).defect_score
    n_cams, per_cam = 4, 15
    results = {}

    def camera(k, endpoint):
        with CameraClient(endpoint, f"cam{k}") as cam:
            sent = {}
            for i in range(per_cam):
                j = (i + k) % len(images)
                im = images[j]
                payload = im if i % 2 == 0 else cv2.imencode(".png", im)[1].tobytes()
                sent[cam.send(payload)] = j
            got = cam.drain(20000)
            results[k] = (sent, got)

    with running(model, batching={"max_queue": 128}) as d:
        sub = VerdictSubscriber(d.endpoints["verdicts"], cameras=["cam1"])
        time.sleep(0.2)  # let the subscription reach the PUB socket
        threads = [threading.Thread(target=camera, args=(k, d.endpoints["frames"])) for k in range(n_cams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        published = []
        while True:
            v = sub.recv(timeout_ms=500)
            if v is None:
                break
            published.append(v)
        sub.close()
        m = scrape(d)
    for k in range(n_cams):
        sent, got = results[k]
        ids = [v["frame_id"] for v in got]
        assert sorted(ids) == sorted(sent), f"cam{k}: frames in != verdicts out"
        for v in got:
            assert v["camera"] == f"cam{k}" and v["decision"] in ("PASS", "REJECT"), v
            assert v["score"] == pytest.approx(float(expected[sent[v["frame_id"]]]), abs=1e-4)
            assert v["decision"] == ("REJECT" if v["score"] >= v["threshold"] else "PASS")
            assert v["threshold"] == 0.5 and v["model_id"] == ref.card.model_id and v["latency_ms"] > 0
    assert sorted(v["frame_id"] for v in published) == sorted(results[1][0])
    assert all(v["camera"] == "cam1" for v in published)
    total = n_cams * per_cam
    for k in range(n_cams):
        assert m[("nexedge_frames_received_total", (("camera", f"cam{k}"),))] == per_cam
    verdicts = sum(v for (name, _), v in m.items() if name == "nexedge_verdicts_total")
    assert verdicts == total
    assert m[("nexedge_batch_size_sum", ())] == total
    assert m[("nexedge_stage_seconds_count", (("stage", "decode"),))] == total
    assert m[("nexedge_queue_wait_seconds_count", ())] == total
    assert m[("nexedge_end_to_end_seconds_count", ())] == total
    assert m[("nexedge_ready", ())] == 1.0


@pytest.mark.parametrize("jpg", [False, True])
def test_unmodified_imagezmq_sender(model, jpg):
    with running(model) as d:
        sender = imagezmq.ImageSender(connect_to=d.endpoints["frames"])
        sender.zmq_socket.setsockopt(zmq.RCVTIMEO, 10000)
        try:
            replies = []
            for i in range(5):
                im = _img(i, (48, 48, 3))
                if jpg:
                    reply = sender.send_jpg("line1-cam2", cv2.imencode(".jpg", im)[1].tobytes())
                else:
                    reply = sender.send_image(f"line1-cam2|f{i}", im)
                replies.append(json.loads(reply))
            # a bad frame from the same REQ client gets its RECHECK reply and the client carries on
            bad = json.loads(sender.send_image("line1-cam2", np.zeros((4, 4), np.float32)))
            after = json.loads(sender.send_image("line1-cam2", _img(9, (30, 30))))
        finally:
            sender.close()
    assert all(r["decision"] in ("PASS", "REJECT") and r["camera"] == "line1-cam2" for r in replies)
    assert [r["frame_id"] for r in replies] == ([1, 2, 3, 4, 5] if jpg else [f"f{i}" for i in range(5)])
    assert bad["decision"] == "RECHECK" and bad["reason"] == protocol.BAD_DTYPE
    assert after["decision"] in ("PASS", "REJECT")


def test_every_bad_input_gets_recheck_and_daemon_keeps_serving(model):
    good = _img(1)
    png = cv2.imencode(".png", good)[1].tobytes()
    hdr = protocol.native_header
    cases = [
        ([b"", b"{garbage", b"x"], protocol.GARBAGE_HEADER),
        ([b"", hdr("c", 1, "raw", "uint8", (40, 52)), good.tobytes()[:-7]], protocol.BAD_SHAPE),  # truncated
        ([b"", hdr("c", 2, "raw", "uint8", (40, 40)), good.tobytes()], protocol.BAD_SHAPE),  # shape mismatch
        ([b"", b'{"v":1,"camera":"c","frame_id":3,"encoding":"webp"}', png], protocol.UNKNOWN_ENCODING),
        ([b"", hdr("c", 4, "png")], protocol.WRONG_FRAME_COUNT),
        ([b"", hdr("c", 5, "png"), png, png], protocol.WRONG_FRAME_COUNT),
        ([b"", hdr("c", 6, "raw", "uint8", (1000, 1000)), bytes(1000 * 1000)], protocol.OVERSIZE),
        ([b"", hdr("c", 7, "png"), b""], protocol.EMPTY_IMAGE),
        ([b"", hdr("c", 8, "jpeg"), b"\xff\xd8\xff" + bytes(100)], protocol.UNDECODABLE),
        ([b"", hdr("c", 9, "raw", "uint8", (2, 2, 7)), bytes(28)], protocol.BAD_SHAPE),
        ([b"", hdr("c", 10, "raw", "int64", (2, 2)), bytes(32)], protocol.BAD_DTYPE),
        ([b"", b'{"v":9,"camera":"c","frame_id":11}', png], protocol.UNSUPPORTED_VERSION),
    ]
    with running(model, sockets={"max_message_bytes": 500_000}) as d:
        with CameraClient(d.endpoints["frames"], "c") as cam:
            for frames, reason in cases:
                cam.send_frames(frames)
                v = cam.recv(timeout_ms=5000)
                assert v is not None, f"no reply for {reason}"
                assert (v["decision"], v["reason"]) == ("RECHECK", reason), (frames[1][:60], v)
                assert v["score"] is None
                ok = cam.infer(png, timeout_ms=5000)
                assert ok["decision"] in ("PASS", "REJECT")
        m = scrape(d)
    for _, reason in cases:
        want = sum(1 for _, r in cases if r == reason)
        assert m[("nexedge_recheck_total", (("reason", reason),))] == want
    assert m[("nexedge_verdicts_total", (("decision", "RECHECK"),))] == len(cases)


def test_overload_answers_recheck_quickly_instead_of_queueing(model):
    im = _img(3, (64, 64))
    with running(model, batching={"max_batch": 4, "max_queue": 8, "max_delay_ms": 2}) as d:
        with CameraClient(d.endpoints["frames"], "flood") as cam:
            t0 = time.monotonic()
            for _ in range(400):
                cam.send(im)
            got = cam.drain(30000)
            elapsed = time.monotonic() - t0
    assert len(got) == 400 and len({v["frame_id"] for v in got}) == 400
    full = [v for v in got if v["decision"] == "RECHECK"]
    assert full and all(v["reason"] == protocol.QUEUE_FULL for v in full)
    assert sum(v["decision"] != "RECHECK" for v in got) >= 8
    # refused frames are answered at once, not after waiting behind the queue
    assert np.percentile([v["latency_ms"] for v in full], 95) < 250
    # accepted frames wait at most a bounded queue: max_queue / max_batch batches of inference
    inferred = [v["latency_ms"] for v in got if v["decision"] != "RECHECK"]
    assert max(inferred) < 2000 and elapsed < 30


def test_deadline_passed_gets_recheck(model):
    im = _img(4)
    with running(model, batching={"max_batch": 8, "max_delay_ms": 1000}) as d:
        with CameraClient(d.endpoints["frames"], "slowline") as cam:
            late = cam.wait_for(cam.send(im, deadline_ms=20), 5000)
            ok = cam.infer(im)
    assert (late["decision"], late["reason"]) == ("RECHECK", protocol.DEADLINE_PASSED)
    assert late["latency_ms"] < 800  # answered at its deadline, not when the batch closes (1 s)
    assert ok["decision"] in ("PASS", "REJECT")


class FailingBackend:
    """Fault injection around the real ORT backend: raises while ``fail`` is set."""

    def __init__(self, inner):
        self.inner, self.fail = inner, False
        for attr in ("card", "crops", "crop_mode", "max_batch", "input_shape", "name"):
            setattr(self, attr, getattr(inner, attr))

    def warmup(self, n=2):
        self.inner.warmup(n)

    def infer(self, images):
        if self.fail:
            raise RuntimeError("injected backend failure")
        return self.inner.infer(images)

    def close(self):
        self.inner.close()


def test_backend_error_gives_recheck_with_fault_injection(model):
    fb = FailingBackend(open_backend(model, intra_threads=1))
    with running(model, backend=fb) as d:
        with CameraClient(d.endpoints["frames"], "c") as cam:
            fb.fail = True
            bad = cam.infer(_img(5))
            fb.fail = False
            ok = cam.infer(_img(5))
    assert (bad["decision"], bad["reason"]) == ("RECHECK", protocol.BACKEND_ERROR)
    assert ok["decision"] in ("PASS", "REJECT")


def test_uncertain_and_recheck_frames_go_to_the_store(model, tmp_path):
    from nexedge.store import SampleStore

    store = str(tmp_path / "store")
    ims = [_img(i, (40, 40, 3)) for i in range(5)]
    with running(model, store={"path": store}, uncertain={"band": 50.0, "audit_fraction": 0.0}) as d:
        with CameraClient(d.endpoints["frames"], "camS") as cam:
            for im in ims:
                cam.infer(im)
            cam.infer(cv2.imencode(".jpg", ims[0])[1].tobytes())
            late = cam.wait_for(cam.send(ims[1], deadline_ms=0.001), 5000)
            cam.send_frames([b"", b"garbage", b"x"])
            cam.recv(5000)
    assert late["reason"] == protocol.DEADLINE_PASSED
    with SampleStore(store, writer=False) as s:
        rows = s.query(pending_only=False)
        kinds = sorted(r["kind"] for r in rows)
        assert kinds == ["band"] * 6 + ["recheck"]  # the garbage frame had no image to keep
        band = [r for r in rows if r["kind"] == "band"]
        assert {r["ext"] for r in band} == {"png", "jpg"}
        r0 = band[0]
        assert r0["camera"] == "camS" and set(r0["probs"]) == set(CLASSES) and r0["threshold"] == 0.5
        assert r0["decision"] in ("PASS", "REJECT") and r0["score"] is not None
        raw = cv2.imdecode(np.frombuffer(s.read_image(r0), np.uint8), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(raw, ims[0])  # raw frames are stored losslessly as PNG
        rc = [r for r in rows if r["kind"] == "recheck"][0]
        assert (rc["decision"], rc["reason"]) == ("RECHECK", protocol.DEADLINE_PASSED)


def test_health_endpoints_and_camera_sim(model, tmp_path, capsys):
    from nexedge.cli import main as nexedge_main

    folder = str(tmp_path / "imgs")
    make_images(folder, n=5)
    with running(model) as d:
        base = f"http://127.0.0.1:{d.metrics_port}"
        assert urllib.request.urlopen(base + "/live", timeout=5).status == 200
        assert urllib.request.urlopen(base + "/ready", timeout=5).status == 200
        rc = nexedge_main(["camera-sim", folder, "--connect", d.endpoints["frames"], "--cameras", "3",
                           "--frames", "6", "--rate", "50", "--json"])
        out = json.loads(capsys.readouterr().out)
        rc2 = nexedge_main(["camera-sim", folder, "--connect", d.endpoints["frames"], "--cameras", "2",
                            "--frames", "3", "--rate", "0", "--mode", "imagezmq-jpg"])
        text = capsys.readouterr().out
        m = scrape(d)
    assert rc == 0 and out["sent"] == out["received"] == 18 and out["lost"] == 0 and out["duplicates"] == 0
    assert out["latency_ms"]["p50"] > 0
    assert rc2 == 0 and "sent 6  received 6  lost 0" in text and "latency ms: p50" in text
    assert m[("nexedge_requests_total", (("kind", "native"),))] == 18
    assert m[("nexedge_requests_total", (("kind", "imagezmq"),))] == 6


def test_decode_on_the_io_thread(model):
    ims = [_img(i, (36, 36, 3)) for i in range(10)]
    with running(model, sockets={"decode_workers": 0}) as d:
        with CameraClient(d.endpoints["frames"], "inline") as cam:
            ids = [cam.send(im) for im in ims]
            got = cam.drain(10000)
    assert sorted(v["frame_id"] for v in got) == sorted(ids)
    assert all(v["decision"] in ("PASS", "REJECT") for v in got)


def test_uint16_and_bgra_frames_are_inspected_like_their_8bit_gray(model):
    im8 = _img(11, (40, 40))
    im16 = im8.astype(np.uint16) << 8 | 0x7F  # a 16-bit camera: same image in the high byte
    bgra = np.dstack([im8, im8, im8, np.full_like(im8, 255)])
    with running(model) as d:
        with CameraClient(d.endpoints["frames"], "c16") as cam:
            a, b, c = cam.infer(im8), cam.infer(im16), cam.infer(bgra)
    assert a["decision"] in ("PASS", "REJECT")
    assert b["score"] == pytest.approx(a["score"], abs=1e-5) and c["score"] == pytest.approx(a["score"], abs=1e-5)


def test_in_graph_tencrop_model(tmp_path):
    pytest.importorskip("torch")
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.toy import train_toy_checkpoint

    ck = train_toy_checkpoint(str(tmp_path / "toy.pt"), arch="tiny", steps=2, n_val=30,
                              inp={"color": "gray", "resize": [36, 36], "crop": [32, 32], "crop_mode": "ten"})
    onnx = export_onnx(ck, str(tmp_path / "toy.ten.onnx"), crops="ten", max_batch=8, parity_images=4).path
    ref = open_backend(onnx, intra_threads=1)
    assert ref.crops == "ten"
    ims = [_img(i, (50, 60, 3)) for i in range(5)]
    want = ref.infer(np.stack([pp.prepare(im, ref.card.input) for im in ims])).defect_score
    # exported without labelled data: its thresholds are the checkpoint's, which the daemon refuses unless told
    with running(onnx, decision={"target_tpr": 1.0, "allow_unmeasured": True}) as d:
        with CameraClient(d.endpoints["frames"], "g") as cam:
            got = [cam.infer(im) for im in ims]
    for v, w in zip(got, want):
        assert v["decision"] in ("PASS", "REJECT") and v["score"] == pytest.approx(float(w), abs=1e-4)


def test_address_in_use_is_a_clear_startup_error(model):
    with running(model) as d:
        taken = d.endpoints["frames"]
        other = Daemon(serve_config.from_dict(base_config(model, sockets={"frames": taken})))
        with pytest.raises(RuntimeError, match="sockets.frames"):
            other.setup()
        other.close_unserved()
        with CameraClient(taken, "still") as cam:  # the first daemon is unaffected
            assert cam.infer(_img(1))["decision"] in ("PASS", "REJECT")
