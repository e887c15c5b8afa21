"""nexedge.runtime.registry: each backend declares its options; configs and CLIs are checked against the
backend that will open the file (issue 28 item 3)."""

import argparse
import importlib
import os
import re

import numpy as np
import pytest

from nexedge.runtime import registry


def test_each_backend_declares_suffixes_and_options():
    assert {"onnxruntime", "tensorrt", "torch"} <= set(registry.backend_names())  # + any backend added since
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

    known = ", ".join(registry.backend_names())  # onnxruntime, tensorrt, torch (+ any backend added since)
    assert {"onnxruntime", "tensorrt", "torch"} <= set(known.split(", "))
    with pytest.raises(ValueError, match=rf"unknown backend 'tflite'; expected one of {known}$"):
        backend_kwargs("tflite", None, None, None)
    with pytest.raises(ValueError, match="unknown backend 'tflite'"):
        registry.validate_options("tflite", {})
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
    from nexedge.serve import config as serve_config
    from nexedge.serve.daemon import main

    with pytest.raises(serve_config.ConfigError, match=r"model.options.intra_threads: not an option of the tensorrt backend"):
        serve_config.from_dict({"model": {"path": "/opt/m.engine", "options": {"intra_threads": 2}}})
    cfg = tmp_path / "line.yaml"
    cfg.write_text("model:\n  path: m.engine\n  options: {intra_threads: 2}\n")
    assert main(["--config", str(cfg), "--check-config"]) == 2
    assert "not an option of the tensorrt backend" in capsys.readouterr().err
    serve_config.from_dict({"model": {"path": "/opt/m.engine", "options": {"onnxruntime": {"intra_threads": 2},
                                                                "tensorrt": {"device": 0}}}})


def test_open_backend_names_a_wrong_option_before_opening(tmp_path):
    from nexedge.runtime import open_backend

    p = tmp_path / "m.onnx"
    p.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"options.threads: not an option of the onnxruntime backend \(it takes "
                                         r"intra_threads, inter_threads, providers, max_batch, crop_mode, verify\)"):
        open_backend(str(p), threads=2)


# -- discovery: a backend is its module in nexedge/runtime/backends/ ---------------------------------
BACKENDS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nexedge", "runtime",
                            "backends")


def test_every_module_in_the_backends_package_is_a_discovered_backend():
    """No hand-kept list: the registry's backends are exactly the modules of nexedge/runtime/backends/,
    each named after its module, with a backend class of that name."""
    from nexedge.runtime.base import Backend

    modules = sorted(f[:-3] for f in os.listdir(BACKENDS_DIR) if f.endswith(".py") and not f.startswith("_"))
    assert list(registry.backend_names()) == modules
    for name, spec in registry.backends().items():
        assert spec.module == f"nexedge.runtime.backends.{name}"
        cls = getattr(importlib.import_module(spec.module), spec.factory)
        assert issubclass(cls, Backend) and cls.name == name
        assert spec.summary and spec.requires and spec.packages, name


# A backend for .onnx files under another name: ONNX Runtime, opened only when chosen by name. It stands
# for any second backend of an existing suffix (OpenVINO running .onnx); nothing else names it.
_ALT = '''
from nexedge.runtime.backends.onnxruntime import OnnxRuntimeBackend
from nexedge.runtime.registry import MAX_BATCH, VERIFY, BackendSpec, Option

SPEC = BackendSpec("onnxalt", (), "AltBackend", (
    Option("intra_threads", (int,), None, "threads", flag="--threads"), MAX_BATCH, VERIFY),
    internal=("card",), also_opens=(".onnx",), requires=("onnxruntime",), packages=("onnxruntime",),
    summary="ONNX Runtime under another name", hint="bench an .onnx file")


class AltBackend(OnnxRuntimeBackend):
    name = "onnxalt"
'''


