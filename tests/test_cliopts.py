"""Shared command-line options: one definition each (nexedge/cliopts.py, nexedge/threads.py,
nexedge/progress.py), every command that had the flag still takes it (after the command, as before, or
before it as a global option) with the same default, and retired spellings still work."""

import argparse
import ast
import contextlib
import io
import os
from typing import Dict, Iterator, List, Tuple

import pytest

from nexedge import cli, cliopts, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: flag -> the one module allowed to define it
HOMES = {"--tpr-floor": "nexedge/cliopts.py", "--threads": "nexedge/threads.py",
         "--no-progress": "nexedge/progress.py", "--json": "nexedge/cliopts.py"}
#: flag -> modules with an option of that name that is not the shared one (bench --json OUT: a file)
OWN = {"--json": ["nexedge/bench/cli.py"]}
TPR_FLOOR_COMMANDS = ("train", "eval", "export", "thresholds")
THREADS_COMMANDS = ("train", "eval", "mislabels", "explain", "export", "calibrate", "thresholds", "bench", "demo")
NO_PROGRESS_COMMANDS = ("synth", "split", "train", "eval", "mislabels", "pull")
JSON_COMMANDS = ("split", "doctor", "camera-sim", "line", "store")


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
    defs = [d for d in _definitions(flag) if d.split(":")[0] not in OWN.get(flag, [])]
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


def _global_users(flag: str) -> List[str]:
    return sorted(name for name, sub in _commands(cli.build_parser()) if flag in (sub.get_default("_globals") or ()))


def test_the_same_commands_keep_the_same_flags_and_defaults():
    assert _flag_defaults("--tpr-floor") == {c: metrics.DEFAULT_TPR_FLOOR for c in TPR_FLOOR_COMMANDS}
    assert metrics.DEFAULT_TPR_FLOOR == 0.95
    top = cli.build_parser()
    assert {f: top.get_default(cliopts.GLOBAL_DESTS[f]) for f in cliopts.GLOBAL_OPTIONS} == \
        {"--threads": None, "--no-progress": False, "--json": False}
    assert _global_users("--threads") == sorted(THREADS_COMMANDS)
    assert _global_users("--no-progress") == sorted(NO_PROGRESS_COMMANDS)
    assert _global_users("--json") == sorted(JSON_COMMANDS)


def _minimal(cmd: str) -> List[str]:
    """The fewest arguments ``cmd`` parses with."""
    return {"train": ["train", "--data", "d", "--out", "o"], "eval": ["eval", "r", "--data", "d"],
            "mislabels": ["mislabels", "r", "--data", "d"], "explain": ["explain", "m.onnx", "x.png"],
            "export": ["export", "r"], "calibrate": ["calibrate", "m.onnx", "--data", "d"],
            "thresholds": ["thresholds", "m.onnx", "--data", "d"], "bench": ["bench", "m.onnx"],
            "demo": ["demo"], "synth": ["synth", "o"], "split": ["split", "s", "o"], "pull": ["pull", "--out", "o"],
            "doctor": ["doctor"], "camera-sim": ["camera-sim", "f"], "line": ["line", "status"],
            "store": ["store", "check", "p"]}[cmd]


@pytest.mark.parametrize("flag,value,commands", [("--threads", ["2"], THREADS_COMMANDS),
                                                 ("--no-progress", [], NO_PROGRESS_COMMANDS),
                                                 ("--json", [], JSON_COMMANDS)])
def test_a_global_option_works_before_or_after_the_command(flag, value, commands, capsys):
    want = 2 if value else True
    for cmd in commands:
        argv = _minimal(cmd)
        for spelled in ([flag] + value + argv, argv + [flag] + value):
            args = cli.build_parser().parse_args(spelled)
            assert getattr(args, cliopts.GLOBAL_DESTS[flag]) == want, (cmd, spelled)
            assert cliopts.check_globals(args) is None
    assert capsys.readouterr().err == ""  # moved, not retired: no note


def test_a_global_option_a_command_does_not_use_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["keys", "--out", "k", "--name", "n", "--threads", "2"])
    assert e.value.code == 2 and "nexedge keys: --threads has no effect on this command" in capsys.readouterr().err


def test_bench_keeps_its_own_json_file_option():
    args = cli.build_parser().parse_args(["bench", "m.onnx", "--json", "out.json"])
    assert args.json == "out.json"


