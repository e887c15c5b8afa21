"""Record the machine a benchmark ran on, so numbers are never quoted without it.

CPU model, cores (online and usable by this process), thread settings, load
average, library versions, and on a Jetson the L4T release, the nvpmodel power
mode and whether the clocks are locked (``jetson_clocks``). Every probe is
best-effort and says ``None`` rather than guessing; ``root`` lets tests point
the sysfs/procfs reads at a fake tree.

Python 3.8, no torch import (torch's version is read from package metadata).
"""

import glob
import os
import platform
import re
import shutil
import subprocess
from typing import Any, Dict, List, Optional

#: (name, distribution names) of the libraries a result depends on besides the backends' own
#: (each backend's spec names its distributions: nexedge.runtime.registry.version).
LIBRARIES = (
    ("numpy", ("numpy",)),
    ("onnx", ("onnx",)),
    ("opencv", ("opencv-python-headless", "opencv-python", "opencv-contrib-python")),
    ("pyzmq", ("pyzmq",)),
)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_NUM_THREADS")


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _version(dists) -> Optional[str]:  # type: ignore[no-untyped-def]
    try:
        from importlib import metadata  # Python 3.8+
    except ImportError:  # pragma: no cover
        return None
    for name in dists:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def library_versions() -> Dict[str, Optional[str]]:
    """Installed versions (None where missing). OpenCV falls back to ``cv2.__version__``
    because JetPack's OpenCV comes from apt, not pip."""
    from nexedge.runtime import registry

    out = {key: _version(dists) for key, dists in LIBRARIES}
    out.update((name, registry.version(spec)) for name, spec in registry.backends().items())
    if out["opencv"] is None:
        try:
            import cv2

            out["opencv"] = cv2.__version__
        except ImportError:
            pass
    return out


def cpu_model(root: str = "/") -> Optional[str]:
    """CPU model name from /proc/cpuinfo (x86 ``model name``; ARM ``Hardware`` or the
    device-tree model), else ``platform.processor()``."""
    text = _read(os.path.join(root, "proc/cpuinfo")) or ""
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        m = re.search(rf"^{re.escape(key)}\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            return m.group(1).strip()
    dt = _read(os.path.join(root, "proc/device-tree/model"))
    if dt:
        return dt.strip("\x00\n ")
    return platform.processor() or None


def usable_cores() -> int:
    """CPUs this process may use (affinity, cgroup quota): :func:`nexedge.threads.usable_cores`."""
    from nexedge.threads import usable_cores as cores

    return cores()


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _run(cmd: List[str], timeout: float = 5.0) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.decode("utf-8", "replace").strip() if p.returncode == 0 else None


def parse_l4t_release(text: str) -> Optional[str]:
    """``# R35 (release), REVISION: 4.1, ...`` -> ``35.4.1``."""
    m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def parse_nvpmodel(text: str) -> Optional[str]:
    """``nvpmodel -q`` output -> ``"MAXN (mode 0)"``; the mode name line then its number."""
    name = re.search(r"NV Power Mode:\s*(\S+)", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    number = lines[-1] if lines and lines[-1].isdigit() else None
    if name is None:
        return None
    return name.group(1) + (f" (mode {number})" if number is not None else "")


def _min_max_locked(folder: str, min_name: str, max_name: str) -> Optional[bool]:
    lo, hi = _read(os.path.join(folder, min_name)), _read(os.path.join(folder, max_name))
    if lo is None or hi is None:
        return None
    try:
        return int(lo.strip()) == int(hi.strip())
    except ValueError:
        return None


def clocks_locked(root: str = "/") -> Dict[str, Optional[bool]]:
    """Whether CPU and GPU clocks are pinned (min == max), as ``jetson_clocks`` leaves them.

    CPU: every ``cpufreq`` policy's scaling_min_freq == scaling_max_freq. GPU:
    the devfreq node of the GPU (``*gpu*`` or ``17000000.ga10b``/``.gv11b``/``.gp10b``).
    None where the node is absent or unreadable.
    """
    cpu_states = []
    for pol in sorted(glob.glob(os.path.join(root, "sys/devices/system/cpu/cpufreq/policy*"))):
        cpu_states.append(_min_max_locked(pol, "scaling_min_freq", "scaling_max_freq"))
    cpu = None if not cpu_states or None in cpu_states else all(cpu_states)
    gpu = None
    for node in sorted(glob.glob(os.path.join(root, "sys/class/devfreq/*"))):
        base = os.path.basename(node)
        if "gpu" in base or base.split(".")[-1] in ("ga10b", "gv11b", "gp10b", "gb10b"):
            gpu = _min_max_locked(node, "min_freq", "max_freq")
            break
    return {"cpu": cpu, "gpu": gpu}


def jetson_info(root: str = "/") -> Optional[Dict[str, Any]]:
    """L4T release, power mode and clock state; None when this is not a Jetson."""
    rel = _read(os.path.join(root, "etc/nv_tegra_release"))
    if rel is None:
        return None
    info: Dict[str, Any] = {"l4t": parse_l4t_release(rel)}
    model = _read(os.path.join(root, "proc/device-tree/model"))
    info["model"] = model.strip("\x00\n ") if model else None
    q = _run(["nvpmodel", "-q"]) if root == "/" else None
    info["power_mode"] = parse_nvpmodel(q) if q else None
    locks = clocks_locked(root)
    show = _run(["jetson_clocks", "--show"]) if root == "/" else None
    info["clocks_locked"] = locks
    info["jetson_clocks_show"] = show.splitlines()[:12] if show else None
    return info


def gpu_name() -> Optional[str]:
    """First NVIDIA GPU from nvidia-smi (desktop/server); None when absent."""
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def capture(threads: Optional[int] = None, root: str = "/") -> Dict[str, Any]:
    """Everything above as one JSON-ready dict."""
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu": cpu_model(root),
        "cores_online": os.cpu_count(),
        "cores_usable": usable_cores(),
        "threads_requested": threads,
        "thread_env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ},
        "load_average": load_average(),
        "libraries": library_versions(),
        "gpu": gpu_name(),
        "jetson": jetson_info(root),
    }


def one_line(env: Dict[str, Any]) -> str:
    """Short human summary: ``AMD EPYC, 2/2 cores, x86_64, load 0.5 0.4 0.2, ort 1.32.0``."""
    libs = env.get("libraries") or {}
    parts = [
        env.get("cpu") or "unknown CPU",
        "{}/{} cores".format(env.get("cores_usable"), env.get("cores_online")),
        env.get("machine") or "?",
    ]
    if env.get("load_average"):
        parts.append("load " + " ".join(str(x) for x in env["load_average"]))
    if env.get("gpu"):
        parts.append("GPU " + env["gpu"])
    jet = env.get("jetson")
    if jet:
        locked = (jet.get("clocks_locked") or {})
        parts.append("L4T {} {} clocks {}".format(
            jet.get("l4t"), jet.get("power_mode") or "mode ?",
            "locked" if locked.get("cpu") and locked.get("gpu") else "NOT locked"))
    from nexedge.runtime.registry import backend_names

    for key in backend_names() + ("numpy",):
        if libs.get(key):
            parts.append(f"{key} {libs[key]}")
    return ", ".join(parts)
