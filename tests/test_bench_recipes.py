"""Benchmark scripts: the shared command line of benchmarks/_common.py (recipes, --set, the former
flags' deprecation and removal), and every recorded benchmark command in the docs still parses."""

import glob
import importlib.util
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, ROOT)

from benchmarks import _common as common  # noqa: E402

#: Where recorded benchmark commands live.
DOCS = (sorted(glob.glob(os.path.join(BENCH, "results", "*.md"))) + [os.path.join(BENCH, "RESULTS.md"),
        os.path.join(BENCH, "README.md"), os.path.join(ROOT, "README.md")]
        + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))))
#: Scripts whose parse_args(argv) (or _parse) builds and checks their command line without running.
PARSERS = {"bench_backends": "parse_args", "bench_cascade": "parse_args", "bench_contention": "parse_args",
           "bench_daemon": "parse_args", "bench_fold": "parse_args", "bench_int8": "parse_args",
           "bench_int8_stem": "parse_args", "bench_lifecycle": "parse_args", "bench_line_tail": "parse_args",
           "bench_load_probe": "parse_args", "bench_resize_mode": "parse_args", "bench_rollback": "parse_args",
           "bench_trainer": "_parse", "bench_crops": "parse_args", "bench_gemm": "parse_args",
           "bench_memory": "parse_args", "bench_decode_attack": "parse_args", "bench_realism": "parse_args",
           "bench_shift": "parse_args", "bench_shift_scores": "parse_args", "bench_soak": "parse_args",
           "bench_tiles": "parse_args", "gpu_check": "parse_args"}

_CMD = re.compile(r"python benchmarks/(\w+)\.py((?:[^`\n]|\\\n)*)")


def _module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def recorded_commands():
    """(file, script, argv) of every `python benchmarks/<script>.py ...` written in the docs."""
    out = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for m in _CMD.finditer(text):
            rest = m.group(2).replace("\\\n", " ")
            rest = re.sub(r"\s+\(.*\)\s*$", "", rest)  # a note in parentheses after the command
            rest = re.sub(r"\s+#.*$", "", rest)  # a shell comment
            try:
                argv = shlex.split(rest)
            except ValueError:
                continue  # prose, not a command
            out.append((os.path.relpath(path, ROOT), m.group(1), argv))
    return out


def test_recorded_benchmark_commands_parse_without_deprecated_flags(capsys):
    """Every recorded command line of a benchmark script is accepted by that script today, spelled
    the current way (the deprecated spellings still work, but the docs do not use them)."""
    cmds = recorded_commands()
    scripts = {s for _, s, _ in cmds}
    assert {"bench_trainer", "bench_lifecycle", "bench_realism", "bench_shift", "run_all"} <= scripts, scripts
    mods = {}
    checked = 0
    for path, script, argv in cmds:
        if script == "run_all":
            continue  # run_all's own flags are checked by test_run_all_* in test_bench.py
        if script == "soak_daemon":
            continue  # bench_soak.py's earlier name, kept in its history column
        assert script in PARSERS, f"{path}: a command of benchmarks/{script}.py, which has no known parser"
        mod = mods.setdefault(script, _module(script))
        parse = getattr(mod, PARSERS[script])
        argv = [a for a in argv if not (a.startswith("[") or a.endswith("]"))]  # optional parts in usage lines
        try:
            parse(argv)
        except SystemExit as e:
            if "--help" in argv and e.code == 0:
                capsys.readouterr()
                continue
            pytest.fail(f"{path}: python benchmarks/{script}.py {shlex.join(argv)} -> exit {e.code}: "
                        f"{capsys.readouterr().err}")
        err = capsys.readouterr().err
        assert "deprecated" not in err, f"{path}: {script} {argv}: {err}"
        checked += 1
    assert checked >= 25, checked


def _recipe_parser():
    keys = common.recipe(seconds=(20.0, "seconds"), mode=("ten", ("center", "ten"), "crops"),
                         margin=(None, float, "margin"), finetune=(False, "long"), arch_kw=([], list, "kw"))
    return common.parser("doc", keys, threads=2), keys


