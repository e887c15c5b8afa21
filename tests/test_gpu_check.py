"""benchmarks/gpu_check.py skips cleanly (exit 0, a "skipped:" line) where TensorRT or a GPU is absent."""

import os
import subprocess
import sys

import pytest

REPO = os.path.join(os.path.dirname(__file__), "..")
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


def _run(extra_path=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (extra_path, os.path.abspath(REPO)) if p))
    return subprocess.run([sys.executable, SCRIPT, "--out", "unused"], capture_output=True, text=True, env=env,
                          timeout=300)


def test_gpu_check_skips_without_tensorrt():
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = _run()
    assert out.returncode == 0 and out.stdout.startswith("gpu_check: skipped: TensorRT is not installed"), out


def test_gpu_check_skips_without_a_gpu_fake_tensorrt(tmp_path):
    """An importable (fake) tensorrt but no CUDA device: still exit 0 with the reason."""
    pytest.importorskip("torch")
    (tmp_path / "tensorrt.py").write_text("__version__ = '10.3.0'\n")
    out = _run(str(tmp_path))
    if "PASS" in out.stdout or "FAIL" in out.stdout:
        pytest.skip("a CUDA device is present")
    assert out.returncode == 0 and out.stdout.startswith("gpu_check: skipped: no usable CUDA device"), out
