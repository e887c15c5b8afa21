"""``nexedge doctor``: check a line machine (a Jetson above all) before the daemon's first start.

One line per check, ``ok`` / ``WARN`` / ``FAIL`` / ``skip``, each failure with its fix: Python for
the JetPack, the numpy that JetPack's OpenCV needs (``cv2`` imported in a child process, so a
crash is reported, not suffered), ONNX Runtime, TensorRT and cuda-python against the pins, the
driver's CUDA against cuda-python's, the DLA cores, and with ``--config``/``--engine`` the engine's
TensorRT version, device and DLA core against its card and the service user's access to the
files. Exit 1 when any check fails.

Each check is a function of what it inspects (versions, texts, cards), so it is unit-tested
without a Jetson; :func:`probe` gathers those facts on the machine. Python 3.8, no torch.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from nexedge.cliopts import uses_globals

OK, WARN, FAIL, SKIP = "ok", "WARN", "FAIL", "skip"

#: JetPack by L4T release (/etc/nv_tegra_release): (JetPack, Python, TensorRT major.minor, CUDA).
JETPACKS = {
    (35,): ("5.1", "3.8", "8.5", "11.4"),
    (36, 3): ("6.0", "3.10", "8.6", "12.2"),
    (36, 4): ("6.1/6.2", "3.10", "10.3", "12.6"),
}
#: The pins of setup.py (base and ``trt`` extra) per platform; tests/test_doctor.py checks they agree.
PINS = {
    "jetpack5": {"numpy": ">=1.19,<2", "cuda-python": ">=11.5,<12", "onnxruntime": ">=1.12"},
    "jetpack6": {"numpy": ">=1.19,<2", "cuda-python": ">=12.6,<12.7", "onnxruntime": ">=1.12"},
    "x86_64": {"numpy": ">=1.19", "cuda-python": ">=12,<13", "tensorrt": ">=10,<11", "onnxruntime": ">=1.12"},
}
TENSORRT_RANGE = ((8, 5), 10)  # nexedge.export.trt_rules.MIN_VERSION, MAX_MAJOR
FIX_NUMPY = 'pip install "numpy>=1.19,<2"  (JetPack\'s OpenCV is built against numpy 1.x)'


class Check(NamedTuple):
    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.detail}" + (f"  -> fix: {self.fix}" if self.fix else "")


# -- facts ------------------------------------------------------------------------------
def parse_l4t(text: str) -> Optional[Tuple[int, ...]]:
    """``# R36 (release), REVISION: 4.0, ...`` -> (36, 4, 0); None when it is not an L4T release file."""
    import re

    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def jetpack_of(l4t: Optional[Tuple[int, ...]]) -> Optional[Tuple[str, str, str, str]]:
    """(JetPack, Python, TensorRT, CUDA) of an L4T release, None when unknown or not a Jetson."""
    if not l4t:
        return None
    return JETPACKS.get(tuple(l4t[:2])) or JETPACKS.get(tuple(l4t[:1]))


def platform_key(machine: str, jetpack: Optional[Tuple[str, str, str, str]]) -> str:
    if jetpack is not None:
        return "jetpack5" if jetpack[0].startswith("5") else "jetpack6"
    return "x86_64" if machine == "x86_64" else machine


def in_spec(version: str, spec: str) -> bool:
    """``version`` within a pip specifier such as ``>=12.6,<12.7`` (packaging, else pip's copy of it)."""
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # a --system-site-packages venv may lack it; pip carries one
        from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]
    return SpecifierSet(spec).contains(version, prereleases=True)


# -- checks ------------------------------------------------------------------------------
def check_python(version: Tuple[int, int], jetpack: Optional[Tuple[str, str, str, str]]) -> Check:
    have = f"{version[0]}.{version[1]}"
    if version < (3, 8):
        return Check("python", FAIL, f"Python {have}; nexedge needs 3.8 or newer", "use the system python3")
    if jetpack is not None and have != jetpack[1]:
        return Check("python", FAIL, f"Python {have}, but JetPack {jetpack[0]}'s TensorRT and OpenCV are built for "
                     f"Python {jetpack[1]}", f"make the venv with /usr/bin/python{jetpack[1]} -m venv "
                     "--system-site-packages")
    where = f" (JetPack {jetpack[0]})" if jetpack else ""
    return Check("python", OK, f"Python {have}{where}")


