"""CPU threads: one ``--threads`` option for every command that computes, applied in one place.

The default is the CPUs this process may use: the affinity mask, lowered to a cgroup CPU quota
where one is set (containers), divided among the processes a launcher such as torchrun started on
this node; an ``OMP_NUM_THREADS`` the user exported wins over that. :func:`applied` hands the
count to torch (intra- and inter-op), OpenCV and every ONNX Runtime session opened while it is
active (:func:`configured`, read by ``nexedge.runtime.backends.onnxruntime.default_threads``).

OpenMP worker threads spin-wait between parallel regions by default. torch ships GNU libgomp
(``torch/lib/libgomp.so.1``), which then keeps each worker busy for about 300,000 spins after
every operator; on a box shared with another job that spinning takes the cores the other job (and
this one's own main thread) needs. :func:`quiet_openmp` asks the OpenMP runtime to sleep instead
(``OMP_WAIT_POLICY=PASSIVE``; ``GOMP_SPINCOUNT`` for libgomp, ``KMP_BLOCKTIME`` for the LLVM/Intel
runtimes other torch builds ship). The runtime reads these once, when torch loads it, so the CLI
calls it before anything imports torch. A wait policy the user exported is left as it is.

Python 3.8 and no torch at import: the daemon's ONNX Runtime backend imports this module.
"""

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import sys
from typing import Dict, Iterator, MutableMapping, Optional

log = logging.getLogger(__name__)

#: OpenMP settings that make idle workers sleep instead of spinning.
QUIET_OPENMP: Dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0", "KMP_BLOCKTIME": "0"}

_configured: Optional[int] = None


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> Optional[float]:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None without one.

    Several levels of the hierarchy may set a quota; the smallest found on this process's own
    cgroup path, walking up to ``root``, applies.
    """
    limits = []
    rel = ""
    try:
        with open(proc_cgroup, encoding="utf-8") as f:
            for line in f:
                parts = line.strip().split(":", 2)
                if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
                    rel = parts[2].strip("/")
    except OSError:
        pass
    dirs = []
    while True:
        dirs.append(os.path.join(root, rel) if rel else root)
        if not rel:
            break
        rel = os.path.dirname(rel)
    for d in dirs:  # cgroup v2
        try:
            with open(os.path.join(d, "cpu.max"), encoding="utf-8") as f:
                quota, _, period = f.read().strip().partition(" ")
        except OSError:
            continue
        if quota != "max" and period:
            limits.append(int(quota) / int(period))
    for d in (os.path.join(root, "cpu"), os.path.join(root, "cpu,cpuacct")):  # cgroup v1
        try:
            with open(os.path.join(d, "cpu.cfs_quota_us"), encoding="utf-8") as f:
                quota_us = int(f.read().strip())
            with open(os.path.join(d, "cpu.cfs_period_us"), encoding="utf-8") as f:
                period_us = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if quota_us > 0 and period_us > 0:
            limits.append(quota_us / period_us)
    return min(limits) if limits else None


def usable_cores() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (rounded up)."""
    try:
        n = len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


def _positive_env(environ: MutableMapping[str, str], name: str) -> Optional[int]:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        n = int(value.split(",")[0])  # OMP_NUM_THREADS may list per-level counts
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a positive whole number of threads") from None
    if n < 1:
        raise ValueError(f"{name}={value!r}: expected a positive whole number of threads")
    return n


def default_threads(environ: Optional[MutableMapping[str, str]] = None) -> int:
    """Threads when ``--threads`` is not given: ``OMP_NUM_THREADS`` if exported, else the usable
    cores divided among the processes of this node (``LOCAL_WORLD_SIZE``, set by torchrun)."""
    env = os.environ if environ is None else environ
    n = _positive_env(env, "OMP_NUM_THREADS")
    if n is not None:
        return n
    procs = _positive_env(env, "LOCAL_WORLD_SIZE") or 1
    return max(1, usable_cores() // procs)


def quiet_openmp(environ: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """Set :data:`QUIET_OPENMP` in ``environ`` unless the user chose a wait policy (``OMP_WAIT_POLICY``,
    e.g. ACTIVE on a dedicated machine); a spin count or block time the user set stays. Returns what
    was set. Takes effect only if torch (its OpenMP runtime) is loaded afterwards in this process, or
    in child processes that inherit the environment.
    """
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env:
        return {}
    added = {k: v for k, v in QUIET_OPENMP.items() if k not in env}
    env.update(added)
    if added and environ is None and "torch" in sys.modules:
        log.debug("torch was imported before the OpenMP wait policy was set; it applies to child processes only")
    return added


def openmp_runtime() -> Optional[str]:
    """File name of the OpenMP runtime torch ships (libgomp, libomp, libiomp5), found without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    try:
        names = sorted(os.listdir(lib))
    except OSError:
        return None
    for stem in ("libgomp", "libiomp5", "libomp"):
        for n in names:
            if n.startswith(stem + ".") or n.startswith(stem + "-"):
                return n
    return None


def _threads_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads {text!r}: expected a positive whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--threads {text!r}: expected a positive whole number")
    return n


def add_threads_option(p: argparse.ArgumentParser, torch: bool = False) -> None:
    """The one ``--threads`` option. ``torch``: the command computes with torch, so the CLI sets
    torch's thread counts before it runs (others set them only if torch is loaded anyway)."""
    p.add_argument("--threads", type=_threads_arg, default=None, metavar="N",
                   help="CPU threads for torch, ONNX Runtime and OpenCV (default: OMP_NUM_THREADS when exported, "
                        f"else the cores this process may use, {usable_cores()} here)")
    p.set_defaults(_threads_torch=torch)


def given(args: argparse.Namespace) -> Optional[int]:
    """``--threads`` as the user gave it (None when defaulted): for options a backend refuses when
    set explicitly (a TensorRT engine has no CPU threads to set)."""
    return args.threads if getattr(args, "_threads_given", True) else None


def configured() -> Optional[int]:
    """The thread count of the command running in this process (None outside :func:`applied`)."""
    return _configured


def _set_torch(n: int) -> int:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError as e:  # fixed once inter-op work ran in this process (a second command in-process)
            log.debug("torch inter-op threads stay %d: %s", torch.get_num_interop_threads(), e)
    return before


@contextlib.contextmanager
def applied(threads: Optional[int], torch: bool = False) -> Iterator[int]:
    """Run a command on ``threads`` CPU threads (None: :func:`default_threads`); yields the count.

    torch's and OpenCV's counts are restored afterwards, so commands run in one process (tests,
    ``nexedge demo``'s stages) do not leak their settings into each other.
    """
    global _configured
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"--threads {n}: expected a positive whole number")
    prev_conf = _configured
    prev_torch = _set_torch(n) if torch or "torch" in sys.modules else None
    import cv2

    prev_cv2 = cv2.getNumThreads()
    cv2.setNumThreads(n)
    _configured = n
    try:
        yield n
    finally:
        _configured = prev_conf
        cv2.setNumThreads(prev_cv2)
        if prev_torch is not None:
            import torch as _torch

            _torch.set_num_threads(prev_torch)
