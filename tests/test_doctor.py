"""`nexedge doctor` (issue 28): each check is a function of what it inspects, so the Jetson cases are
tested here without a Jetson; the CLI runs for real on this machine."""

import ast
import os
import stat

import pytest

from nexedge import doctor
from nexedge.card import ModelCard
from nexedge.export import cuda_device, trt_rules

JP51 = doctor.jetpack_of((35, 4, 1))
JP60 = doctor.jetpack_of((36, 3, 0))
JP61 = doctor.jetpack_of((36, 4, 0))
ORIN = cuda_device.DeviceInfo("Orin", (8, 7), 16, 61, "NVIDIA Jetson AGX Orin Developer Kit")
NANO = cuda_device.DeviceInfo("Orin", (8, 7), 8, 7, "NVIDIA Jetson Orin Nano Developer Kit")


def test_l4t_release_gives_the_jetpack():
    assert doctor.parse_l4t("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64") == (36, 4, 0)
    assert doctor.parse_l4t("# R35 (release), REVISION: 4.1, GCID: 33958178") == (35, 4, 1)
    assert doctor.parse_l4t("not a tegra release") is None
    assert JP51 == ("5.1", "3.8", "8.5", "11.4") and JP60[2] == "8.6" and JP61[2] == "10.3"
    assert doctor.platform_key("aarch64", JP51) == "jetpack5" and doctor.platform_key("aarch64", JP61) == "jetpack6"
    assert doctor.platform_key("x86_64", None) == "x86_64"


def test_python_for_the_jetpack():
    assert doctor.check_python((3, 8), JP51).status == doctor.OK
    c = doctor.check_python((3, 8), JP61)
    assert c.status == doctor.FAIL and "built for Python 3.10" in c.detail and "python3.10 -m venv" in c.fix


def test_foreign_nexedge_distribution_fails():
    c = doctor.check_distribution({"nexedge": ("1.0.0", [])})
    assert c.status == doctor.FAIL and "unrelated project" in c.detail and "pip uninstall -y nexedge" in c.fix
    assert doctor.check_distribution({"nexedge": ("0.1.0", ["nexedge", "nexedge-daemon"])}).status == doctor.WARN
    assert doctor.check_distribution({"nexedge-line": ("0.1.0", ["nexedge", "nexedge-daemon"])}).status == doctor.OK


def test_numpy_2_against_jetpacks_opencv():
    err = ("ImportError: A module that was compiled using NumPy 1.x cannot be run in NumPy 2.2.6 as it may crash. "
           "numpy.core.multiarray failed to import")
    c = doctor.check_numpy_cv2({"numpy": "2.2.6", "error": err}, "jetpack6", True)
    assert c.status == doctor.FAIL and c.fix == doctor.FIX_NUMPY and "cv2 does not import with numpy 2.2.6" in c.detail
    c = doctor.check_numpy_cv2({"numpy": "2.0.1", "cv2": "4.8.0", "cv2_file": "/usr/lib/python3/dist-packages/cv2/x.so"},
                          "jetpack6", True)
    assert c.status == doctor.FAIL and "numpy>=1.19,<2" in c.detail
    c = doctor.check_numpy_cv2({"numpy": "1.26.4", "cv2": "4.10.0",
                           "cv2_file": "/opt/nexedge/venv/lib/python3.10/site-packages/cv2/__init__.py"},
                          "jetpack6", True)
    assert c.status == doctor.WARN and "shadows JetPack's" in c.detail
    ok = doctor.check_numpy_cv2({"numpy": "1.21.5", "cv2": "4.8.0", "cv2_file": "/usr/lib/python3/dist-packages/cv2"},
                           "jetpack6", True)
    assert ok.status == doctor.OK


def test_cv2_probe_survives_a_crashing_import(tmp_path):
    """An ABI mismatch can kill the interpreter: the probe runs in a child and reports the crash."""
    real = doctor.probe_cv2()
    assert real["numpy"] and (real.get("cv2") or real.get("error"))
    crash = tmp_path / "python"
    crash.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crash.chmod(crash.stat().st_mode | stat.S_IEXEC)
    got = doctor.probe_cv2(str(crash))
    assert got["numpy"] is None and "child exited" in got["error"]
    assert doctor.check_numpy_cv2(got, "jetpack6", True).status == doctor.FAIL


