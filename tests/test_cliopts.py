"""Shared command-line options: one definition each (nexedge/cliopts.py, nexedge/threads.py), and
every command that had the flag still lists it with the same default."""

import argparse
import ast
import contextlib
import io
import os
from typing import Dict, Iterator, List, Tuple

import pytest

from nexedge import cli, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: flag -> the one module allowed to define it
HOMES = {"--tpr-floor": "nexedge/cliopts.py", "--threads": "nexedge/threads.py"}
TPR_FLOOR_COMMANDS = ("train", "eval", "export", "thresholds")
THREADS_COMMANDS = ("train", "eval", "mislabels", "explain", "export", "calibrate", "thresholds", "bench", "demo")


def _definitions(flag: str) -> List[str]:
    """``path:line`` of every ``add_argument(flag, ...)`` call under nexedge/."""
    out = []
    for base, dirs, files in os.walk(os.path.join(REPO, "nexedge")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(base, f)
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read(), path)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "add_argument"
                        and any(isinstance(a, ast.Constant) and a.value == flag for a in node.args)):
                    out.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    return out


@pytest.mark.parametrize("flag", sorted(HOMES))
def test_a_shared_flag_is_defined_once_in_its_home(flag):
    defs = _definitions(flag)
    assert [d.split(":")[0] for d in defs] == [HOMES[flag]], \
        f"{flag} defined {defs}: use the helper in {HOMES[flag]} instead of another add_argument"


def _commands(p: argparse.ArgumentParser, path: Tuple[str, ...] = ()) -> Iterator[Tuple[str, argparse.ArgumentParser]]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield " ".join(path + (name,)), sub
                yield from _commands(sub, path + (name,))


def _flag_defaults(flag: str) -> Dict[str, object]:
    return {name: a.default for name, sub in _commands(cli.build_parser())
            for a in sub._actions if flag in a.option_strings}


def test_the_same_commands_keep_the_same_flags_and_defaults():
    assert _flag_defaults("--tpr-floor") == {c: metrics.DEFAULT_TPR_FLOOR for c in TPR_FLOOR_COMMANDS}
    assert metrics.DEFAULT_TPR_FLOOR == 0.95
    assert _flag_defaults("--threads") == {c: None for c in THREADS_COMMANDS}


@pytest.mark.parametrize("cmd", sorted(set(TPR_FLOOR_COMMANDS) | set(THREADS_COMMANDS)))
def test_help_lists_the_shared_flags(cmd):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    text = out.getvalue()
    assert "--threads N" in text
    if cmd in TPR_FLOOR_COMMANDS:
        assert "--tpr-floor P" in text and "(default 0.95)" in " ".join(text.split())


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2", "high"])
def test_tpr_floor_outside_0_1_is_refused_naming_the_value(value, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["thresholds", "model.onnx", "--data", "d", "--tpr-floor", value])
    assert e.value.code == 2
    assert f"--tpr-floor {value!r}: expected a number in (0, 1)" in capsys.readouterr().err


def test_tpr_floor_in_range_is_parsed():
    args = cli.build_parser().parse_args(["eval", "run", "--data", "d", "--tpr-floor", "0.9"])
    assert args.tpr_floor == 0.9
