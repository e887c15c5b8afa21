"""benchmarks/gpu_check.py skips cleanly (exit 0, a "skipped:" line) where TensorRT or a GPU is absent."""

import os
import subprocess
import sys

import pytest

REPO = os.path.join(os.path.dirname(__file__), "..")
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


def _run(extra_path=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (extra_path, os.path.abspath(REPO)) if p))
    return subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=300)


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


def test_scores_are_compared_in_log_odds_near_the_thresholds():
    """Issue 28 item 4: an FP16 engine that flushes a 3e-8 score to 0 differs from ONNX Runtime by 3e-8 in
    probability (inside any absolute tolerance) but infinitely in log-odds, next to a 5e-8 threshold."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    ref = np.array([1e-12, 3e-8, 7e-8, 0.4, 0.9])
    flushed = np.array([0.0, 0.0, 5.96e-8, 0.4, 0.9])
    res = gc.logodds_near(ref, flushed, [5e-8])
    assert res["flushed"] == 1 and res["max_dlogit_near"] == float("inf") and res["near"] == 2
    assert np.abs(ref - flushed).max() < gc.FP16_LOGIT_TOL  # what the old |dprob| <= 2e-2 check saw: nothing
    close = ref * np.exp([0.0, 0.02, -0.03, 0.0, 0.0])
    res = gc.logodds_near(ref, close, [5e-8])
    assert res["flushed"] == 0 and 0.02 < res["max_dlogit_near"] < 0.04
