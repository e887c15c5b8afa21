#!/usr/bin/env python3
"""--resize-mode stretch vs short on a data set of mixed aspect ratios (the magnetic tiles), each
trained by `nexedge train --budget` on the same recipe and seed: test AUC, accuracy, escapes and
overkill at the card's operating point, and the wall time each run took against its budget.

What `nexedge split` advises and what `nexedge train` warns about come from geometry (how much of
each image `short` cuts away); this measures what that costs a model on real images.

    flock /work/locks/cpu python benchmarks/bench_resize_mode.py --data /work/data/tiles \\
        --markdown benchmarks/results/resize_mode.md
"""

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)

from benchmarks import _common as common  # noqa: E402
from nexedge.bench import env as benv  # noqa: E402
from nexedge.bench import report  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    budget=("4m", "nexedge train --budget of each training"),
    resize=("112", "nexedge train --resize"),
    crop=("96", "nexedge train --crop"),
    seed=(0, "nexedge train --seed"),
)


def recipe(args: argparse.Namespace) -> List[str]:
    return ["--arch", "efficientnet_lite0", "--pretrained", "imagenet", "--freeze", "2", "--channels-last",
            "--resize", args.resize, "--crop", args.crop, "--schedule", "cosine", "--select", "last",
            "--batch-size", "32", "--no-test-curves", "--keep", "1", "--seed", str(args.seed), "--budget", args.budget]


def nexedge(argv: List[str], log: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
    proc = subprocess.run([sys.executable, "-m", "nexedge.cli"] + argv, capture_output=True, text=True, env=env,
                          cwd=ROOT)
    with open(log, "w", encoding="utf-8") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"nexedge {' '.join(argv[:1])} exited {proc.returncode}; see {log}:\n{proc.stderr[-2000:]}")
    return proc.stdout


def run_mode(mode: str, args: argparse.Namespace, work: str) -> Dict[str, Any]:
    out = os.path.join(work, mode)
    text = nexedge(["train", "--data", args.data, "--out", out, "--resize-mode", mode] + recipe(args),
                   out + ".train.log")
    warned = [ln[len("WARNING: "):] for ln in text.splitlines() if ln.startswith("WARNING: --resize-mode")]
    nexedge(["eval", out, "--data", args.data, "--split", "test", "--crops", "center", "--out", out + "-eval"],
            out + ".eval.log")
    ev = json.load(open(os.path.join(out + "-eval", "eval.json"), encoding="utf-8"))
    best = next(iter(ev["runs"].values()))["best"]
    cm = best["confusion"]
    op = best["operating_point"] or {}
    bud = json.load(open(os.path.join(out, "budget.json"), encoding="utf-8"))
    return {"mode": mode, "auc": best["metrics"]["center"]["auc"],
            "fpr100": best["metrics"]["center"]["fpr_at_tpr"].get("100"),
            "acc": sum(cm[i][i] for i in range(len(cm))) / sum(map(sum, cm)),
            "escapes": f"{op.get('escapes')} of {op.get('n_defects')}",
            "overkill": f"{op.get('overkill')} of {op.get('n_good')}",
            "epochs": bud["epochs"], "predicted_s": bud["predicted_s"], "actual_s": bud["actual_s"],
            "budget_s": bud["budget_s"], "warned": warned[0] if warned else ""}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE)
    common.add_data(p, "split data set (nexedge split) (default %(default)s)", default="/work/data/tiles")
    return common.parse(p, RECIPE, argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/bench_resize_mode.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = benv.load_average()
    work = common.work_dir("resize_mode")
    rows = [run_mode(m, args, work) for m in ("stretch", "short")]
    for r in rows:
        print(json.dumps(r), flush=True)
    e = benv.capture()
    from nexedge.data.aspect import describe, split_sizes, summarize

    shape = describe(summarize(split_sizes(args.data, "train")[0]))
    headers = ["--resize-mode", "test AUC %", "FPR % at TPR 100 %", "6-class accuracy %", "escapes (card point)",
               "overkill", "epochs chosen", "predicted", "took", "budget", "train's warning"]
    table = [[r["mode"], round(100 * r["auc"], 2), round(100 * r["fpr100"], 1), round(100 * r["acc"], 1),
              r["escapes"], r["overkill"], r["epochs"], f"{r['predicted_s']:.0f} s", f"{r['actual_s']:.0f} s",
              f"{r['budget_s']:.0f} s", r["warned"] or "-"] for r in rows]

    def render(md: bool) -> str:
        lines = ["## Resize mode on mixed aspect ratios: stretch vs short (magnetic tiles), trained to a budget", ""]
        lines += [f"- date: {started}",
                  f"- machine: {benv.one_line(e)}; load average at start {load_start}",
                  f"- command: `{command}`",
                  f"- train: `nexedge train --data {args.data} --resize-mode MODE {' '.join(recipe(args))}`; "
                  f"eval: `nexedge eval RUN --data {args.data} --split test --crops center`",
                  f"- training images: {shape}", "- one seed per mode: the test split holds "
                  "few defects, so differences of one or two images are within seed-to-seed noise", ""]
        lines.append(report.table(headers, table, markdown=md))
        return "\n".join(lines) + "\n"

    report.emit(render, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
