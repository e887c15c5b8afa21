"""TensorRT engine building: our logic around TensorRT, driven through a fake ``tensorrt`` module.

TensorRT and a GPU are absent here. The fake records what our code asks of the
TensorRT API (flags, profile shapes, workspace, DLA, timing cache) so the
version branches, naming, cache keys and errors are tested; the real build is
in the ``tensorrt``-marked test at the end, which skips without TensorRT.
"""

import enum
import os
import types

import numpy as np
import pytest

from nexedge.card import ModelCard, load_card
from nexedge.export import engine as eng

ORIN = eng.DeviceInfo("Orin", (8, 7))


def _fake_trt(version="10.3.0.30", fast_int8=True, parse_errors=(), dla_cores=2, has_platform_queries=True):
    calls = {"builds": 0}

    class Flag(enum.IntEnum):
        EXPLICIT_BATCH = 0

    class BuilderFlag(enum.Enum):
        FP16 = "FP16"
        INT8 = "INT8"
        GPU_FALLBACK = "GPU_FALLBACK"
        VERSION_COMPATIBLE = "VERSION_COMPATIBLE"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Tensor:
        name = "images"

    class Network:
        def __init__(self, flags):
            calls["network_flags"] = flags

        def get_input(self, i):
            return Tensor()

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = len(parse_errors)

        def parse(self, data):
            calls["parsed_bytes"] = len(data)
            return not parse_errors

        def get_error(self, i):
            return parse_errors[i]

    class TimingCache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return b"timing:" + self.blob

    class Config:
        def __init__(self):
            self.flags, self.int8_calibrator, self.default_device_type, self.DLA_core = [], None, None, None
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            self.flags.append(flag.value)

        def add_optimization_profile(self, profile):
            calls["profile"] = profile.shapes

        def set_calibration_profile(self, profile):
            calls["calibration_profile"] = profile.shapes

        def create_timing_cache(self, blob):
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            self.shapes = (name, mn, opt, mx)

    class Builder:
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            calls["config"] = Config()
            return calls["config"]

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls["builds"] += 1
            return b"ENGINE-" + ",".join(config.flags).encode()

    if has_platform_queries:
        Builder.platform_has_fast_int8 = fast_int8
        Builder.platform_has_fast_fp16 = True

    class Calib:
        def __init__(self):
            pass

    trt = types.SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=Parser,
        NetworkDefinitionCreationFlag=Flag, BuilderFlag=BuilderFlag,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        DeviceType=types.SimpleNamespace(DLA="DLA", GPU="GPU"), IInt8EntropyCalibrator2=Calib,
    )
    return trt, calls


def _onnx_with_card(tmp_path, crops="ten", precision="fp32", max_batch=8, name="m.onnx"):
    path = tmp_path / name
    path.write_bytes(b"onnx-bytes-" + crops.encode() + precision.encode())
    card = ModelCard.new(["good", "chip", "scratch"], resize=(255, 255), crop=(224, 224), crop_mode="ten",
                         color="gray", kind="onnx", precision=precision)
    card.data["graph"] = {"crops": crops, "input_name": "images" if crops != "host" else "input",
                          "output_names": ["probs", "defect_score"], "max_batch": max_batch}
    card.save_for(str(path))
    return str(path)


def test_parse_version_and_minimum():
    assert eng.parse_version("10.3.0.30") == (10, 3, 0)
    assert eng.parse_version("8.5.2") == (8, 5, 2)
    with pytest.raises(ValueError, match="TensorRT 8.4.1 is too old: need 8.5"):
        eng.parse_version("8.4.1")
    with pytest.raises(ValueError, match="cannot parse"):
        eng.parse_version("latest")


def test_network_flags_version_branches_with_fake_tensorrt():
    trt, _ = _fake_trt()
    assert eng.network_flags(trt, (8, 5, 2)) == 1  # EXPLICIT_BATCH required before 10
    assert eng.network_flags(trt, (8, 6, 1)) == 1
    assert eng.network_flags(trt, (10, 3, 0)) == 0  # implied (and deprecated) from 10


def test_unknown_precision_names_accepted():
    with pytest.raises(ValueError, match="unknown precision 'bf16'; expected one of fp32, fp16, int8"):
        eng.check_precision("bf16")


