"""Shared fixtures and hardware-based skips."""

import importlib.util

import pytest


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _has_cuda() -> bool:
    if not _has("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


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
    """A fake pycuda.driver (per-thread context stacks; tests/_trt_fakes.py) installed for this test."""
    from _trt_fakes import install_fake_pycuda

    return install_fake_pycuda(monkeypatch)
