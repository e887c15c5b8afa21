"""The device side of issue 28, as a Jetson's line install runs it: build-engine --data, thresholds on an
engine, the cascade's center engine, and the example configs starting on each backend.

TensorRT and CUDA are absent here: the engine side runs on the fake TensorRT of tests/support/trt_fakes.py
(its engines execute under ONNX Runtime), in a subprocess that cannot import torch, scikit-learn or
scipy. Every other part is real: exported ONNX models, cards, ZeroMQ sockets, the daemon.
"""

import os
import shutil

import numpy as np
import pytest
import yaml

from nexedge.card import card_path_for, load_card
from nexedge.export import cuda_device
from nexedge.export.trt_build import build_engine
from nexedge.export.trt_rules import BuildOptions
from tests.support.trt_fakes import fake_trt, run_line_install_cli, use_fake_tensorrt

REPO = os.path.join(os.path.dirname(__file__), "..")
INP = {"color": "gray", "resize": [36, 36], "crop": [32, 32], "crop_mode": "ten"}
ORIN = cuda_device.DeviceInfo("Orin", (8, 7), 16, 61, "NVIDIA Jetson AGX Orin Developer Kit")


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """A labelled toy data set, a trained tiny checkpoint, its host-crop ONNX and its in-graph TenCrop ONNX
    exported with --cascade (center-crop stage-1 graph beside it, band measured on ONNX Runtime)."""
    torch = pytest.importorskip("torch")
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.toy import train_toy_checkpoint, write_toy_dataset

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("line")
    data = write_toy_dataset(str(folder / "data"), INP, {"val": 36})
    ck = train_toy_checkpoint(str(folder / "m.pt"), inp=dict(INP), steps=20)
    ten = export_onnx(ck, crops="ten", max_batch=8, parity_images=2, threads=1, data=data, cascade=True).path
    host = export_onnx(ck, crops="host", max_batch=8, parity_images=2, threads=1, data=data).path
    return {"data": data, "ten": ten, "host": host, "folder": str(folder)}


def _copy(src, dst_dir):
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, os.path.basename(src))
    shutil.copy(src, dst)
    shutil.copy(card_path_for(src), card_path_for(dst))
    return dst


def test_build_engine_data_measures_the_engine_and_its_center_engine_on_the_line_install_fake_tensorrt(
        line, tmp_path):
    """Items 5 and 6: `build-engine --data` on a line install (no torch/scikit-learn/scipy) measures the
    engine's operating points on the engine, builds the cascade's center engine and measures the band on
    the pair; `thresholds ENGINE --data` runs there too. The engine card then passes `line load`'s check."""
    models = str(tmp_path / "models")
    ten = _copy(line["ten"], models)
    _copy(line["ten"].replace(".ten.onnx", ".center.onnx"), models)
    out = str(tmp_path / "engines")
    r = run_line_install_cli(["build-engine", ten, "--data", line["data"], "--out-dir", out, "--precision", "fp16"])
    assert r.returncode == 0, r.stderr
    engines = sorted(f for f in os.listdir(out) if f.endswith(".engine"))
    assert len(engines) == 2 and any(".center-" in f for f in engines), engines
    path = os.path.join(out, next(f for f in engines if ".ten-" in f))
    card = load_card(path)
    src = card.ops_source
    assert src["status"] == "measured" and src["backend"] == "tensorrt" and src["artifact_sha256"] == card.sha256
    sec = card.data["cascade"]
    assert sec["status"] == "measured" and ".center-" in sec["stage1"]["file"]
    assert sec["stage1"]["sha256"] == load_card(os.path.join(out, sec["stage1"]["file"])).sha256
    assert '"cascade": {"status": "measured"' in r.stdout

    from nexedge.serve import config as serve_config
    from nexedge.serve.lifecycle import check_compatible

    class Be:
        max_batch, crop_mode = 8, "ten"

    check_compatible(load_card(line["ten"]), card, Be(), serve_config.from_dict({"model": {"path": line["ten"]}}))

    r2 = run_line_install_cli(["thresholds", path, "--data", line["data"]])
    assert r2.returncode == 0, r2.stderr
    assert "wrote" in r2.stdout and "cascade (measured" in r2.stdout