def test_int8_mode_rules():
    assert eng.int8_mode("int8", "int8", False) == "explicit"
    assert eng.int8_mode("fp32", "int8", True) == "implicit"
    assert eng.int8_mode("fp32", "fp16", False) is None
    with pytest.raises(ValueError, match="needs a calibration cache"):
        eng.int8_mode("fp32", "int8", False)
    with pytest.raises(ValueError, match="Q/DQ INT8; it builds an INT8 engine, not fp16"):
        eng.int8_mode("int8", "fp16", False)


def test_profile_shapes_host_crops_multiply(tmp_path):
    host = load_card(_onnx_with_card(tmp_path, "host", name="h.onnx"))
    ten = load_card(_onnx_with_card(tmp_path, "ten", name="t.onnx"))
    assert eng.profile_shapes(host, 4, 8) == ((10, 3, 224, 224), (40, 3, 224, 224), (80, 3, 224, 224))
    assert eng.profile_shapes(ten, 4, 8) == ((1, 255, 255, 1), (4, 255, 255, 1), (8, 255, 255, 1))
    assert eng.batch_limits(ten) == (8, 8) and eng.batch_limits(ten, 32) == (8, 32)
    with pytest.raises(ValueError, match="--opt-batch 9 must be between 1 and the max batch 8"):
        eng.batch_limits(ten, 8, 9)


def test_engine_filename_and_device_slug():
    assert eng.device_slug("NVIDIA GeForce RTX 4090") == "geforce-rtx-4090"
    assert eng.device_slug("Orin") == "orin"
    name = eng.engine_filename("resnet18.ten", "ab" * 32, "int8", 16, "10.3.0.30", "Orin", dla_core=0)
    assert name == "resnet18.ten-abababab.int8.b16.trt10.3.0.30.orin-dla0.engine"


def test_build_engine_card_and_cache_key_reuse_with_fake_tensorrt(tmp_path):
    onnx = _onnx_with_card(tmp_path)
    trt, calls = _fake_trt()
    out = str(tmp_path / "engines")
    opts = eng.BuildOptions(precision="fp16", opt_batch=4, workspace=512 << 20,
                            timing_cache=str(tmp_path / "t.timing.cache"))
    path, reused = eng.build_engine(onnx, opts, out_dir=out, trt=trt, device=ORIN)
    sha8 = load_card(onnx).sha256[:8]
    assert os.path.basename(path) == f"m-{sha8}.fp16.b8.trt10.3.0.30.orin.engine" and not reused
    assert open(path, "rb").read() == b"ENGINE-FP16"
    assert calls["network_flags"] == 0 and calls["workspace"] == ("WORKSPACE", 512 << 20)
    assert calls["profile"] == ("images", (1, 255, 255, 1), (4, 255, 255, 1), (8, 255, 255, 1))
    assert open(tmp_path / "t.timing.cache", "rb").read() == b"timing:"
    card = load_card(path)
    assert card.data["artifact"]["kind"] == "engine" and card.precision == "fp16"
    assert card.data["parent"]["sha256"] == load_card(onnx).sha256
    key = card.data["provenance"]["engine"]["key"]
    assert key["tensorrt"] == "10.3.0.30" and key["device"] == "Orin" and key["workspace"] == 512 << 20

    # Same key: reused without building. Any key change: rebuilt.
    assert eng.build_engine(onnx, opts, out_dir=out, trt=trt, device=ORIN) == (path, True)
    assert calls["builds"] == 1
    eng.build_engine(onnx, opts._replace(workspace=1 << 30), out_dir=out, trt=trt, device=ORIN)
    assert calls["builds"] == 2
    eng.build_engine(onnx, opts._replace(workspace=1 << 30), out_dir=out, trt=trt,
                     device=eng.DeviceInfo("Orin", (8, 6)))
    assert calls["builds"] == 3
    # A tampered cached engine is never reused.
    with open(path, "ab") as f:
        f.write(b"x")
    assert eng.build_engine(onnx, opts, out_dir=out, trt=trt, device=ORIN)[1] is False


def test_trt8_explicit_batch_and_int8_qdq_with_fake_tensorrt(tmp_path):
    onnx = _onnx_with_card(tmp_path, crops="host", precision="int8")
    trt, calls = _fake_trt(version="8.5.2.2")
    path, _ = eng.build_engine(onnx, eng.BuildOptions(precision="int8", max_batch=4, opt_batch=2),
                               out_dir=str(tmp_path), trt=trt, device=ORIN)
    assert calls["network_flags"] == 1 and open(path, "rb").read() == b"ENGINE-INT8"
    assert calls["profile"][1:] == ((10, 3, 224, 224), (20, 3, 224, 224), (40, 3, 224, 224))
    assert load_card(path).data["provenance"]["engine"]["int8_mode"] == "explicit"


