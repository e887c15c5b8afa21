#!/usr/bin/env python3
"""Training beside an equal competing job: time ratio vs quiet, OpenMP threads spinning vs sleeping.

The same short `nexedge train` (a few hundred magnetic-tile images, EfficientNet-Lite0 by
default) runs quiet, then while an identical training runs beside it, for two behaviours in one
run:

- ``spinning``: the environment as before (libgomp's default: each idle OpenMP worker spins about
  300,000 times after every parallel region); the CLI's `threads.quiet_openmp` is switched off.
- ``sleeping``: the CLI as shipped (OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=0 set before torch
  loads).

Both use the command's default --threads (the usable cores). The competitor is the same command
with more epochs, started first and stopped when the measured run ends, so the measured run shares
the box with it throughout. Time = the training loop's own seconds (the sum of the epochs in
metrics.jsonl: training, validation, checkpoints), with the process wall time and CPU seconds
beside it. Fair share with one equal competitor on a full box is 2x; the target is <= 2.2x.

    flock /work/locks/cpu python benchmarks/bench_contention.py --data /work/data/tiles \\
        --markdown benchmarks/results/contention.md
"""

import argparse
import datetime as _dt
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)

from benchmarks import _common as common  # noqa: E402
from nexedge.bench import env as benv  # noqa: E402
from nexedge.bench import report  # noqa: E402
from nexedge.threads import QUIET_OPENMP, openmp_runtime  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    train_images=(320, "training images"),
    val_images=(64, "validation images"),
    arch=("efficientnet_lite0", "efficientnet_lite0 (pretrained, docs recipe) or resnet18"),
    resize=(144, "nexedge train --resize"),
    crop=(128, "nexedge train --crop"),
    epochs=(2, "epochs of the measured run"),
    settle=(5.0, "seconds the competitor runs before the measurement"),
    repeats=(2, "rounds of the four runs, the behaviours' order swapped each round"),
)

#: Runs `nexedge` with the CLI's OpenMP settings switched off: the behaviour before they existed.
SPINNING = ("import sys; from nexedge import threads; threads.quiet_openmp = lambda environ=None: {}; "
            "from nexedge.cli import main; sys.exit(main(sys.argv[1:]))")
QUIET = "import sys; from nexedge.cli import main; sys.exit(main(sys.argv[1:]))"
MODES = {"spinning": SPINNING, "sleeping": QUIET}


def subset(src: str, dst: str, n_train: int, n_val: int) -> Dict[str, int]:
    """Symlink about ``n_train`` / ``n_val`` images of ``src``'s train/val splits into ``dst``, every
    class in proportion (evenly spaced files, so the same subset each time)."""
    counts = {}
    for split, n in (("train", n_train), ("val", n_val)):
        classes = sorted(os.listdir(os.path.join(src, split)))
        total = sum(len(os.listdir(os.path.join(src, split, c))) for c in classes)
        taken = 0
        for c in classes:
            files = sorted(os.listdir(os.path.join(src, split, c)))
            k = max(2, round(n * len(files) / total))
            step = len(files) / k
            os.makedirs(os.path.join(dst, split, c), exist_ok=True)
            for i in range(min(k, len(files))):
                f = files[int(i * step)]
                os.symlink(os.path.abspath(os.path.join(src, split, c, f)), os.path.join(dst, split, c, f))
                taken += 1
        counts[split] = taken
    return counts


def train_argv(data: str, out: str, args: argparse.Namespace, epochs: int) -> List[str]:
    argv = ["train", "--data", data, "--out", out, "--arch", args.arch, "--resize", str(args.resize),
            "--crop", str(args.crop), "--epochs", str(epochs), "--batch-size", "32", "--no-test-curves",
            "--no-progress", "--keep", "1", "--overwrite", "--lr", "0.01"]
    if args.arch.startswith("efficientnet_lite"):
        argv += ["--pretrained", "imagenet", "--freeze", "2", "--channels-last"]
    return argv


def _env(mode: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in QUIET_OPENMP and k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.path.abspath(ROOT)
    return env


def start(mode: str, argv: List[str], log: str) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-c", MODES[mode]] + argv, stdout=f, stderr=subprocess.STDOUT,
                                env=_env(mode), cwd=ROOT, start_new_session=True)


