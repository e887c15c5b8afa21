"""Command-line options shared by several ``nexedge`` commands: each defined once, here.

* Global options (:data:`GLOBAL_OPTIONS`): ``--threads`` (defined in :mod:`nexedge.threads` beside the
  code that applies it), ``--no-progress`` (:mod:`nexedge.progress`) and ``--json`` belong to ``nexedge``
  itself; a command that honours one says so with :func:`uses_globals`. They may be given before or
  after the command: :func:`rewrite_retired` moves them in front before parsing, silently.
* ``--tpr-floor``: :func:`add_tpr_floor_option`.
* Families of expert knobs: one repeatable ``--<family>-kw KEY=VALUE`` option each
  (:func:`add_kw_option`); every key sets the attribute its old flag set, so ``run_*`` reads
  ``args.<name>`` as before. An unknown key fails naming it and the valid keys.
* Retired spellings (:data:`RETIRED`) keep working: :func:`rewrite_retired` maps them to the new one and
  prints a one-line note naming it.

Cheap to import: no torch (``nexedge --help`` builds every parser).
"""

import argparse
import sys
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from nexedge.metrics import DEFAULT_TPR_FLOOR
from nexedge.progress import add_progress_option
from nexedge.threads import add_threads_option

__all__ = ["DEFAULT_TPR_FLOOR", "GLOBAL_OPTIONS", "Key", "RETIRED", "add_global_options", "add_kw_option",
           "add_threads_option", "add_tpr_floor_option", "rewrite_retired", "uses_globals"]

#: Global option -> the number of values it takes.
GLOBAL_OPTIONS: Dict[str, int] = {"--threads": 1, "--no-progress": 0, "--json": 0}
#: Global option -> attribute it sets.
GLOBAL_DESTS: Dict[str, str] = {flag: flag[2:].replace("-", "_") for flag in GLOBAL_OPTIONS}
#: (command, flag): the command has an option of that name of its own (``bench --json OUT``: a file).
OWN_OPTIONS = {("bench", "--json")}


