#!/usr/bin/env python3
"""How a trained artifact would do on the line, measured on a large held-out synthetic set.

The demo's test split holds about 60 defects, so "0 escapes and half the good devices PASS"
on it hangs on its one or two hardest defects. This script scores every image of a larger set
(rendered once with its own seed, so no model has seen it) through the artifact's runtime
backend and prints what the line depends on: the share of good devices that PASS at TPR 99.1 to
100 % (1 - FPR), AUC per class, the defect modes and severities at the bottom of the ranking.

    python benchmarks/bench_line_tail.py runs/demo-A/model/model.ten.onnx runs/demo-B/model/model.ten.onnx \\
        --data runs/tail-set --markdown benchmarks/results/line_tail.md

``--data`` is a `nexedge synth` folder (its manifest gives true labels, modes and severities);
when it does not exist it is rendered first (``--n`` images, ``--seed``, half good, batch 2).
"""

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from nexedge import metrics  # noqa: E402
from nexedge.bench import env as benv  # noqa: E402
from nexedge.bench import report  # noqa: E402


def load_manifest(root: str) -> List[Dict[str, Any]]:
    path = os.path.join(root, "manifest.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{root}: no manifest.jsonl (expected a `nexedge synth` folder)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def score_all(artifact: str, root: str, rows: List[Dict[str, Any]]) -> np.ndarray:
    from nexedge.card import load_card
    from nexedge.export.thresholds import score_images
    from nexedge.runtime import open_backend

    card = load_card(artifact)
    be = open_backend(artifact)
    try:
        s, _ = score_images(be, [os.path.join(root, r["path"]) for r in rows], card.input)
    finally:
        be.close()
    return s


def summarize(rows: List[Dict[str, Any]], s: np.ndarray, lowest: int = 10) -> Dict[str, Any]:
    true = np.array([r["true_label"] for r in rows])
    good = true == "good"
    y = (~good).astype(int)
    fpr = metrics.fpr_at_tprs(y, s)
    per_class = {}
    for c in sorted(set(true) - {"good"}):
        m = good | (true == c)
        per_class[c] = {"n": int((true == c).sum()), "auc": metrics.roc_auc((true[m] == c).astype(int), s[m])}
    order = [i for i in np.argsort(s) if not good[i]][:lowest]
    return {
        "n_good": int(good.sum()), "n_defect": int(y.sum()), "auc": metrics.roc_auc(y, s),
        "pass_at_tpr": {k: None if np.isnan(v) else 1.0 - v for k, v in fpr.items()},
        "good_median": float(np.median(s[good])), "per_class": per_class,
        "lowest": [{"class": rows[i]["true_label"], "mode": rows[i].get("defect_mode"),
                    "severity": rows[i].get("severity"), "score": float(s[i]), "path": rows[i]["path"]}
                   for i in order],
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+", help="ONNX models, INT8 models or checkpoints with their cards")
    p.add_argument("--data", required=True, help="held-out `nexedge synth` folder (rendered when missing)")
    p.add_argument("--n", type=int, default=2000, help="images to render when --data is missing (default 2000)")
    p.add_argument("--seed", type=int, default=100, help="seed of that set (default 100; the demo uses 0, 1, ...)")
    p.add_argument("--markdown", help="also write the section as Markdown here")
    args = p.parse_args(argv)
    if not os.path.isdir(args.data):
        from nexedge.cli import main as cli

        if cli(["synth", args.data, "--n", str(args.n), "--seed", str(args.seed), "--good-fraction", "0.5",
                "--no-progress"]) != 0:
            raise SystemExit(f"nexedge synth {args.data} failed")
    rows = load_manifest(args.data)
    command = "python benchmarks/bench_line_tail.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_start = benv.load_average()
    results = []
    for art in args.artifacts:
        t0 = time.perf_counter()
        res = summarize(rows, score_all(art, args.data, rows))
        res.update(artifact=os.path.relpath(art), seconds=round(time.perf_counter() - t0, 1))
        results.append(res)
    tprs = list(results[0]["pass_at_tpr"])
    classes = sorted({c for r in results for c in r["per_class"]})

    def render(md: bool) -> str:
        e = benv.capture(benv.usable_cores())
        lines = [f"## The line's tail: good devices PASSed at high TPR, {results[0]['n_good']} good and "
                 f"{results[0]['n_defect']} defect held-out images", "",
                 f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
                 f"- machine: {benv.one_line(e)}; load average at start {load_start}, at end {benv.load_average()}",
                 f"- command: `{command}`",
                 f"- data: `{os.path.relpath(args.data)}` (true labels from its manifest)", ""]
        head = ["artifact", "AUC"] + [f"PASS at TPR {k}" for k in tprs] + ["good median score"]
        rows_ = [[r["artifact"], f"{100 * r['auc']:.2f}"] + [
            "-" if r["pass_at_tpr"][k] is None else f"{100 * r['pass_at_tpr'][k]:.1f}%" for k in tprs]
            + [f"{r['good_median']:.3f}"] for r in results]
        lines += [report.table(head, rows_, markdown=md), "", "AUC of good vs each class:", ""]
        lines += [report.table(["artifact"] + [f"{c} (n={results[0]['per_class'].get(c, {}).get('n', 0)})"
                                               for c in classes],
                               [[r["artifact"]] + [f"{100 * r['per_class'][c]['auc']:.1f}" if c in r["per_class"]
                                                   else "-" for c in classes] for r in results], markdown=md), ""]
        for r in results:
            lines.append(f"Lowest-scored defects of {r['artifact']} (class, mode, severity, score):")
            lines.append("")
            lines += [f"- {d['class']} {d['mode'] or ''} {d['severity']} {d['score']:.4f} `{d['path']}`"
                      for d in r["lowest"]]
            lines.append("")
        return "\n".join(lines)

    report.emit(render, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
