"""Shared fixtures, hardware-based skips and the settings for parallel runs (pytest-xdist)."""

import importlib.util
import os
import sys

import pytest

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


def pytest_collection_modifyitems(config, items):
    skip_trt = pytest.mark.skip(reason="TensorRT is not installed on this machine")
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU on this machine")
    has_trt, has_gpu = _has("tensorrt"), _has_cuda()
    for item in items:
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(skip_trt)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
