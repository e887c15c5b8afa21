"""Backends (torch, ONNX Runtime host crops, ONNX Runtime in-graph crops) agree; factory and errors."""

import subprocess
import sys

import numpy as np
import pytest

from nexedge.runtime import BackendError, open_backend
from nexedge.runtime.backends.onnxruntime import resolve_providers
from nexedge.runtime.factory import backend_kind

INP = {"color": "gray", "resize": [36, 36], "crop": [32, 32], "crop_mode": "five"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.toy import train_toy_checkpoint

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("be")
    ckpt = train_toy_checkpoint(str(d / "m.pt"), inp=dict(INP), steps=20)
    host = export_onnx(ckpt, crops="host", parity_images=2, threads=1, max_batch=6).path
    graph = export_onnx(ckpt, crops="five", parity_images=2, threads=1, max_batch=6).path
    return {"pt": ckpt, "host": host, "graph": graph}


def _images(n, seed=0):
    from nexedge.export.toy import toy_images

    return toy_images(n, {"color": "gray", "resize": [36, 36]}, seed=seed)[0]


def test_backends_agree(models):
    imgs = _images(6)
    results = {}
    for key in ("pt", "host", "graph"):
        with open_backend(models[key], **({"threads": 1} if key == "pt" else {"intra_threads": 1})) as be:
            results[key] = be.infer(imgs)
            assert set(results[key].timings) >= {"preprocess", "inference", "postprocess", "total"}
            assert be.k == 5
    ref = results["pt"]
    assert ref.probs.shape == (6, 3) and ref.defect_score.shape == (6,)
    np.testing.assert_allclose(ref.probs.sum(1), 1.0, atol=1e-5)
    for key in ("host", "graph"):
        np.testing.assert_allclose(results[key].probs, ref.probs, atol=1e-5)
        np.testing.assert_allclose(results[key].defect_score, 1 - ref.probs[:, 0], atol=1e-5)


def test_any_batch_up_to_max_and_errors(models):
    with open_backend(models["graph"], intra_threads=1) as be:
        assert be.max_batch == 6
        full = be.infer(_images(6, seed=4)).probs
        for n in (1, 3, 6):
            np.testing.assert_allclose(be.infer(_images(6, seed=4)[:n]).probs, full[:n], atol=1e-6)
        with pytest.raises(BackendError, match="1..6"):
            be.infer(_images(7))
        with pytest.raises(BackendError, match="does not match"):
            be.infer(np.zeros((2, 30, 36, 1), np.uint8))
        with pytest.raises(BackendError, match="uint8"):
            be.infer(np.zeros((2, 36, 36, 1), np.float32))
    with pytest.raises(BackendError, match="closed"):
        be.infer(_images(1))


def test_host_backend_crop_mode_override(models):
    with open_backend(models["host"], crop_mode="center", intra_threads=1) as be:
        assert be.k == 1
        assert be.infer(_images(2)).probs.shape == (2, 3)
    with pytest.raises(ValueError, match="only host-crop models"):
        open_backend(models["graph"], crop_mode="center")


def test_ort_session_spinning_off_and_threads(models):
    with open_backend(models["host"], intra_threads=1, inter_threads=1) as be:
        so = be.session.get_session_options()
        assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1
        assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert be.session.get_providers() == ["CPUExecutionProvider"]


def test_resolve_providers():
    avail = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, avail) == avail
    assert resolve_providers(None, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers("cuda", avail) == avail
    with pytest.raises(ValueError, match="'tensorrt' is not available here; available: CUDA"):
        resolve_providers("tensorrt", avail)


def test_factory_suffixes_and_errors(tmp_path):
    assert backend_kind("a/b.onnx") == "onnxruntime"
    assert backend_kind("x.fp16.b8.trt10.3.orin.engine") == "tensorrt"
    assert backend_kind("m.pt") == "torch"
    with pytest.raises(ValueError, match=r"suffix '\.tflite'\); expected one of \.onnx"):
        open_backend(str(tmp_path / "m.tflite"))
    with pytest.raises(FileNotFoundError, match="not found"):
        open_backend(str(tmp_path / "m.onnx"))


def test_ort_backend_rejects_card_of_other_flavour(models, tmp_path):
    from nexedge.card import load_card
    from nexedge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    card = load_card(models["host"])
    card.data["graph"]["crops"] = "ten"
    with pytest.raises(BackendError, match="needs input tensor\\(uint8\\)"):
        OnnxRuntimeBackend(models["host"], card=card)


def test_runtime_modules_do_not_import_torch():
    code = ("import sys, nexedge.runtime.factory, nexedge.runtime.backends.onnxruntime, nexedge.runtime.backends.torch, "
            "nexedge.runtime.backends.tensorrt, nexedge.runtime.registry as r; r.backends(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _FakeCuda:
    """Device memory as numpy byte arrays keyed by fake pointers (no GPU here)."""

    def __init__(self):
        self.mem, self.pinned_count, self.freed, self.next = {}, 0, [], 0x1000
        self.stream_handle, self.closed = 77, False

    def malloc(self, n):
        self.next += 0x1000
        self.mem[self.next] = np.zeros(n, np.uint8)
        return self.next

    def pinned(self, shape, dtype):
        self.pinned_count += 1
        arr = np.zeros(int(np.prod(shape)), dtype)
        return arr, arr

    def htod(self, dst, src):
        self.mem[dst][: src.nbytes] = src.reshape(-1).view(np.uint8)

    def dtoh(self, dst, src):
        dst.reshape(-1).view(np.uint8)[:] = self.mem[src][: dst.nbytes]

    def sync(self):
        pass

    def free(self, ptr):
        self.freed.append(ptr)

    def free_pinned(self, handle):
        self.pinned_count -= 1

    def close(self):
        self.closed = True

    def active(self):
        import contextlib

        return contextlib.nullcontext()


def _fake_tensorrt_module(cuda, max_images=4):
    """The mean-pixel fake TensorRT runtime of tests/support/trt_fakes.py on ``cuda``'s memory, enqueued only on its
    stream; _FakeCuda stands in for our own CUDA wrapper (no context to check, its active() does nothing)."""
    from tests.support.trt_fakes import fake_tensorrt

    return fake_tensorrt(cuda.mem, lambda call: None, profile=(1, 2, max_images), version="10.3.0",
                         streams={cuda.stream_handle})


def _engine_with_card(tmp_path, blob=b"ENGINE"):
    from tests.support.trt_fakes import fake_engine_file

    return fake_engine_file(tmp_path, tensorrt="10.3.0", blob=blob)


def test_tensorrt_backend_with_fake_tensorrt(tmp_path, monkeypatch):
    """Our buffer/shape/copy logic around TensorRT and CUDA (both absent here)."""
    import nexedge.runtime.backends.tensorrt as trt_backend

    cuda = _FakeCuda()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt_module(cuda))
    monkeypatch.setattr(trt_backend, "open_cuda", lambda device=0: cuda)
    path = _engine_with_card(tmp_path)
    with open_backend(path) as be:
        assert be.max_batch == 4 and len(cuda.mem) == 3  # allocated once, at the profile max
        sizes = sorted(len(v) for v in cuda.mem.values())
        assert sizes == sorted([4 * 36 * 36, 4 * 3 * 4, 4 * 4])
        imgs = _images(3)
        res = be.infer(imgs)
        m = imgs.reshape(3, -1).mean(1) / 255.0
        np.testing.assert_allclose(res.probs[:, 0], m, rtol=1e-6)
        np.testing.assert_allclose(res.defect_score, 1 - m, rtol=1e-6)
        assert set(res.timings) >= {"h2d", "inference", "d2h", "total"}
        np.testing.assert_allclose(be.infer(imgs[:1]).probs, res.probs[:1])
        with pytest.raises(BackendError, match="1..4"):
            be.infer(_images(5))
    assert cuda.closed and sorted(cuda.freed) == sorted(cuda.mem) and cuda.pinned_count == 0
    with pytest.raises(BackendError, match="closed"):
        be.infer(imgs)


def test_tensorrt_backend_bad_engine_names_versions_with_fake_tensorrt(tmp_path, monkeypatch):
    import nexedge.runtime.backends.tensorrt as trt_backend

    cuda = _FakeCuda()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt_module(cuda))
    monkeypatch.setattr(trt_backend, "open_cuda", lambda device=0: cuda)
    path = _engine_with_card(tmp_path, blob=b"OTHER")
    with pytest.raises(BackendError, match="TensorRT 10.3.0 could not deserialize.*built with TensorRT 10.3.0"):
        open_backend(path)
    # An engine whose profile is smaller than the card's max batch is refused.
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt_module(cuda, max_images=2))
    with pytest.raises(BackendError, match="profile max batch 2 is below the card's 4 images"):
        open_backend(_engine_with_card(tmp_path))