def test_build_engine_data_that_cannot_be_measured_exits_3_with_a_clear_card_fake_tensorrt(line, tmp_path):
    """Item 5: the engine is written, its card says the operating points are the ONNX model's and why,
    and the exit status (3, not 1) and message say how to measure them."""
    models = str(tmp_path / "models")
    host = _copy(line["host"], models)
    bad = tmp_path / "bad" / "val" / "unknown-class"
    bad.mkdir(parents=True)
    shutil.copy(os.path.join(line["data"], "val", "good", sorted(os.listdir(os.path.join(line["data"], "val",
                                                                                         "good")))[0]), bad)
    out = str(tmp_path / "engines")
    r = run_line_install_cli(["build-engine", host, "--data", str(tmp_path / "bad"), "--out-dir", out])
    assert r.returncode == 3, (r.returncode, r.stderr)
    path = os.path.join(out, next(f for f in os.listdir(out) if f.endswith(".engine")))
    src = load_card(path).ops_source
    assert src["status"] == "from_parent" and "unknown-class" in src["not_measured_reason"]
    assert f"nexedge thresholds {path} --data ROOT" in r.stderr


def _example_config(name, model, tmp_path):
    """deploy/NAME as written, except what cannot be on a test machine: the model, ports and folders."""
    with open(os.path.join(REPO, "deploy", name), encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    raw["model"]["path"] = model
    raw["sockets"].update(frames="tcp://127.0.0.1:*", verdicts="tcp://127.0.0.1:*")
    if raw.get("metrics"):
        raw["metrics"]["port"] = 0
    if raw.get("store"):
        raw["store"]["path"] = str(tmp_path / "samples")
    if raw.get("pull"):
        raw["pull"]["bind"] = "tcp://127.0.0.1:*"
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path), raw


def _is_prometheus_rules(name):
    with open(os.path.join(REPO, "deploy", name), encoding="utf-8") as f:
        return "groups" in (yaml.safe_load(f) or {})


# the daemon's example configs (deploy/alerts.yaml is Prometheus alert rules, not a daemon config)
EXAMPLES = sorted(f for f in os.listdir(os.path.join(REPO, "deploy")) if f.endswith(".yaml") and not _is_prometheus_rules(f))


def test_example_configs_are_the_packaged_ones():
    for name in EXAMPLES:
        packaged = os.path.join(REPO, "nexedge", "serve", name)
        if os.path.exists(packaged):
            assert open(packaged).read() == open(os.path.join(REPO, "deploy", name)).read(), name


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt-fake"])
def test_example_config_checks_and_starts_on_each_backend_with_fake_tensorrt(name, backend, line, tmp_path,
                                                                            monkeypatch, capsys):
    """Item 3: the example config, as written, passes --check-config and starts the daemon on an ONNX model
    (ONNX Runtime) and on an engine (the fake TensorRT); one frame gets a verdict from it."""
    from nexedge.serve.client import CameraClient
    from nexedge.serve.daemon import main as daemon_main

    model = line["host"]
    if backend == "tensorrt-fake":
        trt, calls = fake_trt("10.3.0.30")
        use_fake_tensorrt(monkeypatch, trt)
        model, _ = build_engine(line["host"], BuildOptions(precision="fp16"), out_dir=str(tmp_path), trt=trt,
                                device=ORIN, data=line["data"])
    cfg_path, raw = _example_config(name, model, tmp_path)
    assert daemon_main(["--config", cfg_path, "--check-config"]) == 0, capsys.readouterr().err
    from tests.support.daemon import running_config

    raw["logging"]["level"] = "WARNING"
    with running_config(raw) as d:
        with CameraClient(d.endpoints["frames"], "cam1") as cam:
            v = cam.infer(np.full((36, 36), 120, np.uint8), timeout_ms=20000)
    assert v["decision"] in ("PASS", "REJECT") and v["score"] is not None, v
    if backend == "tensorrt-fake":
        assert calls["executions"] >= 1


