"""CI check: resolve README's install lines for each platform with pip, install nothing, check the result.

    python tools/check_install.py [--readme README.md] [--platform jetpack-6] [--json OUT]

README.md marks each platform's shell block with ``<!-- install-lines: NAME -->`` (NAME a key of
:data:`PLATFORMS`). Every ``pip install`` line of the block is resolved, as written, for that
platform: ``pip install --dry-run --ignore-installed --report R --platform <its wheel tags>
--python-version X --implementation cp --abi cpXY --only-binary=:all: <the line's arguments>``,
run in the repository root (``.`` is this checkout). The union of what the block would install is
then checked against the platform's expectations: nexedge from this checkout (PyPI's ``nexedge``
is another project), every line-side requirement present, the pins (numpy < 2 where JetPack's
OpenCV needs numpy 1.x, cuda-python within its pin) and no TensorRT wheel on a Jetson.

Packages PyPI has only as source (``tensorrt`` 10.x: its sdist fetches NVIDIA's wheels at install)
cannot be resolved for a foreign platform; for a line that asks for them through an extra, the
rest of the line is resolved and the package is checked to exist on the index within its pin.

Needs the package index (pip's configured one). Exit 0 when every platform passes, 1 otherwise;
exit 0 with a loud ``SKIPPED`` line when the index cannot be reached at all.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = "nexedge-line"
JETSON_ABSENT = ["tensorrt", "tensorrt-cu12", "tensorrt-cu11", "opencv-python", "opencv-python-headless",
                 "opencv-contrib-python", "torch", "nexedge"]

#: Per platform: Python versions, CPU, newest glibc (wheel tags), and what the block must give.
PLATFORMS: Dict[str, Dict[str, Any]] = {
    "jetpack-5.1": {  # L4T R35, Ubuntu 20.04, TensorRT 8.5, CUDA 11.4
        "pythons": ["3.8"], "machine": "aarch64", "glibc": 31,
        "pins": {"numpy": "<2", "cuda-python": ">=11.5,<12"},
        "absent": JETSON_ABSENT,
        # JetPack provides cv2 (its OpenCV); ONNX Runtime is optional on a device that runs engines.
        "from_system": ["opencv-python-headless", "onnxruntime"],
    },
    "jetpack-6": {  # 6.0 (R36.3, TensorRT 8.6, CUDA 12.2) and 6.1/6.2 (R36.4, TensorRT 10.3, CUDA 12.6), Ubuntu 22.04
        "pythons": ["3.10"], "machine": "aarch64", "glibc": 35,
        "pins": {"numpy": "<2", "cuda-python": ">=12.6,<12.7"},
        "absent": JETSON_ABSENT,
        "from_system": ["opencv-python-headless", "onnxruntime"],
    },
    "x86_64": {  # a line computer or workstation, Ubuntu 22.04 / 24.04
        "pythons": ["3.10", "3.11", "3.12"], "machine": "x86_64", "glibc": 35,
        "pins": {"tensorrt": ">=10,<11", "cuda-python": ">=12,<13"},
        "absent": ["nexedge"],
        "from_system": [],
        "sdist_only": ["tensorrt"],
    },
}
MARKER = re.compile(r"<!--\s*install-lines:\s*([\w.\-]+)\s*-->")


class IndexUnreachable(RuntimeError):
    pass


def readme_blocks(text: str) -> Dict[str, List[str]]:
    """{platform: the ``pip install`` commands of the shell block after its marker} (continuations joined)."""
    out: Dict[str, List[str]] = {}
    lines = text.replace("\\\n", " ").splitlines()
    i = 0
    while i < len(lines):
        m = MARKER.search(lines[i])
        i += 1
        if not m:
            continue
        while i < len(lines) and not lines[i].strip().startswith("```"):
            i += 1
        i += 1
        cmds = []
        while i < len(lines) and not lines[i].strip().startswith("```"):
            line = lines[i].split(" #")[0].strip()
            if re.match(r"^(\S*/)?pip3? install\b", line):
                cmds.append(line)
            i += 1
        out.setdefault(m.group(1), []).extend(cmds)
    return out


def pip_args(command: str) -> List[str]:
    """The arguments after ``pip install`` of a README line."""
    words = shlex.split(command)
    return words[words.index("install") + 1:]


def wheel_tags(machine: str, glibc: int) -> List[str]:
    tags = [f"manylinux_2_{m}_{machine}" for m in range(glibc, 16, -1)] + [f"manylinux2014_{machine}"]
    if machine == "x86_64":
        tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    return tags + [f"linux_{machine}"]


def resolve(args: Sequence[str], python: str, machine: str, glibc: int) -> List[Dict[str, Any]]:
    """pip's report of what ``pip install ARGS`` would install on that platform (nothing is installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--report", report, "--python-version", python,
               "--implementation", "cp", "--abi", "cp" + python.replace(".", ""), "--only-binary=:all:"]
        for tag in wheel_tags(machine, glibc):
            cmd += ["--platform", tag]
        out = subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=REPO, timeout=600)
        if out.returncode != 0:
            err = "\n".join(x for x in out.stderr.splitlines() if "is ignored: it is neither" not in x)
            raise RuntimeError(f"pip cannot resolve `pip install {shlex.join(args)}` for Python {python} "
                               f"{machine}:\n{err.strip()[-1500:]}")
        with open(report, encoding="utf-8") as f:
            return json.load(f)["install"]