def test_implicit_int8_uses_calibration_cache_with_fake_tensorrt(tmp_path):
    onnx = _onnx_with_card(tmp_path)
    cache = tmp_path / "cache.bin"
    cache.write_bytes(b"TRT-8502-EntropyCalibration2\n")
    trt, calls = _fake_trt(version="8.6.1")
    path, _ = eng.build_engine(onnx, eng.BuildOptions(precision="int8", calib_cache=str(cache)),
                               out_dir=str(tmp_path), trt=trt, device=ORIN)
    calib = calls["config"].int8_calibrator
    assert calib.read_calibration_cache() == b"TRT-8502-EntropyCalibration2\n" and calib.get_batch(["x"]) is None
    key = load_card(path).data["provenance"]["engine"]["key"]
    assert key["int8_mode"] == "implicit" and key["calib_cache_sha256"]
    assert calls["calibration_profile"] == calls["profile"]


def test_int8_without_fast_int8_fails_loudly_with_fake_tensorrt(tmp_path):
    onnx = _onnx_with_card(tmp_path, precision="int8")
    trt, calls = _fake_trt(fast_int8=False)
    with pytest.raises(RuntimeError, match="INT8 requested but Orin .*has no fast INT8"):
        eng.build_engine(onnx, eng.BuildOptions(precision="int8"), out_dir=str(tmp_path), trt=trt, device=ORIN)
    assert calls["builds"] == 0 and not [f for f in os.listdir(tmp_path) if f.endswith(".engine")]
    # TensorRT without platform_has_fast_int8 (deprecated 10.5): decided by compute capability.
    trt2, _ = _fake_trt(has_platform_queries=False)
    with pytest.raises(RuntimeError, match="SM 6.2"):
        eng.build_engine(onnx, eng.BuildOptions(precision="int8"), out_dir=str(tmp_path), trt=trt2,
                         device=eng.DeviceInfo("Jetson TX2", (6, 2)))


def test_parser_errors_are_all_listed_with_fake_tensorrt(tmp_path):
    onnx = _onnx_with_card(tmp_path)
    errs = ("In node 3 (Slice): unsupported step", "In node 9 (Flip): no importer", "weights are external")
    trt, _ = _fake_trt(parse_errors=errs)
    with pytest.raises(RuntimeError) as e:
        eng.build_engine(onnx, eng.BuildOptions(), out_dir=str(tmp_path), trt=trt, device=ORIN)
    msg = str(e.value)
    assert "rejected" in msg and "3 error(s)" in msg
    assert all(f"{i + 1}. {err}" in msg for i, err in enumerate(errs))
    assert "hint" not in msg
    trt85, _ = _fake_trt(version="8.5.2", parse_errors=("Unsupported ONNX data type: UINT8 (2)",))
    with pytest.raises(RuntimeError, match="(?s)1 error.*UINT8.*hint: .*export with --crops host"):
        eng.build_engine(onnx, eng.BuildOptions(), out_dir=str(tmp_path), trt=trt85, device=ORIN)


def test_dla_and_version_compatible_with_fake_tensorrt(tmp_path):
    onnx = _onnx_with_card(tmp_path)
    trt, calls = _fake_trt(version="8.6.2")
    opts = eng.BuildOptions(precision="fp16", dla_core=1, version_compatible=True)
    path, _ = eng.build_engine(onnx, opts, out_dir=str(tmp_path), trt=trt, device=ORIN)
    cfg = calls["config"]
    assert cfg.default_device_type == "DLA" and cfg.DLA_core == 1
    assert cfg.flags == ["FP16", "GPU_FALLBACK", "VERSION_COMPATIBLE"]
    assert path.endswith(".orin-dla1.engine")
    with pytest.raises(ValueError, match="--dla-core 2: this device has 2 DLA core"):
        eng.build_engine(onnx, opts._replace(dla_core=2), out_dir=str(tmp_path), trt=trt, device=ORIN)
    with pytest.raises(ValueError, match="DLA runs FP16 or INT8 only"):
        eng.build_engine(onnx, opts._replace(precision="fp32"), out_dir=str(tmp_path), trt=trt, device=ORIN)
    old, _ = _fake_trt(version="8.5.2")
    with pytest.raises(ValueError, match="version-compatible engines need TensorRT 8.6"):
        eng.build_engine(onnx, eng.BuildOptions(version_compatible=True), out_dir=str(tmp_path), trt=old,
                         device=ORIN, force=True)