def _tpr_floor_arg(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tpr-floor {text!r}: expected a number in (0, 1)") from None
    if not 0.0 < x < 1.0:
        raise argparse.ArgumentTypeError(f"--tpr-floor {text!r}: expected a number in (0, 1)")
    return x


def add_tpr_floor_option(p: argparse.ArgumentParser) -> None:
    """The one ``--tpr-floor`` option (train, eval, export, thresholds): the floor below which an
    operating point's 95 % TPR lower bound is reported with a WARNING; default
    :data:`nexedge.metrics.DEFAULT_TPR_FLOOR`."""
    p.add_argument("--tpr-floor", type=_tpr_floor_arg, default=DEFAULT_TPR_FLOOR, metavar="P",
                   help="WARN when a TPR target's 95%% lower bound (given the defects measured) is below this "
                        f"(default {DEFAULT_TPR_FLOOR:g})")


# --- global options --------------------------------------------------------------------------------

def add_global_options(p: argparse.ArgumentParser) -> None:
    """``--threads``, ``--no-progress`` and ``--json`` on the ``nexedge`` parser (once for every command)."""
    g = p.add_argument_group("global options (before or after COMMAND; each command's --help says which it uses)")
    add_threads_option(g)
    p.set_defaults(_threads_torch=False)
    add_progress_option(g)
    g.add_argument("--json", action="store_true", help="print the command's result as JSON")


_GLOBAL_HELP = {"--threads": "--threads N (CPU threads)", "--no-progress": "--no-progress",
                "--json": "--json (print the result as JSON)"}


def uses_globals(p: argparse.ArgumentParser, *flags: str, torch: bool = False) -> None:
    """Declare the global options a command honours (``torch``: it computes with torch, so ``--threads``
    sets torch's thread counts before it runs); its --help lists them."""
    unknown = [f for f in flags if f not in GLOBAL_OPTIONS]
    if unknown:
        raise ValueError(f"{unknown}: not global options; expected some of {sorted(GLOBAL_OPTIONS)}")
    p.set_defaults(_globals=tuple(flags), _threads_torch=torch)
    line = "global options it uses (before or after the command): " + ", ".join(_GLOBAL_HELP[f] for f in flags)
    p.epilog = (p.epilog + "\n\n" + line) if p.epilog else line


def check_globals(args: argparse.Namespace) -> Optional[str]:
    """The error for a global option given to a command that does not use it (None when fine)."""
    cmd = getattr(args, "_name", "")
    uses = getattr(args, "_globals", ())
    for flag, dest in GLOBAL_DESTS.items():
        if flag in uses or (cmd, flag) in OWN_OPTIONS:
            continue
        if getattr(args, dest, None) not in (None, False):
            return f"nexedge {cmd}: {flag} has no effect on this command"
    return None


def add_curve_key_options(p: argparse.ArgumentParser) -> None:
    """``--client-key`` and ``--server-key`` (``nexedge line``, ``nexedge pull``): CurveZMQ key files."""
    p.add_argument("--client-key", metavar="FILE", help="this client's *.key_secret (when the daemon uses CurveZMQ)")
    p.add_argument("--server-key", metavar="FILE", help="the daemon's public *.key (when it uses CurveZMQ)")


# --- KEY=VALUE families ----------------------------------------------------------------------------

def boolean(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def choice(*values: str) -> Callable[[str], str]:
    """A cast accepting only ``values``."""
    def cast(text: str) -> str:
        if text not in values:
            raise ValueError(f"expected one of {', '.join(values)}")
        return text
    cast.__name__ = "|".join(values)
    return cast


class Key(NamedTuple):
    """One key of a KEY=VALUE family: the attribute it sets, how its value is read, its default."""

    dest: str
    cast: Callable[[str], Any]
    default: Any = None
    help: str = ""


class _KwAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, keys: Dict[str, Key], **kwargs: Any) -> None:
        self.keys = keys
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        flag = option_string or self.option_strings[0]
        name, sep, value = str(values).partition("=")
        name = name.strip()
        if not sep or not name:
            raise argparse.ArgumentError(self, f"{flag} {values!r}: expected KEY=VALUE")
        prefix, dot, rest = name.partition(".")
        key = self.keys.get(name) or (self.keys.get(prefix + ".") if dot and rest else None)
        if key is None:
            raise argparse.ArgumentError(self, f"{flag} {values!r}: unknown key {name!r}; expected one of "
                                               f"{', '.join(k + ('CLASS' if k.endswith('.') else '') for k in self.keys)}")
        if dot and rest and name not in self.keys:  # a per-class entry: CLASS=VALUE appended to a list
            try:
                key.cast(value)
            except (TypeError, ValueError) as e:
                raise argparse.ArgumentError(self, f"{flag} {values!r}: {e}") from None
            setattr(namespace, key.dest, list(getattr(namespace, key.dest, None) or []) + [f"{rest}={value}"])
            return
        try:
            setattr(namespace, key.dest, key.cast(value))
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentError(self, f"{flag} {values!r}: {e}") from None


def add_kw_option(p: Any, flag: str, keys: Dict[str, Key], help: str) -> None:
    """A repeatable ``flag KEY=VALUE`` option; each key sets ``args.<Key.dest>`` (default ``Key.default``).
    A key ending in ``.`` takes ``KEY.CLASS=VALUE`` entries, collected as ``CLASS=VALUE`` in a list."""
    listed = "; ".join(f"{k}{'CLASS' if k.endswith('.') else ''}" + (f" ({v.help})" if v.help else "")
                       + (f", default {v.default}" if v.default not in (None, [], False) else "")
                       for k, v in keys.items())
    p.add_argument(flag, action=_KwAction, keys=keys, metavar="KEY=VALUE",
                   help=f"{help} (repeatable). Keys: {listed}".replace("%", "%%"))
    p.set_defaults(**{k.dest: (list(k.default) if isinstance(k.default, list) else k.default)
                      for k in keys.values()})


# --- retired and moved spellings -------------------------------------------------------------------

class Retired(NamedTuple):
    """An old flag's new spelling: ``new KEY=VALUE`` (``key`` None: ``new VALUE``); ``flag``: the old
    flag took no value (``KEY=true``)."""

    new: str
    key: Optional[str]
    flag: bool = False


#: command -> old flag -> its new spelling.
RETIRED: Dict[str, Dict[str, Retired]] = {
    "train": {
        "--sat-alpha": Retired("--loss-kw", "sat_alpha"),
        "--sat-es": Retired("--loss-kw", "sat_es"),
        "--wbce-lambda": Retired("--loss-kw", "wbce_lambda"),
        "--wbce-start": Retired("--loss-kw", "wbce_start."),
        "--wbce-start-default": Retired("--loss-kw", "wbce_start_default"),
        "--momentum": Retired("--optimizer-kw", "momentum"),
        "--weight-decay": Retired("--optimizer-kw", "weight_decay"),
        "--warmup-epochs": Retired("--optimizer-kw", "warmup_epochs"),
        "--budget-resize": Retired("--budget-kw", "resize"),
        "--budget-min-epochs": Retired("--budget-kw", "min_epochs"),
        "--step-size": Retired("--schedule", "step_size"),
        "--gamma": Retired("--schedule", "gamma"),
    },
    "calibrate": {
        "--ort-activations": Retired("--quant-kw", "ort_activations"),
        "--ort-weights": Retired("--quant-kw", "ort_weights"),
        "--per-tensor": Retired("--quant-kw", "per_tensor", flag=True),
        "--reduce-range": Retired("--quant-kw", "reduce_range", flag=True),
        "--quantize-stem": Retired("--quant-kw", "quantize_stem", flag=True),
        "--thresholds-split": Retired("--report-kw", "thresholds_split"),
        "--eval-split": Retired("--report-kw", "eval_split"),
        "--eval-images": Retired("--report-kw", "eval_images"),
        "--deploy-tpr": Retired("--report-kw", "deploy_tpr"),
    },
    "synth": {
        "--sheet-per-class": Retired("--sheet-kw", "per_class"),
        "--sheet-scale": Retired("--sheet-kw", "scale"),
        "--sheet-boxes": Retired("--sheet-kw", "boxes", flag=True),
        "--realism-looks": Retired("--realism-kw", "looks"),
        "--realism-n": Retired("--realism-kw", "n"),
        "--realism-json": Retired("--realism-kw", "json"),
        "--realism-figure": Retired("--realism-kw", "figure"),
        "--no-stretch": Retired("--realism-kw", "stretch=false", flag=True),
    },
    "bench": {
        "--gemm-size": Retired("--gemm-kw", "size"),
        "--gemm-seconds": Retired("--gemm-kw", "seconds"),
    },
    "build-engine": {
        "--workspace-mib": Retired("--build-kw", "workspace_mib"),
        "--version-compatible": Retired("--build-kw", "version_compatible", flag=True),
        "--calib-cache": Retired("--build-kw", "calib_cache"),
        "--timing-cache": Retired("--build-kw", "timing_cache"),
    },
    "export": {
        "--parity-data": Retired("--parity-kw", "data"),
        "--parity-images": Retired("--parity-kw", "images"),
        "--tolerance": Retired("--parity-kw", "tolerance"),
        "--auto-tpr": Retired("--auto-kw", "tpr"),
        "--allow-unseen-mirrors": Retired("--auto-kw", "allow_unseen_mirrors", flag=True),
    },
    "explain": {
        "--patch": Retired("--occlusion-kw", "patch"),
        "--stride": Retired("--occlusion-kw", "stride"),
    },
    "camera-sim": {
        "--window": Retired("--sim-kw", "window"),
        "--prefix": Retired("--sim-kw", "prefix"),
        "--limit": Retired("--sim-kw", "limit"),
        "--timeout": Retired("--sim-kw", "timeout"),
    },
    "pull": {
        "--page-size": Retired("--transport-kw", "page_size"),
        "--retries": Retired("--transport-kw", "retries"),
        "--timeout": Retired("--transport-kw", "timeout"),
    },
}

#: The train schedule defaults (``--schedule step[:N[:GAMMA]]``).
STEP_SIZE, STEP_GAMMA = 14, 0.1


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _split_schedule(text: str) -> Tuple[str, List[str]]:
    name, _, rest = text.partition(":")
    return name, (rest.split(":") if rest else [])


def _fix_schedule(cmd: str, rest: List[str], step: Dict[str, str], note: Callable[[str], None]) -> List[str]:
    """Fold retired ``--step-size``/``--gamma`` values into ``--schedule step:N:GAMMA``."""
    at = None
    for i, t in enumerate(rest):
        if t == "--schedule" and i + 1 < len(rest):
            at = (i, i + 2, rest[i + 1])
        elif t.startswith("--schedule="):
            at = (i, i + 1, t.split("=", 1)[1])
    name, parts = _split_schedule(at[2]) if at else ("step", [])
    old = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in step.items())
    if name != "step":
        note(f"nexedge {cmd}: {old} is retired and had no effect with --schedule {name}; dropped")
        return rest
    n = step.get("step_size", parts[0] if parts else str(STEP_SIZE))
    g = step.get("gamma", parts[1] if len(parts) > 1 else str(STEP_GAMMA))
    new = f"step:{n}:{g}"
    note(f"nexedge {cmd}: {old} is retired; use --schedule {new}")
    if at:
        return rest[:at[0]] + ["--schedule", new] + rest[at[1]:]
    return rest + ["--schedule", new]