def check_distribution(dists: Dict[str, Tuple[str, List[str]]]) -> Check:
    """``dists``: {name: (version, console scripts)} of the distributions named nexedge*. PyPI's
    ``nexedge`` is an unrelated project that shadows the ``nexedge`` package."""
    mine = dists.get("nexedge-line")
    other = dists.get("nexedge")
    if other is not None and "nexedge-daemon" not in other[1]:
        return Check("distribution", FAIL, f"PyPI's nexedge {other[0]} is installed: an unrelated project that "
                     "shadows this one", "pip uninstall -y nexedge, then pip install --no-deps . from the checkout")
    if other is not None:
        return Check("distribution", WARN, f"nexedge {other[0]} is installed under its old distribution name",
                     "pip uninstall -y nexedge, then pip install --no-deps . from the checkout")
    if mine is None:
        return Check("distribution", WARN, "nexedge-line is not installed (running from a checkout?)",
                     "pip install --no-deps . from the checkout")
    return Check("distribution", OK, f"nexedge-line {mine[0]}")


def check_numpy_cv2(result: Dict[str, Any], key: str, system_cv2: bool) -> Check:
    """``result`` of :func:`probe_cv2`: numpy version, cv2 version and file, or the import error."""
    numpy = result.get("numpy")
    if numpy is None:
        return Check("numpy/cv2", FAIL, f"numpy does not import: {result.get('error')}", FIX_NUMPY)
    pin = PINS.get(key, {}).get("numpy")
    if result.get("cv2") is None:
        err = str(result.get("error") or "")
        numpy_abi = any(s in err for s in ("NumPy 1.x", "numpy.core.multiarray", "_ARRAY_API", "numpy"))
        return Check("numpy/cv2", FAIL, f"cv2 does not import with numpy {numpy}: {err[:200]}",
                     FIX_NUMPY if numpy_abi else ("sudo apt install nvidia-jetpack (JetPack's OpenCV), and a venv "
                                                  "with --system-site-packages" if system_cv2 else
                                                  "pip install opencv-python-headless"))
    detail = f"numpy {numpy}, cv2 {result['cv2']} from {result.get('cv2_file')}"
    if pin and not in_spec(numpy, pin):
        return Check("numpy/cv2", FAIL, detail + f"; the pin for this platform is numpy{pin}", FIX_NUMPY)
    if system_cv2 and "site-packages" in str(result.get("cv2_file")) and "dist-packages" not in \
            str(result.get("cv2_file")):
        return Check("numpy/cv2", WARN, detail + ": a pip OpenCV shadows JetPack's (no CUDA/GStreamer builds)",
                     "pip uninstall opencv-python-headless opencv-python")
    return Check("numpy/cv2", OK, detail)


def check_onnxruntime(version: Optional[str], key: str) -> Check:
    jetson = key.startswith("jetpack")
    if version is None:
        if jetson:
            return Check("onnxruntime", SKIP, "not installed (optional on a Jetson: engines run on TensorRT)")
        return Check("onnxruntime", FAIL, "not installed; .onnx models need it", "pip install onnxruntime")
    pin = PINS.get(key, {}).get("onnxruntime", ">=1.12")
    if not in_spec(version, pin):
        return Check("onnxruntime", FAIL, f"onnxruntime {version}; nexedge needs onnxruntime{pin}",
                     f'pip install "onnxruntime{pin}"')
    return Check("onnxruntime", OK, f"onnxruntime {version}")


def check_tensorrt(version: Optional[str], module_file: Optional[str], key: str,
                   jetpack: Optional[Tuple[str, str, str, str]], error: str = "") -> Check:
    if version is None:
        if jetpack is not None:
            return Check("tensorrt", FAIL, f"import tensorrt failed{': ' + error if error else ''}",
                         "sudo apt install python3-libnvinfer; the venv needs --system-site-packages")
        return Check("tensorrt", SKIP, "not installed (needed only for .engine models)")
    parts = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    lo, major = TENSORRT_RANGE
    if parts < lo or parts[0] > major:
        return Check("tensorrt", FAIL, f"TensorRT {version}; nexedge runs 8.5 to 10.x",
                     'on x86 pip install "tensorrt>=10,<11"; on a Jetson use JetPack 5.1 or 6.x')
    if jetpack is not None:
        if module_file and "site-packages" in module_file and "dist-packages" not in module_file:
            return Check("tensorrt", FAIL, f"TensorRT {version} from pip ({module_file}): PyPI's aarch64 wheels are "
                         "server (SBSA) builds that do not run on a Jetson",
                         "pip uninstall tensorrt; use JetPack's (python3-libnvinfer)")
        if ".".join(map(str, parts)) != jetpack[2]:
            return Check("tensorrt", WARN, f"TensorRT {version}, JetPack {jetpack[0]} ships {jetpack[2]}: use the "
                         "recipe for the version you have", "")
    elif key == "x86_64" and not in_spec(version, PINS["x86_64"]["tensorrt"]):
        return Check("tensorrt", FAIL, f"TensorRT {version}; the pin is {PINS['x86_64']['tensorrt']}",
                     'pip install "tensorrt>=10,<11"')
    return Check("tensorrt", OK, f"TensorRT {version}" + (f" ({module_file})" if module_file else ""))


