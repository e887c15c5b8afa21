"""nexedge.runtime.registry: each backend declares its options; configs and CLIs are checked against the
backend that will open the file (issue 28 item 3)."""

import pytest

from nexedge.runtime import registry


def test_each_backend_declares_suffixes_and_options():
    assert registry.backend_names() == ("onnxruntime", "tensorrt", "torch")
    assert registry.backend_for("m.onnx").name == "onnxruntime"
    assert registry.backend_for("/x/M.ENGINE").name == "tensorrt" and registry.backend_for("m.plan").name == "tensorrt"
    assert registry.backend_for("m.pt").name == "torch"
    with pytest.raises(ValueError, match=r"cannot tell which backend runs 'm.tflite' \(suffix '.tflite'\); expected "
                                         r"one of .onnx, .engine, .plan, .pt, .pth"):
        registry.backend_for("m.tflite")


def test_options_are_checked_by_name_type_and_choice():
    assert registry.validate_options("onnxruntime", {"intra_threads": 2, "providers": "cpu", "crop_mode": "five"}) \
        == {"intra_threads": 2, "providers": "cpu", "crop_mode": "five"}
    assert registry.validate_options("tensorrt", {"device": 1, "max_batch": None}) == {"device": 1}
    with pytest.raises(ValueError, match=r"options.intra_threads: not an option of the tensorrt backend \(it takes "
                                         r"device, max_batch, verify\)"):
        registry.validate_options("tensorrt", {"intra_threads": 2})
    with pytest.raises(ValueError, match=r"options.intra_threads: '2'; expected int \(onnxruntime backend: intra-op threads"):
        registry.validate_options("onnxruntime", {"intra_threads": "2"})
    with pytest.raises(ValueError, match=r"options.intra_threads: True; expected int"):
        registry.validate_options("onnxruntime", {"intra_threads": True})
    with pytest.raises(ValueError, match=r"options.crop_mode: 'six'; expected one of center, five, ten"):
        registry.validate_options("torch", {"crop_mode": "six"})
    with pytest.raises(ValueError, match=r"options.intra_threads: 0 must be a positive integer"):
        registry.validate_options("onnxruntime", {"intra_threads": 0})
    with pytest.raises(ValueError, match=r"options.card: not an option"):
        registry.validate_options("onnxruntime", {"card": object()})  # internal keywords only from code
    assert "card" in registry.validate_options("onnxruntime", {"card": 1}, internal=True)


def test_unknown_backend_is_an_error_never_tensorrt():
    """bench.runner used to treat every backend it did not know as TensorRT."""
    from nexedge.bench.runner import backend_kwargs

    with pytest.raises(ValueError, match=r"unknown backend 'openvino'; expected one of onnxruntime, tensorrt, torch"):
        backend_kwargs("openvino", None, None, None)
    with pytest.raises(ValueError, match="unknown backend 'openvino'"):
        registry.validate_options("openvino", {})
    assert backend_kwargs("onnxruntime", 2, "five", "cpu") == {"intra_threads": 2, "crop_mode": "five",
                                                              "providers": "cpu"}
    assert backend_kwargs("torch", 2, None, None) == {"threads": 2}
    assert backend_kwargs("tensorrt", None, None, None) == {}
    with pytest.raises(ValueError, match=r"--providers 'cuda' does not apply to the torch backend"):
        backend_kwargs("torch", None, None, "cuda")


def test_config_options_per_backend_or_flat():
    registry.check_config_options({"onnxruntime": {"intra_threads": 2}, "tensorrt": {"device": 0}}, "m.engine")
    registry.check_config_options({"intra_threads": 2}, "m.onnx")
    with pytest.raises(ValueError, match=r"model.options.intra_threads: not an option of the tensorrt backend"):
        registry.check_config_options({"intra_threads": 2}, "m.engine")
    with pytest.raises(ValueError, match=r"model.options.tensorrt.threads: not an option of the tensorrt backend"):
        registry.check_config_options({"tensorrt": {"threads": 2}}, "m.onnx")
    with pytest.raises(ValueError, match=r"mixes backend sections \['tensorrt'\] with plain options \['intra_threads'\]"):
        registry.check_config_options({"tensorrt": {}, "intra_threads": 2}, "m.onnx")
    assert registry.options_for("m.engine", {"onnxruntime": {"intra_threads": 2}}) == {}
    assert registry.options_for("m.onnx", {"onnxruntime": {"intra_threads": 2}}) == {"intra_threads": 2}
    with pytest.raises(ValueError, match=r"Options for several backends go under their names"):
        registry.options_for("m.engine", {"intra_threads": 2})


def test_check_config_refuses_options_the_model_backend_does_not_take(tmp_path, capsys):
    """--check-config used to pass `options: {intra_threads: 2}` for an engine, which then failed at start
    with a TypeError."""
    from nexedge.serve import config as C
    from nexedge.serve.daemon import main

    with pytest.raises(C.ConfigError, match=r"model.options.intra_threads: not an option of the tensorrt backend"):
        C.from_dict({"model": {"path": "/opt/m.engine", "options": {"intra_threads": 2}}})
    cfg = tmp_path / "line.yaml"
    cfg.write_text("model:\n  path: m.engine\n  options: {intra_threads: 2}\n")
    assert main(["--config", str(cfg), "--check-config"]) == 2
    assert "not an option of the tensorrt backend" in capsys.readouterr().err
    C.from_dict({"model": {"path": "/opt/m.engine", "options": {"onnxruntime": {"intra_threads": 2},
                                                                "tensorrt": {"device": 0}}}})


def test_open_backend_names_a_wrong_option_before_opening(tmp_path):
    from nexedge.runtime import open_backend

    p = tmp_path / "m.onnx"
    p.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"options.threads: not an option of the onnxruntime backend \(it takes "
                                         r"intra_threads, inter_threads, providers, max_batch, crop_mode, verify\)"):
        open_backend(str(p), threads=2)