def test_cli_build_engine_without_tensorrt(tmp_path, capsys):
    from nexedge.cli import main

    onnx = _onnx_with_card(tmp_path)
    assert main(["build-engine", onnx, "--precision", "int4"]) == 1
    assert "unknown precision 'int4'; expected one of fp32, fp16, int8" in capsys.readouterr().err
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert main(["build-engine", onnx]) == 1
        assert "build-engine needs TensorRT" in capsys.readouterr().err


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_tensorrt_engine_matches_onnxruntime(tmp_path):
    """On a GPU box with TensorRT: build an FP16 engine of a trained tiny model and compare with ORT."""
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.toy import toy_images, train_toy_checkpoint
    from nexedge.runtime import open_backend

    inp = {"color": "gray", "resize": [40, 40], "crop": [32, 32], "crop_mode": "ten"}
    ckpt = train_toy_checkpoint(str(tmp_path / "m.pt"), inp=inp, steps=20)
    onnx = export_onnx(ckpt, crops="ten", parity_images=2, max_batch=4).path
    path, _ = eng.build_engine(onnx, eng.BuildOptions(precision="fp16"), out_dir=str(tmp_path))
    imgs = toy_images(4, inp, seed=2)[0]
    with open_backend(onnx) as a, open_backend(path) as b:
        ra, rb = a.infer(imgs), b.infer(imgs)
    assert set(rb.timings) >= {"h2d", "inference", "d2h"}
    np.testing.assert_allclose(ra.probs, rb.probs, atol=2e-2)


RECIPES = os.path.join(os.path.dirname(__file__), "..", "trt_engines", "recipes")


@pytest.mark.parametrize("name", sorted(os.listdir(RECIPES)))
def test_shipped_recipes_load(name):
    r = eng.load_recipe(os.path.join(RECIPES, name))
    assert r["precision"] in ("fp16", "int8") and r["max_batch"] >= r["opt_batch"] >= 1 and r["tensorrt"]


def test_recipe_errors_and_version_check(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("precision: fp16\nmax_batchh: 8\n")
    with pytest.raises(ValueError, match="unknown key 'max_batchh'; expected some of target"):
        eng.load_recipe(str(bad))
    bad.write_text("max_batch: eight\n")
    with pytest.raises(ValueError, match="max_batch must be int, got 'eight'"):
        eng.load_recipe(str(bad))
    bad.write_text("precision: int4\n")
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        eng.load_recipe(str(bad))
    eng.check_recipe_version({"tensorrt": "10.3"}, "10.3.0.30")
    eng.check_recipe_version({"tensorrt": "10"}, "10.7.0")
    with pytest.raises(ValueError, match="is for TensorRT 8.5 .*this machine has TensorRT 10.3.0"):
        eng.check_recipe_version({"tensorrt": "8.5", "target": "jetson-xavier"}, "10.3.0")
    with pytest.raises(ValueError, match="is for TensorRT 10.3"):
        eng.check_recipe_version({"tensorrt": "10.3"}, "10.30.1")


def test_cli_settings_recipe_then_flags():
    import argparse

    from nexedge.export.cli import build_settings, configure_build_engine

    p = argparse.ArgumentParser()
    configure_build_engine(p)
    recipe = os.path.join(RECIPES, "jetson-orin-jp6.yaml")
    s = build_settings(p.parse_args(["m.onnx", "--recipe", recipe]))
    assert (s["precision"], s["max_batch"], s["opt_batch"], s["workspace_mib"]) == ("int8", 8, 4, 1024)
    s = build_settings(p.parse_args(["m.onnx", "--recipe", recipe, "--precision", "fp16", "--max-batch", "2",
                                     "--opt-batch", "1"]))
    assert (s["precision"], s["max_batch"], s["opt_batch"]) == ("fp16", 2, 1)
    s = build_settings(p.parse_args(["m.onnx"]))
    assert s["precision"] == "fp16" and s["version_compatible"] is False and s["workspace_mib"] == 1024