def check_cuda_python(version: Optional[str], pycuda: bool, key: str, need: bool) -> Check:
    pin = PINS.get(key, {}).get("cuda-python")
    if version is None:
        if pycuda:
            return Check("cuda-python", WARN, "not installed; the TensorRT backend uses pycuda",
                         f'pip install "cuda-python{pin}"' if pin else "")
        if need:
            return Check("cuda-python", FAIL, "neither cuda-python nor pycuda is installed; TensorRT needs one",
                         f'pip install "cuda-python{pin}"' if pin else "pip install cuda-python")
        return Check("cuda-python", SKIP, "not installed (needed only with TensorRT)")
    if not need:
        return Check("cuda-python", SKIP, f"cuda-python {version}, not used without TensorRT")
    if pin and not in_spec(version, pin):
        return Check("cuda-python", FAIL, f"cuda-python {version}; this platform needs cuda-python{pin} (it must "
                     "match the driver's CUDA; 13.x needs a 580+ driver)", f'pip install "cuda-python{pin}"')
    return Check("cuda-python", OK, f"cuda-python {version}")


def _cuda(v: Optional[int]) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "none"


def check_driver(driver: Optional[int], runtime: Optional[int], need: bool, error: str = "") -> Check:
    """CUDA versions as cudaDriverGetVersion / cudaRuntimeGetVersion report them (12060 = 12.6)."""
    if not need:
        return Check("cuda driver", SKIP, "not checked (no TensorRT)")
    if driver is None or runtime is None:
        return Check("cuda driver", FAIL, f"cannot query the CUDA driver ({error})",
                     "is this a GPU machine with its driver loaded? On a Jetson: user in group video")
    if not driver:
        return Check("cuda driver", FAIL, "no NVIDIA driver found", "install the driver (Jetson: JetPack)")
    if driver // 1000 < runtime // 1000:
        return Check("cuda driver", FAIL, f"driver supports CUDA {_cuda(driver)}; cuda-python is built for CUDA "
                     f"{_cuda(runtime)}", f"install the cuda-python for CUDA {driver // 1000}.x")
    if driver < runtime:
        return Check("cuda driver", WARN, f"driver CUDA {_cuda(driver)} is older than cuda-python's {_cuda(runtime)}: "
                     "runs under CUDA minor-version compatibility only", "")
    return Check("cuda driver", OK, f"driver CUDA {_cuda(driver)}, cuda-python built for CUDA {_cuda(runtime)}")


def check_dla(n: Optional[int], jetpack: Optional[Tuple[str, str, str, str]]) -> Check:
    if n is None:
        return Check("dla", SKIP, "not checked (no TensorRT runtime)")
    return Check("dla", OK, f"{n} DLA core(s)" + ("" if n or jetpack is None else " (Orin Nano has none)"))