def _package(root, name, modules):
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for mod, text in modules.items():
        (pkg / f"{mod}.py").write_text(text)
    return name


@pytest.fixture()
def alt_backend(tmp_path, monkeypatch):
    """The registry with the backends of nexedge/runtime/backends/ plus ``onnxalt`` from a package of its own."""
    monkeypatch.syspath_prepend(str(tmp_path))
    found = dict(registry.backends())
    found.update(registry.discover(_package(tmp_path, "altbackends", {"onnxalt": _ALT})))
    monkeypatch.setattr(registry, "_FOUND", found)
    return found["onnxalt"]


def test_a_backend_module_with_a_spec_reaches_every_consumer(alt_backend, tmp_path, capsys):
    """--backend choices and help, the hint, config validation (model.backend, model.options),
    --check-config, the daemon's open and the machine report all follow from the module's SPEC."""
    import onnxruntime

    from nexedge.bench import env, runner
    from nexedge.bench.cli import configure_bench
    from nexedge.runtime import open_backend
    from nexedge.serve import config as serve_config
    from nexedge.serve import slots
    from nexedge.serve.daemon import build_parser
    from nexedge.serve.daemon import main as daemon_main
    from tests.support.daemon import build_tiny_onnx

    p = argparse.ArgumentParser()
    configure_bench(p)
    backend = next(a for a in p._actions if "--backend" in a.option_strings)
    assert "onnxalt" in backend.choices and "ONNX Runtime under another name" in p.format_help()
    assert re.search(r"onnxalt +by name: \.onnx: ONNX Runtime under another name", build_parser().format_help())
    assert registry.backend_for("m.onnx").name == "onnxruntime"  # auto: the suffix's own backend
    assert runner.resolve_backend("m.onnx", "onnxalt") == "onnxalt"
    with pytest.raises(ValueError, match=r"--backend onnxalt cannot run m.engine \(a tensorrt artifact\); bench an "
                                         r"\.onnx file"):
        runner.resolve_backend("m.engine", "onnxalt")
    assert runner.backend_kwargs("onnxalt", 2, None, None) == {"intra_threads": 2}

    serve_config.from_dict({"model": {"path": "/opt/m.onnx", "backend": "onnxalt", "options": {"intra_threads": 2}}})
    with pytest.raises(serve_config.ConfigError, match=r"model.backend: the onnxalt backend cannot run '/opt/m.engine'; it "
                                            r"opens .onnx files"):
        serve_config.from_dict({"model": {"path": "/opt/m.engine", "backend": "onnxalt"}})
    with pytest.raises(serve_config.ConfigError, match=r"model.options.providers: not an option of the onnxalt backend \(it "
                                            r"takes intra_threads, max_batch, verify\)"):
        serve_config.from_dict({"model": {"path": "/opt/m.onnx", "backend": "onnxalt", "options": {"providers": "cpu"}}})

    model = build_tiny_onnx(str(tmp_path))
    cfg = tmp_path / "line.yaml"
    cfg.write_text(f"model: {{path: {model}, backend: onnxalt, options: {{onnxalt: {{intra_threads: 1}}}}}}\n")
    assert daemon_main(["--config", str(cfg), "--check-config"]) == 0
    assert "model.path runs on the onnxalt backend (model.backend) with options {'intra_threads': 1}" \
        in capsys.readouterr().err
    with open_backend(model, "onnxalt", intra_threads=1) as be:
        assert type(be).__name__ == "AltBackend" and be.infer(np.zeros((2, 32, 32, 1), np.uint8)).probs.shape == (2, 3)
    line = serve_config.from_dict({"model": {"path": model, "backend": "onnxalt", "warmup": 0}})
    slot = slots.open_slot(line, model, "test")  # how the daemon and `nexedge line load` open a model
    try:
        assert type(slot.backend).__name__ == "AltBackend"
    finally:
        slot.close()
    assert env.library_versions()["onnxalt"] == onnxruntime.__version__