def index_reachable() -> bool:
    """Can pip fetch a long-published aarch64 wheel's metadata from the configured index?"""
    try:
        resolve(["--no-deps", "numpy==1.24.4"], "3.8", "aarch64", 31)
        return True
    except (RuntimeError, subprocess.TimeoutExpired):
        return False


def _env(python: str, machine: str, extra: str = "") -> Dict[str, str]:
    return {"python_version": python, "python_full_version": python + ".0", "platform_machine": machine,
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": extra}


def applicable(requires: Sequence[str], python: str, machine: str, extras: Sequence[str] = ()) -> List[Requirement]:
    """``requires`` (Requires-Dist strings) that apply on the platform, for the base and ``extras``."""
    out = []
    for r in map(Requirement, requires):
        if r.marker is None or any(r.marker.evaluate(_env(python, machine, e)) for e in [""] + list(extras)):
            out.append(Requirement(str(r).split(";")[0]))
    return out


def _local_target(arg: str) -> Optional[Tuple[str, List[str]]]:
    """``.[trt]`` / ``dist/x.whl[a,b]`` -> (path, extras); None for an option or a requirement from the index."""
    m = re.match(r"^([^\[\]]+?)(?:\[([\w,\-]+)\])?$", arg)
    if arg.startswith("-") or not m or not (m.group(1).startswith((".", "/")) or m.group(1).endswith(".whl")):
        return None
    return m.group(1), [e for e in (m.group(2) or "").split(",") if e]


def resolve_line(command: str, python: str, plat: Dict[str, Any], notes: List[str]) -> List[Dict[str, Any]]:
    """What one README line would install; sdist-only packages of an extra are checked on the index."""
    args = pip_args(command)
    machine, glibc = plat["machine"], plat["glibc"]
    sdist_only = {canonicalize_name(n) for n in plat.get("sdist_only", [])}
    local = [(a, _local_target(a)) for a in args if _local_target(a)]
    if not sdist_only or "--no-deps" in args or not local:
        return resolve(args, python, machine, glibc)
    # Resolve the local project alone, then its applicable requirements without the sdist-only ones.
    installs = []
    reqs: List[Requirement] = []
    for _arg, (path, extras) in local:
        own = resolve(["--no-deps", path], python, machine, glibc)
        installs += own
        reqs += applicable(own[0]["metadata"].get("requires_dist") or [], python, machine, extras)
    rest = [a for a in args if a not in dict(local)]
    keep = [str(r) for r in reqs if canonicalize_name(r.name) not in sdist_only]
    installs += resolve(rest + keep, python, machine, glibc)
    for r in reqs:
        if canonicalize_name(r.name) in sdist_only:
            versions = index_versions(r.name)
            ok = [v for v in versions if v in r.specifier]
            if not ok:
                raise RuntimeError(f"{r} (from `{command}`): no version on the index within the pin "
                                   f"(index has {', '.join(versions[:8]) or 'none'})")
            notes.append(f"{r.name} {ok[0]} (sdist on the index; installs NVIDIA's wheels at install time)")
            installs.append({"metadata": {"name": r.name, "version": ok[0]}, "download_info": {"url": "index:sdist"}})
    return installs


def index_versions(name: str) -> List[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name, "--disable-pip-version-check"],
                         capture_output=True, text=True, timeout=300)
    m = re.search(r"Available versions: (.*)", out.stdout)
    return [v.strip() for v in m.group(1).split(",")] if m else []