def test_threads_after_the_command_reaches_run(monkeypatch):
    """``nexedge train --threads 2`` (the old spelling) still runs the command on 2 threads."""
    from nexedge.train import cli as tcli

    seen = {}

    def run(args):
        from nexedge import threads

        seen.update(threads=args.threads, configured=threads.configured(), no_progress=args.no_progress,
                    given=threads.given(args))
        return 0

    monkeypatch.setattr(tcli, "run_eval", run)
    assert cli.main(["eval", "r", "--data", "d", "--threads", "2", "--no-progress"]) == 0
    assert seen == {"threads": 2, "configured": 2, "no_progress": True, "given": 2}


@pytest.mark.parametrize("cmd,old", [(c, f) for c, flags in sorted(cliopts.RETIRED.items()) for f in sorted(flags)])
def test_a_retired_flag_maps_to_an_option_of_its_command(cmd, old):
    r = cliopts.RETIRED[cmd][old]
    sub = dict(_commands(cli.build_parser()))[cmd]
    assert old not in {o for a in sub._actions for o in a.option_strings}, f"{old} is still an option of {cmd}"
    new = next(a for a in sub._actions if r.new in a.option_strings)
    if r.new != "--schedule":
        key = r.key.split("=")[0]
        assert key in new.keys, f"{cmd} {old} -> {r.new} {key}: not one of {sorted(new.keys)}"


@pytest.mark.parametrize("argv,attrs,note", [
    (["train", "--data", "d", "--out", "o", "--sat-alpha", "0.5"], {"sat_alpha": 0.5},
     "nexedge train: --sat-alpha is retired; use --loss-kw sat_alpha=0.5"),
    (["train", "--data", "d", "--out", "o", "--wbce-start", "scratch=3", "--wbce-start=chip=4"],
     {"wbce_start": ["scratch=3", "chip=4"]}, "use --loss-kw wbce_start.chip=4"),
    (["train", "--data", "d", "--out", "o", "--step-size", "5"], {"schedule": "step", "step_size": 5, "gamma": 0.1},
     "nexedge train: --step-size 5 is retired; use --schedule step:5:0.1"),
    (["train", "--data", "d", "--out", "o", "--schedule", "step", "--gamma", "0.5"],
     {"schedule": "step", "step_size": 14, "gamma": 0.5}, "use --schedule step:14:0.5"),
    (["calibrate", "m.onnx", "--data", "d", "--per-tensor"], {"per_tensor": True},
     "nexedge calibrate: --per-tensor is retired; use --quant-kw per_tensor=true"),
    (["synth", "o", "--no-stretch"], {"realism_stretch": False}, "use --realism-kw stretch=false"),
    (["bench", "m.onnx", "--gemm-seconds", "2"], {"gemm_seconds": 2.0}, "use --gemm-kw seconds=2"),
])
def test_a_retired_spelling_still_works_with_a_one_line_note(argv, attrs, note, capsys):
    args = cli.build_parser().parse_args(argv)
    assert {k: getattr(args, k) for k in attrs} == attrs
    err = capsys.readouterr().err
    assert note in err and all(line.startswith("nexedge ") for line in err.splitlines())


def test_the_new_spellings_parse_to_the_same_attributes():
    old = cli.build_parser().parse_args(["train", "--data", "d", "--out", "o", "--step-size", "5", "--gamma", "0.2",
                                         "--momentum", "0.8", "--wbce-lambda", "0.3"])
    new = cli.build_parser().parse_args(["train", "--data", "d", "--out", "o", "--schedule", "step:5:0.2",
                                         "--optimizer-kw", "momentum=0.8", "--loss-kw", "wbce_lambda=0.3"])
    assert vars(old) == vars(new)


@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "d", "--out", "o", "--loss-kw", "sat_beta=1"],
     "--loss-kw 'sat_beta=1': unknown key 'sat_beta'; expected one of sat_alpha, sat_es, wbce_lambda, "
     "wbce_start.CLASS, wbce_start_default"),
    (["train", "--data", "d", "--out", "o", "--loss-kw", "sat_alpha"], "--loss-kw 'sat_alpha': expected KEY=VALUE"),
    (["train", "--data", "d", "--out", "o", "--loss-kw", "sat_es=half"], "--loss-kw 'sat_es=half': invalid literal"),
    (["calibrate", "m.onnx", "--data", "d", "--quant-kw", "ort_weights=u4"],
     "--quant-kw 'ort_weights=u4': expected one of s8, u8"),
    (["train", "--data", "d", "--out", "o", "--schedule", "step:0"], "--schedule 'step:0': expected step[:N[:GAMMA]]"),
])
def test_a_bad_key_or_value_fails_naming_it(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("cmd", sorted(set(TPR_FLOOR_COMMANDS) | set(THREADS_COMMANDS)))
def test_help_lists_the_shared_flags(cmd):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    text = " ".join(out.getvalue().split())
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
