"""TensorRT engine building: our logic around TensorRT, driven through a fake ``tensorrt`` module.

TensorRT and a GPU are absent here. The fake records what our code asks of the
TensorRT API (flags, profile shapes, workspace, DLA, timing cache) so the
version branches, naming, cache keys and errors are tested; the real build is
in the ``tensorrt``-marked test at the end, which skips without TensorRT.
"""

import os

import numpy as np
import pytest

from nexedge.card import ModelCard, load_card
from nexedge.export import cuda_device, trt_names, trt_network, trt_recipe, trt_rules
from nexedge.export.trt_build import build_engine
from nexedge.export.trt_rules import BuildOptions
from tests.support.trt_fakes import FakeCudart, fake_trt

# cudaGetDeviceProperties names every Orin module "Orin": the SM count and board tell them apart.
ORIN = cuda_device.DeviceInfo("Orin", (8, 7), 16, 61, "NVIDIA Jetson AGX Orin Developer Kit")
ORIN_NANO = cuda_device.DeviceInfo("Orin", (8, 7), 8, 7, "NVIDIA Jetson Orin Nano Developer Kit")


def _fake_trt(version="10.3.0.30", fast_int8=True, parse_errors=(), dla_cores=2, has_platform_queries=True):
    trt, calls = fake_trt(version, fast_int8=fast_int8, dla_cores=dla_cores,
                          has_platform_queries=has_platform_queries)
    if parse_errors:
        class Parser(trt.OnnxParser):
            def parse(self, data):
                self.errors = list(parse_errors)
                return False

        trt.OnnxParser = Parser
    return trt, calls


