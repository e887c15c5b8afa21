"""Issue 28 items 1-2: README's install lines cannot resolve to PyPI's unrelated `nexedge`, and on a Jetson
they keep numpy < 2 and the cuda-python pin; tools/check_install.py resolves them per platform with pip."""

import ast
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(REPO, "tools"))
import check_install as ci  # noqa: E402

README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()

# The install lines of README.md before issue 28 (Installing, and Deploy on a Jetson step 1).
OLD_README = """
<!-- install-lines: jetpack-6 -->
```sh
/opt/nexedge/venv/bin/pip install --upgrade pip
/opt/nexedge/venv/bin/pip install --no-deps nexedge
/opt/nexedge/venv/bin/pip install numpy pyzmq pyyaml prometheus-client onnx "cuda-python>=12.6,<12.7"
```
"""


def _setup():
    tree = ast.parse(open(os.path.join(REPO, "setup.py"), encoding="utf-8").read())
    values = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.walk(tree)
              if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") in ("BASE", "EXTRAS")}
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    return values, ast.literal_eval(kw["name"]), ast.literal_eval(kw["entry_points"])


def test_distribution_has_its_own_name_and_keeps_the_commands():
    _, name, entry = _setup()
    assert name == "nexedge-line"
    assert {e.split("=")[0] for e in entry["console_scripts"]} == {"nexedge", "nexedge-daemon"}


def _requirements(line):
    return [Requirement(a) for a in ci.pip_args(line) if not a.startswith("-") and not ci._local_target(a)]


@pytest.mark.parametrize("platform", sorted(ci.PLATFORMS))
def test_readme_install_lines_never_name_pypi_nexedge_and_follow_the_pins(platform):
    blocks = ci.readme_blocks(README)
    lines = blocks.get(platform)
    assert lines, f"README has no <!-- install-lines: {platform} --> block"
    reqs = [r for line in lines for r in _requirements(line)]
    assert "nexedge" not in {r.name for r in reqs}, "a line installs PyPI's nexedge, an unrelated project"
    assert any(ci._local_target(a) for line in lines for a in ci.pip_args(line)), "nothing installs this checkout"
    plat = ci.PLATFORMS[platform]
    if plat["machine"] != "aarch64":
        return
    assert any("--no-deps" in ci.pip_args(line) for line in lines)  # JetPack's cv2 is not shadowed
    values, _, _ = _setup()
    env = ci._env(plat["pythons"][0], "aarch64")
    pins = {Requirement(r).name: Requirement(r).specifier for r in values["BASE"] + values["EXTRAS"]["trt"]
            if Requirement(r).marker is None or Requirement(r).marker.evaluate(env)}
    given = {r.name: r.specifier for r in reqs}
    assert given["numpy"] == pins["numpy"] and "2.0" not in given["numpy"]  # numpy < 2: JetPack's OpenCV
    assert given["cuda-python"] == pins["cuda-python"] == SpecifierSet(plat["pins"]["cuda-python"])
    assert "onnx" in given and "1.17.0" in given["onnx"] and not given["onnx"].contains("1.23.0")


def test_readme_blocks_parse_only_pip_lines():
    text = "<!-- install-lines: jetpack-6 -->\n```sh\nsudo apt install x\npython3 -m venv v\n" \
           "/opt/v/bin/pip install --no-deps .   # the checkout\npip install \\\n  numpy\n```\n"
    assert ci.readme_blocks(text) == {"jetpack-6": ["/opt/v/bin/pip install --no-deps .", "pip install    numpy"]}


@pytest.fixture(scope="module")
def index():
    if not ci.index_reachable():
        pytest.skip("PACKAGE INDEX UNREACHABLE: install lines not resolved here (tools/check_install.py in "
                    "`make test` skips loudly too)")


def test_check_install_fails_on_the_old_readme_lines(index, tmp_path):
    """The resolver has teeth: the old JetPack 6 lines install PyPI's nexedge 1.0.0 and numpy 2."""
    old = tmp_path / "README.md"
    old.write_text(OLD_README)
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "check_install.py"), "--readme", str(old),
                          "--platform", "jetpack-6"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "an unrelated PyPI project, not nexedge" in out.stdout
    assert "numpy 2." in out.stdout and "the pin is <2" in out.stdout

