"""The command line every benchmark script shares, and where its outputs go.

A benchmark's parameters are its recipe: named values in a ``RECIPE`` at the top of the script
(:func:`recipe`), printed by ``--help``. Reproducing a section in ``benchmarks/results/`` runs the
command recorded in it; exploring another value is ``--set KEY=VALUE`` for one run, or an edit of
the recipe when the benchmark itself changes. Flags are kept for what a run is *about* (the
model, data or runs it measures) and for the few options every script shares, defined here once:

* ``--markdown PATH``: write the section as Markdown to PATH; the raw numbers of the scripts that
  keep them go to PATH's ``.json`` beside it (:func:`json_path`). ``run_all.py`` passes
  ``benchmarks/results/<name>.md``.
* ``--threads N``: CPU threads, for the scripts that set them.
* ``--set KEY=VALUE`` (repeatable): change one recipe value for this run.

Work files go to ``runs/bench/<name>/`` (:func:`work_dir`), emptied when a run starts and kept
after it for inspection.

A recipe value's former flag (``--seconds 15`` for ``--set seconds=15``) still works for one
release, with a deprecation warning naming the new spelling; the former per-script output flags
(``--json``, ``--workdir``, ``--work``, ``--out``) fail with an error that names the convention.
"""

import argparse
import os
import shutil
import sys
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from nexedge.cliopts import choice

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
#: Work folders of the scripts, relative to the repository (the scripts run there).
WORK_ROOT = os.path.join("runs", "bench")

#: Former per-script flags that are gone, and what replaced them.
REMOVED = {
    "--json": "the raw numbers are written beside the Markdown section: --markdown PATH writes PATH's .json too",
    "--workdir": f"work files go to {WORK_ROOT}/<name>/ (kept after the run)",
    "--work": f"work files go to {WORK_ROOT}/<name>/ (kept after the run)",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Key(NamedTuple):
    """One recipe value: its default, how a ``--set`` text becomes a value, what it means."""

    default: Any
    convert: Callable[[str], Any]
    help: str
    append: bool = False


def _boolean(text: str) -> bool:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(sorted(_TRUE | _FALSE))}")


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of threads, got {text!r}")
    return n


def recipe(**keys: Tuple[Any, ...]) -> Dict[str, Key]:
    """``recipe(seconds=(20.0, "seconds per phase"), mode=("ten", ("center", "ten"), "crops"))``.

    Each value is ``(default, help)``, or ``(default, type, help)`` where type is a callable that
    parses the ``--set`` text (needed when the default is None), a tuple of allowed strings, or
    ``list`` for a value that repeated ``--set KEY=V`` appends to.
    """
    out: Dict[str, Key] = {}
    for name, spec in keys.items():
        if len(spec) == 2:
            default, help_ = spec
            kind: Any = type(default)
        elif len(spec) == 3:
            default, kind, help_ = spec
        else:
            raise TypeError(f"recipe key {name}: expected (default, help) or (default, type, help), got {spec!r}")
        if kind is list:
            out[name] = Key(list(default), str, help_, append=True)
        elif isinstance(kind, tuple):
            out[name] = Key(default, choice(*kind), help_)
        elif kind is bool:
            out[name] = Key(default, _boolean, help_)
        elif kind is type(None):
            raise TypeError(f"recipe key {name}: default None needs a type: (None, float, help)")
        else:
            out[name] = Key(default, kind, help_)
    return out


def _listing(keys: Dict[str, Key]) -> str:
    if not keys:
        return ""
    width = max(len(k) for k in keys) + 2
    shown = {k: repr(v.default) + (" (repeatable)" if v.append else "") for k, v in keys.items()}
    dwidth = max(len(d) for d in shown.values()) + 2
    rows = [f"  {k:<{width}}{shown[k]:<{dwidth}}{v.help}" for k, v in keys.items()]
    return "recipe (change one value for a run with --set KEY=VALUE):\n" + "\n".join(rows)