def test_line_load_of_an_engine_on_an_onnx_line_uses_the_engine_options_with_fake_tensorrt(line, tmp_path,
                                                                                          monkeypatch):
    """Item 3: `nexedge line load x.engine` on a line configured for ONNX Runtime opens the engine with its
    own options section; flat ONNX Runtime options name the problem instead of a TypeError."""
    from tests.support.daemon import base_config, running_config

    trt, _ = fake_trt("10.3.0.30")
    use_fake_tensorrt(monkeypatch, trt)
    engine, _ = build_engine(line["host"], BuildOptions(precision="fp16"), out_dir=str(tmp_path), trt=trt,
                             device=ORIN, data=line["data"])
    per_backend = {"onnxruntime": {"intra_threads": 1}, "tensorrt": {"device": 0}}
    cfg = base_config(line["host"], lifecycle={"max_models": 3})
    cfg["model"]["options"] = per_backend
    with running_config(cfg) as d:
        status = d.models.load(engine, who="test")
        assert status["candidate"]["path"].endswith(".engine")
    from nexedge.serve.lifecycle import LifecycleError

    flat = base_config(line["host"], lifecycle={"max_models": 3})  # options: {intra_threads: 1}
    with running_config(flat) as d:
        with pytest.raises(LifecycleError, match=r"model.options.intra_threads: not an option of the tensorrt "
                                                 r"backend \(it takes device, max_batch, verify\).*under their names"):
            d.models.load(engine, who="test")


def test_dla_core_is_set_on_the_runtime_before_deserializing_with_fake_tensorrt(line, tmp_path, monkeypatch):
    """Item 7: a DLA core 1 engine ran on core 0: IRuntime.DLA_core must be set before
    deserialize_cuda_engine. A core the device lacks is refused by name."""
    from nexedge.runtime import ArtifactIncompatible, open_backend

    trt, calls = fake_trt("8.6.2")
    use_fake_tensorrt(monkeypatch, trt)
    path, _ = build_engine(line["host"], BuildOptions(precision="fp16", dla_core=1, max_batch=2),
                           out_dir=str(tmp_path), trt=trt, device=ORIN)
    with open_backend(path) as be:
        be.infer(np.zeros((2, 36, 36, 1), np.uint8))
    assert calls["deserialize_dla_core"] == 1 and calls["engine_dla_core"] == 1
    one, _ = fake_trt("8.6.2", dla_cores=1)
    use_fake_tensorrt(monkeypatch, one)
    with pytest.raises(ArtifactIncompatible, match="built for DLA core 1; this device has 1 DLA core"):
        open_backend(path)


def test_engine_from_another_tensorrt_exits_78_and_the_unit_does_not_restart_it_fake_tensorrt(line, tmp_path,
                                                                                              monkeypatch):
    """Item 7: after a TensorRT upgrade the engine does not deserialize; the daemon said so with exit 1 and
    systemd restarted it every 2 s forever. Now a clear error, exit 78, and the unit does not restart on it."""
    import configparser

    from nexedge.runtime import ArtifactIncompatible, open_backend
    from nexedge.serve import daemon

    old, _ = fake_trt("8.6.2")
    use_fake_tensorrt(monkeypatch, old)
    path, _ = build_engine(line["host"], BuildOptions(precision="fp16"), out_dir=str(tmp_path), trt=old,
                           device=ORIN)
    new, calls = fake_trt("10.3.0.30")
    use_fake_tensorrt(monkeypatch, new)
    with pytest.raises(ArtifactIncompatible, match=r"built with TensorRT 8.6.2; this machine has TensorRT 10.3.0.30.*"
                                                   r"Rebuild it here: nexedge build-engine"):
        open_backend(path)
    card = load_card(path)  # a card that does not say: TensorRT itself refuses the plan (returns None)
    card.data["provenance"]["engine"]["tensorrt"] = None
    card.save_for(path)
    with pytest.raises(ArtifactIncompatible, match="could not deserialize the engine.*rebuild it here"):
        open_backend(path)
    cfg = tmp_path / "line.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": path}, "metrics": False,
                                   "sockets": {"frames": "tcp://127.0.0.1:*", "verdicts": "tcp://127.0.0.1:*"}}))
    assert daemon.main(["--config", str(cfg)]) == daemon.EXIT_INCOMPATIBLE == 78

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(os.path.join(REPO, "deploy", "nexedge-daemon.service"))
    assert {str(daemon.EXIT_CONFIG), str(daemon.EXIT_INCOMPATIBLE)} <= set(
        unit["Service"]["RestartPreventExitStatus"].split())
    assert int(unit["Unit"]["StartLimitBurst"]) >= 1 and int(unit["Unit"]["StartLimitIntervalSec"]) >= \
        int(unit["Unit"]["StartLimitBurst"]) * int(unit["Service"]["RestartSec"])
