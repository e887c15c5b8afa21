"""One --threads option on every computing command, the usable-core default, and OpenMP threads
that sleep instead of spinning (checked in the real libgomp torch loads, through the real CLI)."""

import argparse
import os
import subprocess
import sys

import pytest

from nexedge import threads
from nexedge.cli import build_parser

#: Every command that computes (torch, ONNX Runtime or OpenCV work on images).
COMPUTING = ("train", "eval", "mislabels", "explain", "export", "calibrate", "thresholds", "bench", "demo")


def _subparsers():
    p = build_parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("name", COMPUTING)
def test_every_computing_command_has_the_one_shared_threads_option(name):
    """The one --threads is a global option of ``nexedge`` (given before or after the command); every
    computing command declares that it uses it, and none defines its own."""
    top = build_parser()
    sub = _subparsers()[name]
    assert not [a for a in sub._actions if "--threads" in a.option_strings]
    opts = [a for a in top._actions if "--threads" in a.option_strings]
    assert len(opts) == 1 and opts[0].type is threads._threads_arg and opts[0].default is None
    assert "--threads" in sub.get_default("_globals")
    assert sub.get_default("_threads_torch") in (True, False)
    with pytest.raises(argparse.ArgumentTypeError):
        opts[0].type("0")


def test_threads_zero_is_refused_naming_the_value(capsys):
    from nexedge.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "run", "--data", "d", "--threads", "0"])
    assert "--threads '0': expected a positive whole number" in capsys.readouterr().err


def test_cgroup_quota_v2_and_v1_and_none(tmp_path):
    root = tmp_path / "cg"
    (root / "a" / "b").mkdir(parents=True)
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a/b\n")
    (root / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(str(root), str(proc)) is None
    (root / "a" / "cpu.max").write_text("150000 100000\n")
    (root / "a" / "b" / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(str(root), str(proc)) == pytest.approx(1.5)  # a parent's quota applies
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(str(v1), str(tmp_path / "missing")) == pytest.approx(0.5)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_limit(str(v1), str(tmp_path / "missing")) is None


def test_usable_cores_respects_a_cgroup_quota_below_the_affinity(monkeypatch):
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.5)
    assert threads.usable_cores() == 1
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1000.0)
    assert threads.usable_cores() == len(os.sched_getaffinity(0))


def test_default_threads_takes_omp_num_threads_then_splits_cores_among_local_processes(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    assert threads.default_threads({}) == 8
    assert threads.default_threads({"LOCAL_WORLD_SIZE": "4"}) == 2
    assert threads.default_threads({"LOCAL_WORLD_SIZE": "16"}) == 1
    assert threads.default_threads({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}) == 3
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='zero'"):
        threads.default_threads({"OMP_NUM_THREADS": "zero"})


def test_applied_sets_torch_opencv_and_onnxruntime_then_restores():
    torch = pytest.importorskip("torch")
    import cv2

    from nexedge.runtime.backends.onnxruntime import default_threads, session_options

    torch.set_num_threads(2)
    before_cv2 = cv2.getNumThreads()
    with threads.applied(1, torch=True) as n:
        assert n == 1 and torch.get_num_threads() == 1 and cv2.getNumThreads() == 1
        assert threads.configured() == 1 and default_threads() == 1
        assert session_options().intra_op_num_threads == 1  # every ORT session opened by the command
    assert torch.get_num_threads() == 2 and cv2.getNumThreads() == before_cv2 and threads.configured() is None
    torch.set_num_threads(1)


def test_quiet_openmp_leaves_a_users_wait_policy_alone():
    env = {}
    assert threads.quiet_openmp(env) == threads.QUIET_OPENMP and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.quiet_openmp(env) == {} and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {"GOMP_SPINCOUNT": "1000"}
    threads.quiet_openmp(env)
    assert env["GOMP_SPINCOUNT"] == "1000" and env["OMP_WAIT_POLICY"] == "PASSIVE"


def _libgomp_settings(extra_env):  # the torchrun path: tests/test_ddp.py
    """libgomp's own report (OMP_DISPLAY_ENV) of the wait policy it runs with, in a real `nexedge`
    process whose command imports torch."""
    env = {k: v for k, v in os.environ.items() if k not in threads.QUIET_OPENMP}
    env.update(extra_env, OMP_DISPLAY_ENV="VERBOSE", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-m", "nexedge.cli", "mislabels", "missing-run", "--data", "missing"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert "no such checkpoint" in proc.stderr, proc.stderr[-2000:]
    return proc.stderr


def test_cli_puts_torchs_openmp_threads_to_sleep_before_torch_loads():
    pytest.importorskip("torch")
    if not (threads.openmp_runtime() or "").startswith("libgomp"):
        pytest.skip(f"torch here ships {threads.openmp_runtime()}, not GNU libgomp")
    err = _libgomp_settings({})
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in err and "GOMP_SPINCOUNT = '0'" in err  # libgomp's default: 300000