def test_tensorrt_against_the_pins():
    c = doctor.check_tensorrt("10.3.0", "/opt/nexedge/venv/lib/python3.10/site-packages/tensorrt/__init__.py",
                         "jetpack6", JP61)
    assert c.status == doctor.FAIL and "SBSA" in c.detail and "python3-libnvinfer" in c.fix
    assert doctor.check_tensorrt("10.3.0", "/usr/lib/python3.10/dist-packages/tensorrt/__init__.py", "jetpack6",
                            JP61).status == doctor.OK
    assert doctor.check_tensorrt("10.3.0", "/usr/lib/python3.10/dist-packages/tensorrt/x.py", "jetpack6",
                            JP60).status == doctor.WARN
    assert doctor.check_tensorrt("11.0.0.9", None, "x86_64", None).status == doctor.FAIL
    assert doctor.check_tensorrt("8.6.1", None, "x86_64", None).status == doctor.FAIL  # the x86 pin is 10.x
    assert doctor.check_tensorrt(None, None, "jetpack5", JP51, "No module named 'tensorrt'").status == doctor.FAIL
    assert doctor.check_tensorrt(None, None, "x86_64", None).status == doctor.SKIP


def test_cuda_python_and_driver():
    c = doctor.check_cuda_python("12.6.2", False, "jetpack5", True)
    assert c.status == doctor.FAIL and 'pip install "cuda-python>=11.5,<12"' == c.fix
    assert doctor.check_cuda_python("11.8.2", False, "jetpack5", True).status == doctor.OK
    assert doctor.check_cuda_python(None, True, "jetpack6", True).status == doctor.WARN
    assert doctor.check_cuda_python(None, False, "jetpack6", True).status == doctor.FAIL
    c = doctor.check_driver(11040, 12060, True)
    assert c.status == doctor.FAIL and "driver supports CUDA 11.4" in c.detail and "CUDA 11.x" in c.fix
    assert doctor.check_driver(12020, 12060, True).status == doctor.WARN  # JetPack 6.0 driver, cuda-python 12.6
    assert doctor.check_driver(12060, 12060, True).status == doctor.OK
    assert doctor.check_driver(None, None, True, "cudaErrorNoDevice").status == doctor.FAIL
    assert doctor.check_driver(None, None, False).status == doctor.SKIP


def _engine_card(trt="10.3.0.30", device=ORIN, dla=None, vc=False):
    card = ModelCard.new(["good", "chip"], resize=(36, 36), crop=(32, 32), crop_mode="ten", kind="engine",
                         precision="fp16")
    key = {"tensorrt": trt, "device": device.name, "board": device.board, "sm_count": device.sm_count,
           "compute_capability": list(device.compute_capability), "dla_core": dla, "version_compatible": vc}
    card.data["provenance"]["engine"] = {"tensorrt": trt, "key": key, "device": device.name, "board": device.board}
    if dla is not None:
        card.data["provenance"]["engine"]["dla"] = {"core": dla}
    return card


def test_engine_card_against_this_device():
    ok = doctor.check_engine("m.engine", _engine_card(), "10.3.0.30", ORIN, 2)
    assert [c.status for c in ok] == [doctor.OK]
    c = doctor.check_engine("m.engine", _engine_card(trt="8.6.2"), "10.3.0.30", ORIN, 2)
    assert c[0].status == doctor.FAIL and "built with TensorRT 8.6.2" in c[0].detail and "build-engine" in c[0].fix
    assert doctor.check_engine("m.engine", _engine_card(trt="8.6.2", vc=True), "10.3.0.30", ORIN, 2)[0].status == doctor.OK
    c = doctor.check_engine("m.engine", _engine_card(), "10.3.0.30", NANO, 0)
    assert c[0].status == doctor.FAIL and "SMs 16 vs here 8" in c[0].detail and "Orin Nano" in c[0].detail
    c = doctor.check_engine("m.engine", _engine_card(dla=1), "10.3.0.30", ORIN, 1)
    assert any("built for DLA core 1; this device has 1" in x.detail for x in c)