def finish(proc: subprocess.Popen) -> Tuple[int, float]:
    """(exit status, CPU seconds user+sys) of a started process, waiting for it."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def epochs_seconds(out: str) -> float:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return sum(json.loads(line)["time_s"] for line in f if line.strip())


def wait_for(log: str, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"competitor ended early (exit {proc.returncode}); see {log}")
        with open(log, encoding="utf-8", errors="replace") as f:
            if text in f.read():
                return
        time.sleep(0.5)
    raise RuntimeError(f"competitor did not reach {text!r} in {timeout:.0f} s; see {log}")


def one_run(mode: str, data: str, work: str, args: argparse.Namespace, competing: bool) -> Dict[str, Any]:
    tag = f"{mode}-{'busy' if competing else 'quiet'}"
    comp = None
    if competing:
        clog = os.path.join(work, tag + ".competitor.log")
        comp = start(mode, train_argv(data, os.path.join(work, tag + ".competitor"), args, 1000), clog)
        wait_for(clog, "nexedge train:", comp)  # data found, model built
        time.sleep(args.settle)  # past the start-up, into its epochs
    out = os.path.join(work, tag)
    log = out + ".log"
    t0 = time.perf_counter()
    proc = start(mode, train_argv(data, out, args, args.epochs), log)
    rc, cpu = finish(proc)
    wall = time.perf_counter() - t0
    if comp is not None:
        still = comp.poll() is None
        os.killpg(comp.pid, signal.SIGTERM)
        comp.wait(30)
        if not still:
            raise RuntimeError(f"the competitor ended before the measured run; see {clog}")
    if rc != 0:
        raise RuntimeError(f"{tag}: nexedge train exited {rc}; see {log}")
    return {"mode": mode, "competing": competing, "train_s": epochs_seconds(out), "wall_s": wall, "cpu_s": cpu}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE)
    common.add_data(p, "split data set (nexedge split) to take images from (default %(default)s)",
                    default="/work/data/tiles")
    return common.parse(p, RECIPE, argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/bench_contention.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_start = benv.load_average()
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "data")
        counts = subset(args.data, data, args.train_images, args.val_images)
        for r in range(args.repeats):
            order = list(MODES) if r % 2 == 0 else list(MODES)[::-1]  # neither behaviour always goes first
            for mode in order:
                for competing in (False, True):
                    row = one_run(mode, data, work, args, competing)
                    row["round"] = r + 1
                    rows.append(row)
                    print(f"round {r + 1} {mode:9s} {'with competitor' if competing else 'quiet':15s} "
                          f"train {row['train_s']:6.1f} s  wall {row['wall_s']:6.1f} s  CPU {row['cpu_s']:6.1f} s",
                          flush=True)
    e = benv.capture()
    table: List[List[Any]] = []
    ratios: Dict[str, List[float]] = {}
    for r in range(1, args.repeats + 1):
        for mode in MODES:
            q = next(x for x in rows if x["round"] == r and x["mode"] == mode and not x["competing"])
            b = next(x for x in rows if x["round"] == r and x["mode"] == mode and x["competing"])
            ratio = b["train_s"] / q["train_s"]
            ratios.setdefault(mode, []).append(ratio)
            table.append([r, mode, round(q["train_s"], 1), round(b["train_s"], 1), f"{ratio:.2f}x",
                          f"{b['wall_s'] / q['wall_s']:.2f}x", round(q["cpu_s"], 1), round(b["cpu_s"], 1)])
    headers = ["round", "OpenMP threads", "quiet: training s", "beside an equal training: s", "time ratio",
               "wall ratio", "quiet: CPU s", "beside: CPU s"]

    def render(md: bool) -> str:
        lines = ["## Training beside an equal competing job: OpenMP threads spinning vs sleeping", ""]
        lines += [f"- date: {started}",
                  f"- machine: {benv.one_line(e)}; load average at start {load_start}; OpenMP runtime "
                  f"torch ships: {openmp_runtime()}",
                  f"- command: `{command}`",
                  f"- run: `nexedge {' '.join(train_argv('DATA', 'OUT', args, args.epochs))}` on {counts['train']} "
                  f"train and {counts['val']} val images of {args.data}, default --threads "
                  f"({benv.usable_cores()} here); competitor: the same command with more epochs, started "
                  f"{args.settle:g} s after its start line; spinning = the CLI's OMP_WAIT_POLICY=PASSIVE / "
                  "GOMP_SPINCOUNT=0 switched off (libgomp's default spin), sleeping = the CLI as shipped",
                  "- time = the training loop's seconds (epochs in metrics.jsonl); fair share beside one equal job "
                  "on a full box is 2x, target <= 2.2x; CPU s = the measured process's user + system seconds",
                  ""]
        lines.append(report.table(headers, table, markdown=md))
        lines.append("")
        for mode, rs in ratios.items():
            lines.append(f"- {mode}: time ratio {', '.join(f'{x:.2f}x' for x in rs)}")
        for competing, what in ((False, "quiet"), (True, "beside the competitor")):
            sp = [x["train_s"] for x in rows if x["mode"] == "spinning" and x["competing"] == competing]
            sl = [x["train_s"] for x in rows if x["mode"] == "sleeping" and x["competing"] == competing]
            lines.append(f"- {what}: spinning / sleeping training time "
                         + ", ".join(f"{a / b:.2f}x" for a, b in zip(sp, sl)) + " (per round)")
        return "\n".join(lines) + "\n"

    report.emit(render, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