def check_engine(path: str, card: Any, trt_version: Optional[str], device: Any, n_dla: Optional[int]) -> List[Check]:
    """The engine's card against this machine: TensorRT version, GPU (name, SM count, compute capability,
    Jetson module) and DLA core."""
    name = f"engine {os.path.basename(path)}"
    info = card.data.get("provenance", {}).get("engine") or {}
    key = info.get("key") or {}
    out = []
    rebuild = "nexedge build-engine <its .onnx> --recipe <this device's recipe> here"
    built = info.get("tensorrt")
    if trt_version is None:
        out.append(Check(name, FAIL, "TensorRT is not importable here", "see the tensorrt line"))
    elif built != trt_version and not key.get("version_compatible"):
        out.append(Check(name, FAIL, f"built with TensorRT {built}, this machine has {trt_version}: it will not "
                         "deserialize", rebuild))
    if device is not None:
        want = (key.get("device", info.get("device")), key.get("sm_count", info.get("sm_count")),
                tuple(key.get("compute_capability") or ()) or None, key.get("board", info.get("board")))
        have = (device.name, device.sm_count, tuple(device.compute_capability), device.board)
        diffs = [f"{what} {w!r} vs here {h!r}" for what, w, h in zip(("GPU", "SMs", "compute capability", "module"),
                                                                     want, have) if w not in (None, "") and w != h]
        if diffs:
            out.append(Check(name, FAIL, "built on another device: " + "; ".join(diffs), rebuild))
    dla = (info.get("dla") or {}).get("core", key.get("dla_core"))
    if dla is not None and n_dla is not None and not 0 <= int(dla) < n_dla:
        out.append(Check(name, FAIL, f"built for DLA core {dla}; this device has {n_dla}", rebuild + " (or "
                         "without --dla-core)"))
    if not out:
        out.append(Check(name, OK, f"TensorRT {built}, {info.get('board') or info.get('device')}"
                         + (f", DLA core {dla}" if dla is not None else "")))
    return out


def check_service(cfg: Any, user: Optional[str], python: str) -> List[Check]:
    """The files the config names, as the service user sees them, and its access to the venv's python."""
    from nexedge.serve import config as serve_config
    from nexedge.serve import preflight

    who = user or "this user"
    try:
        problems = preflight.check_files(cfg, user)
        if not preflight.can_access(python, os.R_OK | os.X_OK, user):
            problems.append(f"{python} (the venv's python) is not executable by {who}")
    except serve_config.ConfigError as e:
        problems = [str(e)]
    if problems:
        return [Check("service files", FAIL, p, f"chown/chmod so that {who} can read it (store: write)")
                for p in problems]
    return [Check("service files", OK, f"model, card and config files readable by {who}, store writable")]


