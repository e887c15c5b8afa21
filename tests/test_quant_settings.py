"""ONNX Runtime INT8 settings of `nexedge calibrate` (issue 16): defaults, validation, and the
TensorRT target's fixed Q/DQ format (no settings may reach it)."""

import pytest

from nexedge.export import quantize as qz


def test_ort_settings_defaults_are_u8s8_per_channel():
    assert qz.ort_settings() == {"activations": "u8", "weights": "s8", "per_channel": True, "reduce_range": False}
    assert qz.ort_settings(activations=None, reduce_range=None) == qz.ORT_DEFAULTS  # None keeps the default
    assert qz.ort_label({"weights": "u8", "per_channel": False}) == "U8U8 per-tensor"
    assert qz.ort_label({"reduce_range": True}) == "U8S8 per-channel, reduce_range"


def test_ort_settings_name_the_bad_value():
    with pytest.raises(ValueError, match="weights 'int4': expected u8 or s8"):
        qz.ort_settings(weights="int4")
    with pytest.raises(ValueError, match="unknown ORT quantization setting 'symmetric'"):
        qz.ort_settings(symmetric=True)


def test_tensorrt_target_refuses_ort_settings(tmp_path):
    from nexedge.card import ModelCard

    card = ModelCard.new(["good", "chip"])
    with pytest.raises(ValueError, match="tensorrt target"):
        qz.quantize_model(str(tmp_path / "x.onnx"), str(tmp_path / "y.onnx"), card, None, "tensorrt",
                          ort={"reduce_range": True})


def test_calibrate_cli_passes_the_settings():
    import argparse

    from nexedge.export.cli import configure_calibrate

    p = argparse.ArgumentParser()
    configure_calibrate(p)
    a = p.parse_args(["m.onnx", "--data", "d", "--ort-weights", "u8", "--per-tensor", "--reduce-range"])
    assert (a.ort_weights, a.per_tensor, a.reduce_range, a.ort_activations) == ("u8", True, True, None)
