"""Backends (torch, ONNX Runtime host crops, ONNX Runtime in-graph crops) agree; factory and errors."""

import subprocess
import sys

import numpy as np
import pytest

from nexedge.runtime import BackendError, open_backend
from nexedge.runtime.factory import backend_kind
from nexedge.runtime.onnxrt import resolve_providers

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
    from nexedge.runtime.onnxrt import OnnxRuntimeBackend

    card = load_card(models["host"])
    card.data["graph"]["crops"] = "ten"
    with pytest.raises(BackendError, match="needs input tensor\\(uint8\\)"):
        OnnxRuntimeBackend(models["host"], card=card)


def test_runtime_modules_do_not_import_torch():
    code = ("import sys, nexedge.runtime.factory, nexedge.runtime.onnxrt, nexedge.runtime.torch_backend, "
            "nexedge.runtime.tensorrt; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