def check_platform(name: str, commands: Sequence[str], python: str) -> Tuple[List[str], List[str], Dict[str, str]]:
    """(problems, notes, {package: version}) of one platform's block on one Python version."""
    plat = PLATFORMS[name]
    problems: List[str] = []
    notes: List[str] = []
    got: Dict[str, Dict[str, Any]] = {}
    if not commands:
        return [f"README has no `<!-- install-lines: {name} -->` block with pip install lines"], notes, {}
    for cmd in commands:
        try:
            for item in resolve_line(cmd, python, plat, notes):
                got[canonicalize_name(item["metadata"]["name"])] = item
        except RuntimeError as e:
            problems.append(str(e))
    versions = {n: str(i["metadata"]["version"]) for n, i in got.items()}
    me = got.get(PROJECT)
    if me is None:
        problems.append(f"nothing installs {PROJECT} (nexedge) from this checkout or a wheel built from it")
    elif not str(me["download_info"].get("url", "")).startswith("file:"):
        problems.append(f"{PROJECT} would come from {me['download_info'].get('url')}, not from this checkout")
    else:
        for r in applicable(me["metadata"].get("requires_dist") or [], python, plat["machine"]):
            n = canonicalize_name(r.name)
            if n in map(canonicalize_name, plat["from_system"]):
                continue
            if n not in versions:
                problems.append(f"{r} (a line-side requirement of nexedge) is installed by no line")
            elif versions[n] not in r.specifier:
                problems.append(f"{n} {versions[n]} does not satisfy nexedge's {r}")
    for n in map(canonicalize_name, plat["absent"]):
        if n in got:
            src = got[n]["download_info"].get("url", "?")
            problems.append(f"{n} {versions[n]} would be installed (from {src.rsplit('/', 1)[-1]})"
                            + (": an unrelated PyPI project, not nexedge" if n == "nexedge" else ""))
    for n, spec in plat["pins"].items():
        n = canonicalize_name(n)
        if n not in versions:
            problems.append(f"{n} ({spec}) would not be installed")
        elif versions[n] not in SpecifierSet(spec):
            problems.append(f"{n} {versions[n]} would be installed; the pin is {spec}")
    return problems, notes, versions


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--readme", default=os.path.join(REPO, "README.md"))
    p.add_argument("--platform", action="append", choices=sorted(PLATFORMS), help="only these (repeatable)")
    p.add_argument("--json", help="write the resolved versions per platform here")
    args = p.parse_args(argv)
    with open(args.readme, encoding="utf-8") as f:
        blocks = readme_blocks(f.read())
    if not index_reachable():
        print("check_install: SKIPPED: the package index cannot be reached (pip could not fetch numpy 1.24.4 for "
              "aarch64); the install lines were NOT checked", flush=True)
        return 0
    bad, report = 0, {}
    for name in args.platform or sorted(PLATFORMS):
        for py in PLATFORMS[name]["pythons"]:
            problems, notes, versions = check_platform(name, blocks.get(name, []), py)
            report[f"{name}/py{py}"] = {"ok": not problems, "problems": problems, "versions": versions}
            key = ", ".join(f"{n} {versions[n]}" for n in ("numpy", "onnx", "cuda-python", "tensorrt", PROJECT)
                            if n in versions)
            print(f"{'ok  ' if not problems else 'FAIL'} {name} Python {py}: {key}" + "".join(
                f"\n     note: {n}" for n in notes) + "".join(f"\n     problem: {x}" for x in problems), flush=True)
            bad += bool(problems)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