def test_model_backend_key_is_validated(tmp_path, capsys):
    from nexedge.serve import config as serve_config
    from nexedge.serve.daemon import main as daemon_main

    assert serve_config.from_dict({"model": {"path": "/opt/m.engine"}}).model.backend == "auto"
    serve_config.from_dict({"model": {"path": "/opt/m.engine", "backend": "tensorrt"}})
    with pytest.raises(serve_config.ConfigError, match=r"model.backend: unknown backend 'tflite'; expected auto or one of "
                                            r"onnxruntime, "):
        serve_config.from_dict({"model": {"path": "/opt/m.onnx", "backend": "tflite"}})
    with pytest.raises(serve_config.ConfigError, match=r"model.backend: the torch backend cannot run '/opt/m.onnx'; it opens "
                                            r".pt, .pth files"):
        serve_config.from_dict({"model": {"path": "/opt/m.onnx", "backend": "torch"}})
    with pytest.raises(serve_config.ConfigError, match=r"model.options.device: not an option of the onnxruntime backend"):
        serve_config.from_dict({"model": {"path": "/opt/m.onnx", "backend": "onnxruntime", "options": {"device": 0}}})
    cfg = tmp_path / "line.yaml"
    cfg.write_text("model: {path: m.engine, backend: onnxruntime}\n")
    assert daemon_main(["--config", str(cfg), "--check-config"]) == 2
    assert "model.backend: the onnxruntime backend cannot run" in capsys.readouterr().err


def test_discovery_refuses_a_module_without_a_spec_or_class_a_misnamed_one_and_a_shared_suffix(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"nospec.helper: a backend module must declare SPEC = BackendSpec"):
        registry.discover(_package(tmp_path, "nospec", {"helper": "X = 1\n"}))
    with pytest.raises(ValueError, match=r"SPEC.name 'onnxalt' differs from its module name 'other'"):
        registry.discover(_package(tmp_path, "misnamed", {"other": _ALT}))
    with pytest.raises(ValueError, match=r"noclass.onnxalt: SPEC.factory 'AltBackend' is not a class of that module"):
        registry.discover(_package(tmp_path, "noclass", {"onnxalt": _ALT.replace("class AltBackend", "class Other")}))
    twice = _ALT.replace('"onnxalt", ()', '"onnxalt", (".onnx",)')
    with pytest.raises(ValueError, match=r"suffix '.onnx' is opened by default by the onnxalt backend already; list "
                                         r"it in also_opens"):
        registry.discover(_package(tmp_path, "twice", {"onnxalt": twice, "onnxalu": twice.replace("onnxalt", "onnxalu")}))
    assert registry.missing("onnxruntime") is None


def test_load_probe_preloads_the_chosen_backends_library_and_caps_only_cpu_models(alt_backend):
    """The probe imports what the spec's ``preload`` names and asks the spec's ``cpu_only`` function,
    with that backend's options (per-backend sections included)."""
    from nexedge.serve.loadprobe import preload

    assert preload("/opt/m.onnx", {"options": {"onnxruntime": {"providers": "cpu"}}}) is True
    assert preload("/opt/m.onnx", {"options": {"providers": "cpu"}}) is True
    assert preload("/opt/m.onnx", {"options": {"providers": "no-such-provider"}}) is False
    assert preload("/opt/m.onnx", {"backend": "onnxalt"}) is False  # its spec declares no cpu_only check
    assert preload("/opt/m.engine", {"backend": "onnxalt"}) is False  # cannot open it: the open says why
    assert preload("/opt/m.pt", {}) is False


def test_discovery_and_the_generated_help_import_no_backend_library():
    import subprocess
    import sys

    code = ("import sys, nexedge.runtime.registry as r; r.backends(); import nexedge.serve.daemon as d; "
            "d.build_parser(); import nexedge.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('onnxruntime', 'tensorrt', 'torch', 'cuda') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
