"""Shared fixtures, hardware-based skips and the settings for parallel runs (pytest-xdist)."""

import importlib.util
import os
import sys

import pytest

from tests.support import shared as sh

#: At most this many xdist workers for ``-n auto``: the daemon tests time their own threads, and
#: more workers than cores only make each one slower.
MAX_WORKERS = 4


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _has_cuda() -> bool:
    if not _has("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per usable core, at most :data:`MAX_WORKERS`."""
    return max(1, min(MAX_WORKERS, _usable_cores()))


def _under_xdist() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


def pytest_configure(config):
    # Each xdist worker gets one core's worth of threads (torch, OpenMP, ONNX Runtime through
    # nexedge.threads), so N workers on N cores do not oversubscribe them. Set before any test
    # module imports torch, which reads OMP_NUM_THREADS once.
    if _under_xdist():
        os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_torch_thread_per_worker():
    """Under xdist, undo a test's ``torch.set_num_threads(n)`` so it does not leak into the next one."""
    yield
    if _under_xdist() and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """``shared(key, build)``: ``build(folder)`` once per run, its (JSON) result shared by every test
    file and xdist worker (tests/support/shared.py). Do not change what it returns: copy it first."""
    root = sh.run_folder(tmp_path_factory)
    return lambda key, build: sh.once(root, key, build)


@pytest.fixture(scope="session")
def untrained_export(shared):
    """``get(arch, flavour, int8=False)`` -> {"checkpoint", "fp32"[, "int8"]}: ``arch`` with random
    weights at the smallest input every architecture takes, exported in ``flavour`` (parity-checked)
    and, with ``int8``, quantized with TensorRT Q/DQ; each once per run (test_export, test_trt_compat)."""

    def get(arch, flavour, int8=False):
        ckpt = shared(f"untrained-{arch}", lambda d: sh.untrained_checkpoint(os.path.join(d, f"{arch}.pt"), arch))
        out = {"checkpoint": ckpt, "fp32": shared(
            f"export-{arch}-{flavour}",
            lambda d: sh.export_untrained(ckpt, os.path.join(d, f"{arch}.{flavour}.onnx"), flavour))}
        if int8:
            out["int8"] = shared(f"int8-{arch}-{flavour}", lambda d: sh.quantize_for_tensorrt(out["fp32"]))
        return out

    return get


def pytest_collection_modifyitems(config, items):
    skip_trt = pytest.mark.skip(reason="TensorRT is not installed on this machine")
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU on this machine")
    has_trt, has_gpu = _has("tensorrt"), _has_cuda()
    for item in items:
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(skip_trt)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture
def pycuda_fake(monkeypatch):
    """A fake pycuda.driver (per-thread context stacks; tests/support/trt_fakes.py) installed for this test."""
    from tests.support.trt_fakes import install_fake_pycuda

    return install_fake_pycuda(monkeypatch)