# -- probing this machine ---------------------------------------------------------------
def probe_cv2(python: str = sys.executable) -> Dict[str, Any]:
    """Import numpy and cv2 in a child process (an ABI mismatch can crash the interpreter)."""
    code = ("import json, numpy\nout = {'numpy': numpy.__version__}\ntry:\n    import cv2\n"
            "    out.update(cv2=cv2.__version__, cv2_file=cv2.__file__)\nexcept Exception as e:\n"
            "    out['error'] = '%s: %s' % (type(e).__name__, e)\nprint(json.dumps(out))\n")
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)}
    if r.returncode != 0 or not r.stdout.strip():
        return {"numpy": None, "error": f"child exited {r.returncode}: {r.stderr.strip()[-300:]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _distribution(name: str) -> Any:
    """importlib.metadata's distribution ``name``, also under its ``_`` spelling (Python 3.8 does not
    normalise ``cuda-python`` to the ``cuda_python-*.dist-info`` folder); None when not installed."""
    import importlib.metadata as md

    for n in (name, name.replace("-", "_")):
        try:
            return md.distribution(n)
        except md.PackageNotFoundError:
            continue
    return None


def _dist_version(*names: str) -> Optional[str]:
    for n in names:
        d = _distribution(n)
        if d is not None:
            return str(d.version)
    return None


def _nexedge_dists() -> Dict[str, Tuple[str, List[str]]]:
    out = {}
    for name in ("nexedge", "nexedge-line"):
        d = _distribution(name)
        if d is not None:
            out[name] = (str(d.version), [e.name for e in d.entry_points if e.group == "console_scripts"])
    return out


def probe(engine: Optional[str] = None) -> Dict[str, Any]:
    """The facts the checks need, from this machine."""
    facts: Dict[str, Any] = {"machine": platform.machine(), "python": tuple(sys.version_info[:2])}
    try:
        with open("/etc/nv_tegra_release", encoding="utf-8", errors="replace") as f:
            facts["l4t"] = parse_l4t(f.read())
    except OSError:
        facts["l4t"] = None
    facts["dists"] = _nexedge_dists()
    facts["cv2"] = probe_cv2()
    facts["onnxruntime"] = _dist_version("onnxruntime", "onnxruntime-gpu")
    facts["cuda_python"] = _dist_version("cuda-python", "cuda-bindings")
    try:
        import importlib.util

        facts["pycuda"] = importlib.util.find_spec("pycuda") is not None
    except (ImportError, ValueError):
        facts["pycuda"] = False
    facts["trt"], facts["trt_file"], facts["trt_error"], facts["n_dla"] = None, None, "", None
    try:
        import tensorrt as trt

        facts["trt"], facts["trt_file"] = str(trt.__version__), getattr(trt, "__file__", None)
        facts["n_dla"] = int(trt.Runtime(trt.Logger(trt.Logger.ERROR)).num_DLA_cores)
    except Exception as e:  # ImportError, or a broken install raising OSError on its libraries
        facts["trt_error"] = f"{type(e).__name__}: {e}"
    facts["driver"] = facts["runtime"] = None
    facts["cuda_error"] = ""
    try:
        from nexedge.runtime.backends.tensorrt import _import_cudart

        rt = _import_cudart()
        d, r = rt.cudaDriverGetVersion(), rt.cudaRuntimeGetVersion()
        ok = rt.cudaError_t.cudaSuccess
        facts["driver"] = int(d[1]) if d[0] == ok else None
        facts["runtime"] = int(r[1]) if r[0] == ok else None
        if facts["driver"] is None:
            facts["cuda_error"] = str(d[0])
    except Exception as e:
        facts["cuda_error"] = f"{type(e).__name__}: {e}"
    facts["device"] = None
    if facts["trt"] is not None or engine:
        try:
            from nexedge.export.cuda_device import device_info

            facts["device"] = device_info(0)
        except Exception as e:
            facts["cuda_error"] = facts["cuda_error"] or f"{type(e).__name__}: {e}"
    return facts


def run_checks(facts: Dict[str, Any], engine: Optional[str] = None, cfg: Any = None,
               user: Optional[str] = None) -> List[Check]:
    jp = jetpack_of(facts.get("l4t"))
    key = platform_key(facts.get("machine", ""), jp)
    need_cuda = facts.get("trt") is not None or jp is not None or bool(engine)
    checks = [
        check_python(facts["python"], jp),
        check_distribution(facts.get("dists") or {}),
        check_numpy_cv2(facts.get("cv2") or {}, key, jp is not None),
        check_onnxruntime(facts.get("onnxruntime"), key),
        check_tensorrt(facts.get("trt"), facts.get("trt_file"), key, jp, facts.get("trt_error", "")),
        check_cuda_python(facts.get("cuda_python"), bool(facts.get("pycuda")), key, need_cuda),
        check_driver(facts.get("driver"), facts.get("runtime"), need_cuda, facts.get("cuda_error", "")),
        check_dla(facts.get("n_dla"), jp),
    ]
    if engine:
        from nexedge.card import CardError, load_card

        try:
            card = load_card(engine)
        except (CardError, OSError, ValueError) as e:
            checks.append(Check(f"engine {os.path.basename(engine)}", FAIL, str(e), "copy the engine with its card"))
        else:
            checks += check_engine(engine, card, facts.get("trt"), facts.get("device"), facts.get("n_dla"))
    if cfg is not None:
        checks += check_service(cfg, user, facts.get("python_exe", sys.executable))
    return checks


# -- CLI ---------------------------------------------------------------------------------
def configure_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the daemon's line.yaml: also check its model (an engine: against this "
                                    "device) and the files the service user needs")
    p.add_argument("--engine", help="an engine to check against this device (default: the config's model.path "
                                    "when it is an engine)")
    p.add_argument("--user", help="check file access as this user (the unit's User=, e.g. nexedge)")
    uses_globals(p, "--json")


def run_doctor(args: argparse.Namespace) -> int:
    cfg = None
    if args.config:
        from nexedge.serve import config as serve_config

        cfg = serve_config.load(args.config)
    engine = args.engine or (cfg.model.path if cfg is not None and cfg.model.path.endswith((".engine", ".plan"))
                             else None)
    checks = run_checks(probe(engine), engine, cfg, args.user)
    if args.json:
        print(json.dumps([c._asdict() for c in checks], indent=1))
    else:
        for c in checks:
            print(c.line())
    failed = [c for c in checks if c.status == FAIL]
    if not args.json:
        print(f"doctor: {len(failed)} failed, {sum(c.status == WARN for c in checks)} warning(s)")
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:  # pragma: no cover - `nexedge doctor` is the entry
    p = argparse.ArgumentParser(prog="nexedge doctor")
    configure_doctor(p)
    return run_doctor(p.parse_args(argv))