def _flags_of(engine_path):
    """The builder flags the fake engine was built with (its first line)."""
    with open(engine_path, "rb") as f:
        return f.read().split(b"\n", 1)[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Real tiny ONNX models (host and ten-crop, fp32 and TensorRT Q/DQ), exported once."""
    pytest.importorskip("torch")
    from tests.support.trt_fakes import export_tiny_models

    return export_tiny_models(str(tmp_path_factory.mktemp("models")))


def _copy_model(models, key, tmp_path, name=None):
    import shutil

    from nexedge.card import card_path_for

    src = models[key]
    dst = tmp_path / (name or os.path.basename(src))
    shutil.copy(src, dst)
    shutil.copy(card_path_for(src), card_path_for(str(dst)))
    return str(dst)


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
    assert trt_rules.parse_version("10.3.0.30") == (10, 3, 0)
    assert trt_rules.parse_version("8.5.2") == (8, 5, 2)
    with pytest.raises(ValueError, match="TensorRT 8.4.1 is too old: need 8.5"):
        trt_rules.parse_version("8.4.1")
    with pytest.raises(ValueError, match="cannot parse"):
        trt_rules.parse_version("latest")


def test_network_flags_version_branches_with_fake_tensorrt():
    trt, _ = _fake_trt()
    assert trt_rules.network_flags(trt, (8, 5, 2)) == 1  # EXPLICIT_BATCH required before 10
    assert trt_rules.network_flags(trt, (8, 6, 1)) == 1
    assert trt_rules.network_flags(trt, (10, 3, 0)) == 0  # implied (and deprecated) from 10


def test_unknown_precision_names_accepted():
    with pytest.raises(ValueError, match="unknown precision 'bf16'; expected one of fp32, fp16, int8"):
        trt_rules.check_precision("bf16")


def test_int8_mode_rules():
    assert trt_rules.int8_mode("int8", "int8", False) == "explicit"
    assert trt_rules.int8_mode("fp32", "int8", True) == "implicit"
    assert trt_rules.int8_mode("fp32", "fp16", False) is None
    with pytest.raises(ValueError, match="needs a calibration cache"):
        trt_rules.int8_mode("fp32", "int8", False)
    with pytest.raises(ValueError, match="Q/DQ INT8; it builds an INT8 engine, not fp16"):
        trt_rules.int8_mode("int8", "fp16", False)


def test_profile_shapes_host_crops_multiply(tmp_path):
    host = load_card(_onnx_with_card(tmp_path, "host", name="h.onnx"))
    ten = load_card(_onnx_with_card(tmp_path, "ten", name="t.onnx"))
    assert trt_rules.profile_shapes(host, 4, 8) == ((10, 3, 224, 224), (40, 3, 224, 224), (80, 3, 224, 224))
    assert trt_rules.profile_shapes(ten, 4, 8) == ((1, 255, 255, 1), (4, 255, 255, 1), (8, 255, 255, 1))
    assert trt_rules.batch_limits(ten) == (8, 8) and trt_rules.batch_limits(ten, 32) == (8, 32)
    with pytest.raises(ValueError, match="--opt-batch 9 must be between 1 and the max batch 8"):
        trt_rules.batch_limits(ten, 8, 9)


def test_engine_filename_and_device_slug():
    assert trt_names.device_slug("NVIDIA GeForce RTX 4090") == "geforce-rtx-4090"
    assert trt_names.device_slug("Orin") == "orin"
    name = trt_names.engine_filename("resnet18.ten", "ab" * 32, "int8", 16, "10.3.0.30", ORIN, dla_core=0)
    assert name == "resnet18.ten-abababab.int8.b16.trt10.3.0.30.jetson-agx-orin-developer-kit-sm16-dla0.engine"
    assert trt_names.device_tag(cuda_device.DeviceInfo("NVIDIA GeForce RTX 4090", (8, 9), 128, 24)) == "geforce-rtx-4090-sm128"


def test_cache_key_tells_orin_modules_apart_with_fake_tensorrt(models, tmp_path):
    """Item 10: AGX Orin, Orin NX and Orin Nano all report "Orin"; an engine built on one is not reused
    (nor even named the same) on another."""
    onnx = _copy_model(models, "ten", tmp_path)
    trt, calls = _fake_trt()
    out = str(tmp_path / "engines")
    a, _ = build_engine(onnx, BuildOptions(), out_dir=out, trt=trt, device=ORIN)
    b, reused = build_engine(onnx, BuildOptions(), out_dir=out, trt=trt, device=ORIN_NANO)
    assert a != b and not reused and calls["builds"] == 2
    key = load_card(b).data["provenance"]["engine"]["key"]
    assert key["sm_count"] == 8 and key["board"] == ORIN_NANO.board and key["total_mem_gib"] == 7
    # Same board name but a different SM count (e.g. a 4 GB Nano): still a different key.
    nano4 = ORIN_NANO._replace(sm_count=4, total_mem_gib=3)
    build_engine(onnx, BuildOptions(), out_dir=out, trt=trt, device=nano4)
    assert calls["builds"] == 3


def test_device_info_reads_sm_count_and_board_with_fake_cudart(monkeypatch, tmp_path):
    import nexedge.runtime.backends.tensorrt as rtmod

    rt = FakeCudart(name=b"Orin\x00", cc=(8, 7), sms=8, total_mem=7 * (1 << 30) + 123)
    monkeypatch.setattr(rtmod, "_import_cudart", lambda: rt)
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    monkeypatch.setattr(cuda_device, "JETSON_MODEL_FILE", str(model))
    assert cuda_device.device_info(0) == ORIN_NANO


def test_build_engine_card_and_cache_key_reuse_with_fake_tensorrt(models, tmp_path):
    onnx = _copy_model(models, "ten", tmp_path, "m.onnx")
    trt, calls = _fake_trt()
    out = str(tmp_path / "engines")
    opts = BuildOptions(precision="fp16", opt_batch=4, workspace=512 << 20,
                        timing_cache=str(tmp_path / "t.timing.cache"))
    path, reused = build_engine(onnx, opts, out_dir=out, trt=trt, device=ORIN)
    sha8 = load_card(onnx).sha256[:8]
    assert os.path.basename(path) == f"m-{sha8}.fp16.b8.trt10.3.0.30.jetson-agx-orin-developer-kit-sm16.engine"
    assert not reused
    assert _flags_of(path) == b"ENGINE-FP16"
    assert calls["network_flags"] == 0 and calls["workspace"] == ("WORKSPACE", 512 << 20)
    assert calls["profile"] == ("images", (1, 36, 36, 1), (4, 36, 36, 1), (8, 36, 36, 1))
    assert open(tmp_path / "t.timing.cache", "rb").read() == b"timing:"
    card = load_card(path)
    assert card.data["artifact"]["kind"] == "engine" and card.precision == "fp16"
    assert card.data["parent"]["sha256"] == load_card(onnx).sha256
    key = card.data["provenance"]["engine"]["key"]
    assert key["tensorrt"] == "10.3.0.30" and key["device"] == "Orin" and key["workspace"] == 512 << 20

    # Same key: reused without building. Any key change: rebuilt.
    assert build_engine(onnx, opts, out_dir=out, trt=trt, device=ORIN) == (path, True)
    assert calls["builds"] == 1
    build_engine(onnx, opts._replace(workspace=1 << 30), out_dir=out, trt=trt, device=ORIN)
    assert calls["builds"] == 2
    build_engine(onnx, opts._replace(workspace=1 << 30), out_dir=out, trt=trt,
                 device=ORIN._replace(compute_capability=(8, 6)))
    assert calls["builds"] == 3
    # A tampered cached engine is never reused.
    with open(path, "ab") as f:
        f.write(b"x")
    assert build_engine(onnx, opts, out_dir=out, trt=trt, device=ORIN)[1] is False


@pytest.mark.parametrize("version", ["8.5.2.2", "8.6.2", "10.3.0.30"])
def test_ingraph_uint8_model_parses_with_fake_tensorrt(models, tmp_path, version):
    """Item 1: the in-graph model casts the uint8 images first, so 8.5 (Cast of a UINT8 input) and 8.6+
    (no UINT8 intermediate tensors) both parse it."""
    onnx = _copy_model(models, "ten", tmp_path)
    trt, calls = _fake_trt(version=version)
    path, _ = build_engine(onnx, BuildOptions(), out_dir=str(tmp_path), trt=trt, device=ORIN, check=False)
    assert calls["builds"] == 1 and os.path.exists(path)


@pytest.mark.parametrize("flavour", ["host", "ten"])
@pytest.mark.parametrize("version", ["8.5.2.2", "10.3.0.30"])
def test_int8_qdq_model_parses_and_sets_fp16_with_fake_tensorrt(models, tmp_path, flavour, version):
    """Items 2 and 9: the real Q/DQ model from quantize_model parses (no INT32 bias DequantizeLinear), and an
    INT8 build sets FP16 too so the unquantized layers do not run in FP32."""
    onnx = _copy_model(models, flavour + "-qdq", tmp_path)
    trt, calls = _fake_trt(version=version)
    path, _ = build_engine(onnx, BuildOptions(precision="int8", max_batch=4, opt_batch=2),
                           out_dir=str(tmp_path), trt=trt, device=ORIN, check=False)
    assert calls["network_flags"] == (1 if version.startswith("8") else 0)
    assert _flags_of(path) == b"ENGINE-FP16,INT8"
    info = load_card(path).data["provenance"]["engine"]
    # In-graph models keep preprocessing and the score tail FP32 (pinned, obeyed); host-crop graphs are all backbone.
    obey = ["OBEY_PRECISION_CONSTRAINTS"] if flavour == "ten" else []
    assert info["int8_mode"] == "explicit" and info["flags"] == ["FP16", "INT8"] + obey
    if flavour == "host":
        assert calls["profile"][1:] == ((10, 3, 32, 32), (20, 3, 32, 32), (40, 3, 32, 32))


def test_int8_without_fast_fp16_sets_only_int8_with_fake_tensorrt(models, tmp_path):
    onnx = _copy_model(models, "host-qdq", tmp_path)
    trt, calls = fake_trt(fast_fp16=False)
    path, _ = build_engine(onnx, BuildOptions(precision="int8"), out_dir=str(tmp_path), trt=trt,
                           device=ORIN)
    assert _flags_of(path) == b"ENGINE-INT8"


def test_implicit_int8_uses_calibration_cache_with_fake_tensorrt(models, tmp_path):
    onnx = _copy_model(models, "ten", tmp_path)
    cache = tmp_path / "cache.bin"
    cache.write_bytes(b"TRT-8502-EntropyCalibration2\n")
    trt, calls = _fake_trt(version="8.6.1")
    path, _ = build_engine(onnx, BuildOptions(precision="int8", calib_cache=str(cache)),
                           out_dir=str(tmp_path), trt=trt, device=ORIN)
    calib = calls["config"].int8_calibrator
    assert calib.read_calibration_cache() == b"TRT-8502-EntropyCalibration2\n" and calib.get_batch(["x"]) is None
    key = load_card(path).data["provenance"]["engine"]["key"]
    assert key["int8_mode"] == "implicit" and key["calib_cache_sha256"]
    assert calls["calibration_profile"] == calls["profile"]


def test_int8_without_fast_int8_fails_loudly_with_fake_tensorrt(models, tmp_path):
    onnx = _copy_model(models, "ten-qdq", tmp_path)
    trt, calls = _fake_trt(fast_int8=False)
    with pytest.raises(RuntimeError, match="INT8 requested but Orin .*has no fast INT8"):
        build_engine(onnx, BuildOptions(precision="int8"), out_dir=str(tmp_path), trt=trt, device=ORIN)
    assert calls["builds"] == 0 and not [f for f in os.listdir(tmp_path) if f.endswith(".engine")]
    # TensorRT without platform_has_fast_int8 (deprecated 10.5): decided by compute capability.
    trt2, _ = _fake_trt(has_platform_queries=False)
    with pytest.raises(RuntimeError, match="SM 6.2"):
        build_engine(onnx, BuildOptions(precision="int8"), out_dir=str(tmp_path), trt=trt2,
                     device=cuda_device.DeviceInfo("Jetson TX2", (6, 2)))


def test_parser_errors_are_all_listed_with_fake_tensorrt(models, tmp_path):
    onnx = _copy_model(models, "ten", tmp_path)
    errs = ("In node 3 (Slice): unsupported step", "In node 9 (Flip): no importer", "weights are external")
    trt, _ = _fake_trt(parse_errors=errs)
    with pytest.raises(RuntimeError) as e:
        build_engine(onnx, BuildOptions(), out_dir=str(tmp_path), trt=trt, device=ORIN)
    msg = str(e.value)
    assert "rejected" in msg and "3 error(s)" in msg
    assert all(f"{i + 1}. {err}" in msg for i, err in enumerate(errs))
    assert "hint" not in msg
    trt86, _ = _fake_trt(version="8.6.1", parse_errors=("TensorRT does not support UINT8 types for intermediate "
                                                        "tensors!",))
    with pytest.raises(RuntimeError, match="(?s)1 error.*UINT8.*hint: .*re-export.*check-onnx"):
        build_engine(onnx, BuildOptions(), out_dir=str(tmp_path), trt=trt86, device=ORIN)


def test_fake_parser_rejects_what_onnx_tensorrt_rejects(models, tmp_path):
    """The fake parser is only useful if it fails where the real one does: a uint8 Transpose (the old
    in-graph export), an INT32 DequantizeLinear (a quantized bias) and non-ONNX bytes."""
    import onnx
    from onnx import TensorProto, helper

    from tests.support.trt_fakes import fake_parse_errors

    x = helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 4, 4, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    old = helper.make_model(helper.make_graph(
        [helper.make_node("Transpose", ["images"], ["t"], perm=[0, 3, 1, 2]),
         helper.make_node("Cast", ["t"], ["y"], to=TensorProto.FLOAT)], "g", [x], [y]))
    assert any("UINT8 types for intermediate" in e for e in fake_parse_errors(old.SerializeToString(), (8, 6)))
    assert fake_parse_errors(old.SerializeToString(), (8, 5))
    bias = helper.make_tensor("b", TensorProto.INT32, [2], [1, 2])
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    dq = helper.make_model(helper.make_graph(
        [helper.make_node("DequantizeLinear", ["b", "s"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [bias, s]))
    assert any("only activation types" in e for e in fake_parse_errors(dq.SerializeToString(), (10, 3)))
    assert fake_parse_errors(b"onnx-bytes", (10, 3))
    assert not fake_parse_errors(onnx.load(models["ten"]).SerializeToString(), (8, 6))


def test_dla_static_profile_and_layer_report_with_fake_tensorrt(models, tmp_path):
    """Item 8: DLA needs min = opt = max; the card says how many layers run on the DLA."""
    onnx = _copy_model(models, "host", tmp_path)
    trt, calls = _fake_trt(version="8.6.2")
    opts = BuildOptions(precision="fp16", dla_core=1, version_compatible=True, max_batch=2)
    path, _ = build_engine(onnx, opts, out_dir=str(tmp_path), trt=trt, device=ORIN)
    cfg = calls["config"]
    assert cfg.default_device_type == "DLA" and cfg.DLA_core == 1
    assert sorted(cfg.flags) == ["FP16", "GPU_FALLBACK", "VERSION_COMPATIBLE"]
    assert calls["profile"] == ("input", (20, 3, 32, 32), (20, 3, 32, 32), (20, 3, 32, 32))  # static
    assert path.endswith("-dla1.engine")
    dla = load_card(path).data["provenance"]["engine"]["dla"]
    assert dla["layers_on_dla"] == calls["dla_layers"] > 0 and dla["layers"] >= dla["layers_on_dla"]
    assert dla["core"] == 1
    with pytest.raises(ValueError, match="--dla-core 2: this device has 2 DLA core"):
        build_engine(onnx, opts._replace(dla_core=2), out_dir=str(tmp_path), trt=trt, device=ORIN)
    with pytest.raises(ValueError, match="DLA runs FP16 or INT8 only"):
        build_engine(onnx, opts._replace(precision="fp32"), out_dir=str(tmp_path), trt=trt, device=ORIN)
    old, _ = _fake_trt(version="8.5.2")
    with pytest.raises(ValueError, match="version-compatible engines need TensorRT 8.6"):
        build_engine(onnx, BuildOptions(version_compatible=True), out_dir=str(tmp_path), trt=old,
                     device=ORIN, force=True)


def test_dla_refuses_qdq_on_trt8_with_fake_tensorrt(models, tmp_path):
    """Item 8: DLA in TensorRT 8.x takes no explicit Q/DQ graphs (the Orin recipe used to pair them)."""
    onnx = _copy_model(models, "host-qdq", tmp_path)
    trt, calls = _fake_trt(version="8.6.2")
    with pytest.raises(ValueError, match="on DLA does not take explicit Q/DQ INT8"):
        build_engine(onnx, BuildOptions(precision="int8", dla_core=0), out_dir=str(tmp_path), trt=trt,
                     device=ORIN)
    assert calls["builds"] == 0
    trt10, calls10 = _fake_trt(version="10.3.0")
    path, _ = build_engine(onnx, BuildOptions(precision="int8", dla_core=0, max_batch=1),
                           out_dir=str(tmp_path), trt=trt10, device=ORIN)
    assert load_card(path).data["provenance"]["engine"]["dla"]["layers_on_dla"] == calls10["dla_layers"] > 0


def test_tensorrt_11_refused_clearly_with_fake_tensorrt(models, tmp_path):
    """Item 5: TensorRT 11 removed BuilderFlag.FP16/INT8 and the calibrators: a message, not an AttributeError."""
    onnx = _copy_model(models, "ten", tmp_path)
    trt, calls = _fake_trt(version="11.0.0.9")
    for precision in ("fp16", "int8"):
        with pytest.raises(RuntimeError, match="TensorRT 11.0.0.9 is not supported.*tensorrt>=10,<11"):
            build_engine(onnx, BuildOptions(precision=precision, calib_cache=__file__),
                         out_dir=str(tmp_path), trt=trt, device=ORIN)
    assert calls["builds"] == 0


def test_setup_trt_extra_is_bounded_and_pinned_per_platform():
    """Items 3 and 5: what pip resolves for `nexedge[trt]` on JetPack 5, JetPack 6 and x86."""
    import ast

    from packaging.requirements import Requirement

    src = open(os.path.join(os.path.dirname(__file__), "..", "setup.py"), encoding="utf-8").read()
    extras = next(ast.literal_eval(n.value) for n in ast.walk(ast.parse(src))
                  if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "EXTRAS")
    reqs = [Requirement(r) for r in extras["trt"]]

    def allowed(env, name, version):
        env = dict(platform_machine=env[0], python_version=env[1], python_full_version=env[1] + ".0")
        active = [r for r in reqs if r.name == name and (r.marker is None or r.marker.evaluate(env))]
        return bool(active) and all(r.specifier.contains(version, prereleases=True) for r in active)

    jp5, jp6, x86 = ("aarch64", "3.8"), ("aarch64", "3.10"), ("x86_64", "3.11")
    assert allowed(jp5, "cuda-python", "11.8.3") and allowed(jp5, "cuda-python", "11.5.0")
    assert not allowed(jp5, "cuda-python", "12.0.0") and not allowed(jp5, "cuda-python", "11.4.0")
    assert allowed(jp6, "cuda-python", "12.6.2") and not allowed(jp6, "cuda-python", "13.0.0")
    assert not allowed(jp6, "cuda-python", "12.8.0")
    assert allowed(x86, "cuda-python", "12.9.0") and not allowed(x86, "cuda-python", "13.0.1")
    assert allowed(x86, "tensorrt", "10.13.0") and not allowed(x86, "tensorrt", "11.0.0")
    assert not allowed(jp6, "tensorrt", "10.3.0")  # JetPack's TensorRT, never PyPI's SBSA wheel


def test_device_info_names_driver_mismatch_with_real_cuda_bindings():
    """Item 3: cuda-python 13 (installed here) against no/old driver: the message names both versions and
    the pins instead of a bare cudaErrorInsufficientDriver."""
    try:
        from nexedge.runtime.backends.tensorrt import _import_cudart

        rt = _import_cudart()
    except ImportError:
        pytest.skip("cuda-python is not installed")
    err, _ = rt.cudaGetDeviceProperties(0)
    if err == rt.cudaError_t.cudaSuccess:
        pytest.skip("a working CUDA device is present")
    with pytest.raises(RuntimeError) as e:
        cuda_device.device_info(0)
    msg = str(e.value)
    assert "cudaGetDeviceProperties(0) failed" in msg and "CUDA driver supports CUDA" in msg
    assert "cuda-python" in msg and "was built for CUDA" in msg and "cuda-python>=11.5,<12" in msg


def test_device_info_mismatch_message_with_fake_cudart(monkeypatch):
    """The same message for a JetPack 6.1 driver (CUDA 12.6) with cuda-python 13 (CUDA 13.0)."""
    import nexedge.runtime.backends.tensorrt as rtmod

    rt = FakeCudart(driver=12060, runtime=13000)
    monkeypatch.setattr(rtmod, "_import_cudart", lambda: rt)
    with pytest.raises(RuntimeError, match="(?s)driver supports CUDA 12.6.*built for CUDA 13.0.*matching the "
                                           "driver's CUDA 12.*JetPack 6"):
        cuda_device.device_info(0)


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
    path, _ = build_engine(onnx, BuildOptions(precision="fp16"), out_dir=str(tmp_path))
    imgs = toy_images(4, inp, seed=2)[0]
    with open_backend(onnx) as a, open_backend(path) as b:
        ra, rb = a.infer(imgs), b.infer(imgs)
    assert set(rb.timings) >= {"h2d", "inference", "d2h"}
    np.testing.assert_allclose(ra.probs, rb.probs, atol=2e-2)


RECIPES = os.path.join(os.path.dirname(__file__), "..", "trt_engines", "recipes")


@pytest.mark.parametrize("name", sorted(os.listdir(RECIPES)))
def test_shipped_recipes_load(name):
    r = trt_recipe.load_recipe(os.path.join(RECIPES, name))
    assert r["precision"] in ("fp16", "int8") and r["max_batch"] >= r["opt_batch"] >= 1 and r["tensorrt"]


def test_recipe_errors_and_version_check(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("precision: fp16\nmax_batchh: 8\n")
    with pytest.raises(ValueError, match="unknown key 'max_batchh'; expected some of target"):
        trt_recipe.load_recipe(str(bad))
    bad.write_text("max_batch: eight\n")
    with pytest.raises(ValueError, match="max_batch must be int, got 'eight'"):
        trt_recipe.load_recipe(str(bad))
    bad.write_text("precision: int4\n")
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        trt_recipe.load_recipe(str(bad))
    trt_recipe.check_recipe_version({"tensorrt": "10.3"}, "10.3.0.30")
    trt_recipe.check_recipe_version({"tensorrt": "10"}, "10.7.0")
    with pytest.raises(ValueError, match="is for TensorRT 8.5 .*this machine has TensorRT 10.3.0"):
        trt_recipe.check_recipe_version({"tensorrt": "8.5", "target": "jetson-xavier"}, "10.3.0")
    with pytest.raises(ValueError, match="is for TensorRT 10.3"):
        trt_recipe.check_recipe_version({"tensorrt": "10.3"}, "10.30.1")


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


REPO = os.path.join(os.path.dirname(__file__), "..")


def _documented_build_commands():
    """Every `nexedge build-engine ...` command in README.md and trt_engines/README.md (continuations joined)."""
    import re

    cmds = []
    for doc in ("README.md", os.path.join("trt_engines", "README.md")):
        text = open(os.path.join(REPO, doc), encoding="utf-8").read().replace("\\\n", " ")
        in_sh = False
        for line in text.splitlines():
            if line.strip().startswith("```"):
                in_sh = line.strip() in ("```sh", "```bash") and not in_sh
                continue
            m = re.match(r"^\s*(nexedge build-engine [^#`]*)", line)
            if in_sh and m:
                cmds.append(pytest.param(m.group(1).strip(), id=f"{os.path.basename(doc)}:{m.group(1)[21:60]}"))
    return cmds


@pytest.mark.parametrize("command", _documented_build_commands())
def test_documented_build_engine_commands_run_as_written_with_fake_tensorrt(command, models, tmp_path,
                                                                           monkeypatch, capsys):
    """Item 4: each documented command, typed as written on the device the recipe names, builds an engine.
    (The README's FP16 line with the Orin recipe used to stop at "needs a calibration cache".)"""
    import shlex
    import shutil
    import sys

    from nexedge.cli import main

    args = shlex.split(command)[1:]
    recipe = next((args[i + 1] for i, a in enumerate(args) if a == "--recipe"), None)
    version = {"8.5": "8.5.2.2", "8.6": "8.6.2", "10.3": "10.3.0.30", "10": "10.7.0"}[
        trt_recipe.load_recipe(os.path.join(REPO, recipe))["tensorrt"]] if recipe else "10.3.0.30"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(os.path.join(REPO, "trt_engines", "recipes"), "trt_engines/recipes")
    for i, a in enumerate(args):  # the files the command names, made real
        if a.endswith(".onnx"):
            os.makedirs(os.path.dirname(a) or ".", exist_ok=True)
            _copy_model(models, "ten-qdq" if a.endswith(".int8-trt.onnx") else "ten", tmp_path, a)
        cache = a if i and args[i - 1] == "--calib-cache" else (
            a.split("=", 1)[1] if i and args[i - 1] == "--build-kw" and a.startswith("calib_cache=") else None)
        if cache:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            open(cache, "wb").write(b"TRT-8502-EntropyCalibration2\n")
    trt, calls = _fake_trt(version=version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(cuda_device, "device_info", lambda device=0: ORIN)
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert calls["builds"] == 1 and out.startswith("built ")


def test_cli_precision_overrides_recipe_and_names_it(models, tmp_path, monkeypatch, capsys):
    import sys

    from nexedge.cli import main

    onnx = _copy_model(models, "ten", tmp_path)
    recipe = os.path.join(RECIPES, "x86-gpu-trt10.yaml")  # precision: int8
    trt, calls = _fake_trt(version="10.7.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(cuda_device, "device_info", lambda device=0: ORIN)
    assert main(["build-engine", onnx, "--recipe", recipe, "--out-dir", str(tmp_path)]) == 1
    assert f"precision int8 from {recipe}" in capsys.readouterr().err and calls["builds"] == 0
    assert main(["build-engine", onnx, "--recipe", recipe, "--precision", "fp16", "--out-dir", str(tmp_path)]) == 0
    assert calls["builds"] == 1 and '"precision": "fp16"' in capsys.readouterr().out


def test_profile_checked_against_input_dims_and_add_result_with_fake_tensorrt(models, tmp_path, monkeypatch):
    """Issue 28 item 7/8: a profile that does not fit the ONNX input fails with both shapes named (the fake
    builder, like TensorRT, fails such a build), and add_optimization_profile's -1 is not ignored."""
    onnx = _copy_model(models, "ten", tmp_path)
    card = load_card(onnx)
    card.data["input"]["resize"] = [40, 40]  # the card no longer matches the graph's 36 x 36 input
    card.save_for(onnx)
    trt, calls = _fake_trt()
    with pytest.raises(ValueError, match=r"profile shape \(1, 40, 40, 1\) does not fit input 'images'.*"
                                         r"\(-1, 36, 36, 1\)"):
        build_engine(onnx, BuildOptions(), out_dir=str(tmp_path), trt=trt, device=ORIN, check=False)
    monkeypatch.setattr(trt_network, "check_profile_dims", lambda network, shapes: None)
    with pytest.raises(RuntimeError, match="failed to build"):  # the fake builder checks the dims too
        build_engine(onnx, BuildOptions(), out_dir=str(tmp_path), trt=trt, device=ORIN, check=False)
    assert "does not match input dims" in calls["build_error"]

    ok = _copy_model(models, "ten", tmp_path, "ok.onnx")
    trt2, calls2 = _fake_trt()

    class Config(type(trt2.Builder(None).create_builder_config())):
        def add_optimization_profile(self, profile):
            return -1

    trt2.Builder.create_builder_config = lambda self: Config()
    with pytest.raises(RuntimeError, match=r"rejected the optimisation profile .* returned -1"):
        build_engine(ok, BuildOptions(), out_dir=str(tmp_path), trt=trt2, device=ORIN, check=False)
    assert calls2["builds"] == 0


def test_timing_cache_refused_is_replaced_not_ignored_with_fake_tensorrt(models, tmp_path, caplog):
    """Issue 28 item 7: set_timing_cache returns False for a cache made on another device/TensorRT; the
    build warns, starts a new cache and writes that one (the old call's result was ignored)."""
    onnx = _copy_model(models, "ten", tmp_path)
    cache = tmp_path / "t.timing.cache"
    cache.write_bytes(b"made-on-another-gpu")
    trt, calls = fake_trt(timing_cache_accepts=False)
    with caplog.at_level("WARNING"):
        build_engine(onnx, BuildOptions(timing_cache=str(cache)), out_dir=str(tmp_path), trt=trt,
                     device=ORIN, check=False)
    assert calls["timing_cache_refused"] == b"made-on-another-gpu"
    assert "was not accepted" in caplog.text and cache.read_bytes() == b"timing:"