def parser(doc: Optional[str], keys: Dict[str, Key], threads: Any = False, threads_help: str = "CPU threads",
           markdown: bool = True) -> argparse.ArgumentParser:
    """An ArgumentParser with the shared options; ``threads`` is the ``--threads`` default
    (None: the CPUs this process may use), False for a script without the option; ``markdown``
    False for a script that writes no section."""
    p = argparse.ArgumentParser(description=(doc or "").strip().split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_listing(keys))
    if markdown:
        p.add_argument("--markdown", metavar="PATH",
                       help="also write the section as Markdown to PATH (raw numbers, where kept, to PATH's .json)")
    if threads is not False:
        shown = "OMP_NUM_THREADS when exported, else the CPUs this process may use" if threads is None else threads
        p.add_argument("--threads", type=_threads, default=threads, metavar="N", help=f"{threads_help} (default {shown})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="recipe_set",
                   help="change one recipe value for this run (repeatable; the keys are listed below)")
    return p


def add_model(p: argparse.ArgumentParser, help_: str) -> None:
    """``--model``: the model (an .onnx with its card) a daemon benchmark serves."""
    p.add_argument("--model", help=help_)


def add_data(p: argparse.ArgumentParser, help_: str, default: Optional[str] = None, required: bool = False) -> None:
    """``--data``: the data set (a ``nexedge split`` root) a benchmark reads."""
    p.add_argument("--data", default=default, required=required, help=help_)


def add_code_roots(p: argparse.ArgumentParser) -> None:
    """``--code-roots``: checkouts whose daemons are measured side by side (this one first)."""
    p.add_argument("--code-roots", default=os.getcwd(), metavar="DIR,DIR",
                   help="comma-separated checkouts of nexedge to measure side by side (default: this one)")


def _option_strings(p: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings}


def translate(p: argparse.ArgumentParser, keys: Dict[str, Key], argv: Sequence[str],
              removed: Optional[Dict[str, str]] = None) -> List[str]:
    """Rewrite former recipe flags (``--seconds 15``) to ``--set seconds=15`` with a warning;
    stop at a removed flag (:data:`REMOVED`, plus the script's ``removed``) with an error naming
    its replacement."""
    known = _option_strings(p)
    gone = dict(REMOVED, **(removed or {}))
    out: List[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        tok = items[i]
        i += 1
        if tok == "--":
            out += items[i - 1:]
            break
        if not tok.startswith("--") or tok in known:
            out.append(tok)
            continue
        name, eq, value = tok.partition("=")
        if name in known:
            out.append(tok)
            continue
        if name in gone:
            p.error(f"{name} was removed: {gone[name]}")
        key = name[2:].replace("-", "_")
        if key not in keys:
            out.append(tok)  # argparse names it as unrecognized
            continue
        if not eq:
            if keys[key].convert is _boolean:
                value = "true"
            elif i < len(items):
                value = items[i]
                i += 1
            else:
                p.error(f"{name}: expected a value")
        print(f"{p.prog}: WARNING: {name} is deprecated and goes in the next release: use --set {key}={value}",
              file=sys.stderr)
        out += ["--set", f"{key}={value}"]
    return out


def parse(p: argparse.ArgumentParser, keys: Dict[str, Key], argv: Optional[Sequence[str]] = None,
          removed: Optional[Dict[str, str]] = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); the recipe values become attributes of the result
    (``args.seconds``), with each ``--set KEY=VALUE`` checked against the recipe. ``removed`` maps
    a former flag of this script to what replaced it (it then fails naming that)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(translate(p, keys, argv, removed))
    for name, key in keys.items():
        setattr(args, name, list(key.default) if key.append else key.default)
    for item in args.recipe_set:
        name, eq, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not eq or name not in keys:
            p.error(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(keys) or '(none: no recipe)'}")
        key = keys[name]
        try:
            value = key.convert(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            kind = getattr(key.convert, "__name__", "value")
            p.error(f"--set {item!r}: {name} needs a {kind} value ({e})")
        if key.append:
            getattr(args, name).append(value)
        else:
            setattr(args, name, value)
    args.argv = argv
    return args


def json_path(markdown: str) -> str:
    """Where the raw numbers of a section written to ``markdown`` go: the same name, ``.json``."""
    return os.path.splitext(markdown)[0] + ".json"


def work_dir(name: str, fresh: bool = True) -> str:
    """``runs/bench/<name>/`` (relative to the current folder), emptied first when ``fresh``."""
    path = os.path.join(WORK_ROOT, name)
    if fresh and os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    return path


def sets(args: argparse.Namespace) -> str:
    """The run's recipe changes as command-line text (`` --set k=v`` each), for a recorded command."""
    import shlex

    return "".join(f" --set {shlex.quote(s)}" for s in args.recipe_set)