def test_set_changes_a_recipe_value_and_checks_it(capsys):
    p, keys = _recipe_parser()
    a = common.parse(p, keys, [])
    assert (a.seconds, a.mode, a.margin, a.finetune, a.arch_kw, a.threads) == (20.0, "ten", None, False, [], 2)
    a = common.parse(p, keys, ["--set", "seconds=15", "--set", "mode=center", "--set", "margin=0.5",
                               "--set", "finetune=yes", "--set", "arch_kw=width=16", "--set", "arch_kw=depth=2",
                               "--threads", "1"])
    assert (a.seconds, a.mode, a.margin, a.finetune, a.arch_kw, a.threads) == (
        15.0, "center", 0.5, True, ["width=16", "depth=2"], 1)
    assert common.sets(a).startswith(" --set seconds=15 --set mode=center")
    for bad, says in ((["--set", "secnds=1"], "KEY one of seconds, mode, margin, finetune, arch_kw"),
                      (["--set", "seconds=fast"], "seconds needs a float value"),
                      (["--set", "mode=five"], "expected one of center, ten"),
                      (["--set", "finetune=maybe"], "finetune needs a"),
                      (["--set", "seconds"], "expected KEY=VALUE"),
                      (["--threads", "0"], "expected a positive number of threads, got '0'")):
        with pytest.raises(SystemExit):
            common.parse(p, keys, bad)
        assert says in capsys.readouterr().err, bad
    assert "seconds" in p.format_help() and "20.0" in p.format_help()  # --help lists the recipe


def test_former_flags_work_with_a_warning_or_fail_naming_the_replacement(capsys):
    p, keys = _recipe_parser()
    a = common.parse(p, keys, ["--seconds", "15", "--finetune", "--arch-kw", "width=16", "--margin=0.5"])
    assert (a.seconds, a.finetune, a.arch_kw, a.margin) == (15.0, True, ["width=16"], 0.5)
    err = capsys.readouterr().err
    assert "--seconds is deprecated and goes in the next release: use --set seconds=15" in err
    assert "use --set finetune=true" in err and "use --set margin=0.5" in err
    for flag, says in (("--json", "the raw numbers are written beside the Markdown section"),
                       ("--workdir", "work files go to runs/bench/<name>/"),
                       ("--work", "work files go to runs/bench/<name>/")):
        with pytest.raises(SystemExit):
            common.parse(p, keys, [flag, "x"])
        assert f"{flag} was removed: {says}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        common.parse(p, keys, ["--models", "a.onnx"], removed={"--models": "use --model"})
    assert "--models was removed: use --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # neither a flag nor a recipe key: argparse's own error
        common.parse(p, keys, ["--bogus", "1"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_soak_runs_beside_its_section_render_in_order(tmp_path, capsys):
    """bench_soak writes each run's JSON beside --markdown PATH (PATH.json, then 2.json, ...) and
    renders PATH from all of them; --set render_only=1 re-renders without measuring."""
    import json

    soak = _module("bench_soak")
    md = str(tmp_path / "soak.md")
    assert soak.run_files(md) == []
    with pytest.raises(SystemExit, match="no soak runs beside"):
        soak.main(["--set", "render_only=1", "--markdown", md])
    src = os.path.join(BENCH, "results")
    for i, name in enumerate(("soak.json", "soak2.json")):
        with open(os.path.join(src, ("soak3.json", "soak4.json")[i]), encoding="utf-8") as f:
            doc = json.load(f)
        with open(str(tmp_path / name), "w", encoding="utf-8") as f:
            json.dump(dict(doc, command=f"run {i + 1}"), f)
    assert soak.run_files(md) == [str(tmp_path / "soak.json"), str(tmp_path / "soak2.json")]
    assert soak.main(["--set", "render_only=1", "--markdown", md]) == 0
    text = open(md, encoding="utf-8").read()
    assert "| run 1 | run 2 |" in text and text.index("`run 1`") < text.index("`run 2`")
    with pytest.raises(SystemExit):
        soak.main(["--out", "x.json"])
    assert "--out was removed: each run's JSON is written beside --markdown PATH" in capsys.readouterr().err


def test_every_benchmark_script_takes_the_shared_command_line():
    """A new script goes through benchmarks/_common.py: its parameters in a RECIPE, no own copy of
    the shared options (the next --markdown or --threads would be the 15th definition again)."""
    scripts = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(BENCH, "*.py"))
                     if os.path.basename(p).startswith(("bench_", "gpu_check")))
    assert scripts == sorted(PARSERS), "add the new script to PARSERS (and give it parse_args)"
    for name in scripts:
        with open(os.path.join(BENCH, name + ".py"), encoding="utf-8") as f:
            src = f.read()
        assert "RECIPE = common.recipe(" in src, name
        for shared in ('"--markdown"', '"--threads"', '"--set"', '"--json"', '"--workdir"', '"--work"'):
            assert f"add_argument({shared}" not in src, f"{name} defines {shared} itself"