def rewrite_retired(argv: Sequence[str], note: Callable[[str], None] = _note) -> List[str]:
    """``argv`` with global options moved in front of the command (silently) and retired spellings
    replaced by their new ones (a one-line ``note`` each)."""
    argv = list(argv)
    c = 0
    while c < len(argv):  # find the command: the first word that is not a global option or its value
        t = argv[c]
        if t == "--":
            return argv
        if t.startswith("-"):
            c += 1 + (GLOBAL_OPTIONS.get(t, 0) if "=" not in t else 0)
            continue
        break
    if c >= len(argv):
        return argv
    cmd = argv[c]
    for t in argv[:c]:
        if (cmd, t.partition("=")[0]) in OWN_OPTIONS:
            sys.stderr.write(f"nexedge {cmd}: {t.partition('=')[0]} is this command's own option here "
                             f"(see nexedge {cmd} --help); give it after the command\n")
            raise SystemExit(2)
    retired = RETIRED.get(cmd, {})
    front: List[str] = []
    rest: List[str] = []
    step: Dict[str, str] = {}
    j = c + 1
    while j < len(argv):
        t = argv[j]
        if t == "--":
            rest += argv[j:]
            break
        name, eq, value = t.partition("=") if t.startswith("--") else (t, "", "")
        if name in GLOBAL_OPTIONS and (cmd, name) not in OWN_OPTIONS:
            n = 0 if eq else GLOBAL_OPTIONS[name]
            front += argv[j:j + 1 + n]
            j += 1 + n
            continue
        r = retired.get(name)
        if r is None:
            rest.append(t)
            j += 1
            continue
        if r.flag:
            j += 1
            kv = r.key if "=" in r.key else f"{r.key}=true"
        else:
            if not eq:
                if j + 1 >= len(argv):
                    rest.append(t)  # let the parser say the value is missing
                    j += 1
                    continue
                value = argv[j + 1]
            j += 1 if eq else 2
            if r.new == "--schedule":
                step[r.key] = value
                continue
            kv = f"{r.key}{value}" if r.key.endswith(".") else f"{r.key}={value}"
        rest += [r.new, kv]
        note(f"nexedge {cmd}: {name} is retired; use {r.new} {kv}")
    if step:
        rest = _fix_schedule(cmd, rest, step, note)
    return argv[:c] + front + [cmd] + rest