def test_service_files_as_the_service_user(tmp_path):
    from nexedge.serve import config as serve_config

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    cfg = serve_config.from_dict({"model": {"path": str(model)}, "store": {"path": str(tmp_path / "s")}})
    got = doctor.check_service(cfg, None, os.path.realpath(os.sys.executable))
    assert got[0].status == doctor.FAIL and "model card" in got[0].detail  # the card is missing
    _engine_card().save_for(str(model))
    got = doctor.check_service(cfg, None, os.path.realpath(os.sys.executable))
    assert [c.status for c in got] == [doctor.OK]
    model.chmod(0o600)  # the unit's User= cannot read a file only its owner reads
    got = doctor.check_service(cfg, "nobody", os.path.realpath(os.sys.executable))
    assert got[0].status == doctor.FAIL and "not readable by user 'nobody'" in got[0].detail


def test_doctor_pins_are_setup_pys():
    """The pins doctor checks are setup.py's, per platform (one source, checked here)."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    src = open(os.path.join(os.path.dirname(__file__), "..", "setup.py"), encoding="utf-8").read()
    v = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.walk(ast.parse(src))
         if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") in ("BASE", "EXTRAS")}
    envs = {"jetpack5": ("aarch64", "3.8"), "jetpack6": ("aarch64", "3.10"), "x86_64": ("x86_64", "3.11")}
    for key, (machine, py) in envs.items():
        env = {"platform_machine": machine, "python_version": py, "python_full_version": py + ".0"}
        pins = {}
        for r in map(Requirement, v["BASE"] + v["EXTRAS"]["trt"]):
            if r.marker is None or r.marker.evaluate(env):
                pins[r.name] = r.specifier
        for name, spec in doctor.PINS[key].items():
            assert SpecifierSet(spec) == pins[name], (key, name)
    assert doctor.TENSORRT_RANGE == (trt_rules.MIN_VERSION, trt_rules.MAX_MAJOR)


def test_run_checks_and_cli_on_this_machine(tmp_path, capsys):
    from nexedge.cli import main

    facts = {"machine": "aarch64", "python": (3, 10), "l4t": (36, 4, 0), "dists": {"nexedge": ("1.0.0", [])},
             "cv2": {"numpy": "2.2.6", "error": "ImportError: numpy.core.multiarray failed to import"},
             "onnxruntime": None, "cuda_python": "13.0.1", "pycuda": False, "trt": "10.3.0",
             "trt_file": "/usr/lib/python3.10/dist-packages/tensorrt/__init__.py", "n_dla": 2,
             "driver": 12060, "runtime": 13000, "device": ORIN}
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    _engine_card(trt="8.6.2").save_for(str(engine))
    checks = doctor.run_checks(facts, str(engine))
    status = {c.name: c.status for c in checks}
    assert status["distribution"] == status["numpy/cv2"] == status["cuda-python"] == status["cuda driver"] == doctor.FAIL
    assert status["onnxruntime"] == doctor.SKIP and status["tensorrt"] == doctor.OK and status["engine m.engine"] == doctor.FAIL
    assert all(c.fix for c in checks if c.status == doctor.FAIL)
    rc = main(["doctor"])
    out = capsys.readouterr().out.splitlines()
    assert rc in (0, 1) and len(out) >= 9 and out[-1].startswith("doctor: ")
    assert all(line.split()[0] in ("ok", "WARN", "FAIL", "skip") for line in out[:-1])


@pytest.mark.parametrize("name", ["README.md"])
def test_doctor_is_documented_in_the_jetson_section(name):
    text = open(os.path.join(os.path.dirname(__file__), "..", name), encoding="utf-8").read()
    jetson = text[text.index("## Deploy on a Jetson"):]
    assert "nexedge doctor" in jetson[: jetson.index("2. **Check and build the engine")]
