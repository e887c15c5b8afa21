#!/usr/bin/env python3
"""How a trained artifact would do on the line, measured on a large held-out synthetic set.

The demo's test split holds about 60 defects, so "0 escapes and half the good devices PASS"
on it hangs on its one or two hardest defects. This script scores every image of a larger set
(rendered once with its own seed, so no model has seen it) through the artifact's runtime
backend and prints what the line depends on: the share of good devices that PASS at TPR 99.1 to
100 % (1 - FPR), AUC per class, the defect modes and severities at the bottom of the ranking.

    python benchmarks/bench_line_tail.py runs/demo-A/model/model.onnx runs/demo-B/model/model.onnx \\
        --data runs/tail-set --markdown benchmarks/results/line_tail.md

Without artifacts it trains `nexedge demo --seed S` for each of the recipe's ``seeds`` (0,1) into
``runs/tail-demo-seedS`` (kept, and reused when there) and scores their FP32 and INT8 models.

``--data`` is a `nexedge synth` folder (its manifest gives true labels, modes and severities);
when it does not exist it is rendered first (the recipe's ``n`` images and ``seed``, half good, batch 2).
"""

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from benchmarks import _common as common  # noqa: E402
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


def per_mode_auc(rows: List[Dict[str, Any]], s: np.ndarray) -> Dict[str, Dict[str, Any]]:
    """AUC of good vs each (class, mode) for classes drawn in several modes (lead_defect bent/short/shifted)."""
    good = np.array([r["true_label"] == "good" for r in rows])
    keys = sorted({f"{r['true_label']} {r['defect_mode']}" for r in rows if r.get("defect_mode")})
    out = {}
    for k in keys:
        m = np.array([f"{r['true_label']} {r.get('defect_mode')}" == k for r in rows])
        sel = good | m
        out[k] = {"n": int(m.sum()), "auc": metrics.roc_auc(m[sel].astype(int), s[sel])}
    return out


def simulate_split(rows: List[Dict[str, Any]], s: np.ndarray, n_val: int, n_test: int, n_good: int,
                   draws: int = 4000, seed: int = 0) -> Dict[str, Any]:
    """The demo's line criterion on random splits of this set's scores.

    Each draw takes ``n_val`` defects as the validation split (threshold = their lowest score:
    the card's operating point for TPR 100 %), then ``n_test`` other defects and ``n_good`` good
    images as the test split, and counts test escapes (defects below the threshold) and the share
    of good devices that PASS. Whatever the model, the lowest of the n_val + n_test defects is a
    validation one with probability n_val / (n_val + n_test) (ties aside), and that is P(0 escapes).
    """
    problem = split_problem(rows, (n_val, n_test, n_good))
    if problem:
        raise ValueError(problem)
    true = np.array([r["true_label"] for r in rows])
    d, g = s[true != "good"], s[true == "good"]
    rng = np.random.default_rng(seed)
    zero, share = np.zeros(draws, bool), np.zeros(draws)
    for k in range(draws):
        dd = rng.permutation(d)
        t = dd[:n_val].min()
        zero[k] = not (dd[n_val:n_val + n_test] < t).any()
        share[k] = (rng.choice(g, n_good, replace=False) < t).mean()
    return {"n_val": n_val, "n_test": n_test, "n_good": n_good, "draws": draws,
            "p_zero_escapes": float(zero.mean()), "bound": n_val / (n_val + n_test),
            "pass_median": float(np.median(share)), "pass_p25": float(np.percentile(share, 25)),
            "p_half_pass": float((share >= 0.5).mean()), "p_both": float((zero & (share >= 0.5)).mean())}


def split_problem(rows: List[Dict[str, Any]], split: Sequence[int]) -> Optional[str]:
    """Why ``rows`` cannot fill a (val defects, test defects, test good) split, or None."""
    n_val, n_test, n_good = split
    n_def = sum(r["true_label"] != "good" for r in rows)
    if n_def < n_val + n_test or len(rows) - n_def < n_good:
        return (f"split {n_val},{n_test},{n_good} needs {n_val + n_test} defect and {n_good} good images; "
                f"the set has {n_def} and {len(rows) - n_def}")
    return None


def parse_split(text: str) -> List[int]:
    try:
        v = [int(x) for x in text.split(",")]
    except ValueError:
        v = []
    if len(v) != 3 or min(v) < 1:
        raise argparse.ArgumentTypeError(f"split {text!r}: expected VAL_DEFECTS,TEST_DEFECTS,TEST_GOOD, "
                                         "three positive integers such as 53,62,60")
    return v


#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    seeds=("0,1", "demo seeds when no artifact is given"),
    n=(2000, "images to render when --data is missing"),
    seed=(100, "seed of that set (the demo uses 0, 1, ...)"),
    split=([109, 120, 121], parse_split, "split sizes VD,TD,TG of the demo criterion simulation: validation "
           "defects, test defects, test good (`nexedge demo`'s splits, 2,400 images)"),
)


def at_card_threshold(artifact: str, rows: List[Dict[str, Any]], s: np.ndarray, target_tpr: float = 1.0
                      ) -> Dict[str, Any]:
    """What the line does with this artifact as deployed: its card's threshold for ``target_tpr`` (the
    daemon's default) applied to every held-out image: escapes against the card's promise, good PASSed."""
    from nexedge.card import load_card

    card = load_card(artifact, verify=False)
    op = card.operating_point(target_tpr)
    good = np.array([r["true_label"] == "good" for r in rows])
    rej = s >= float(op["threshold"])
    esc, n_def = int((~rej & ~good).sum()), int((~good).sum())
    return {"threshold": float(op["threshold"]), "crops": card.runtime_crop_mode, "aggregate": card.aggregate,
            "precision": card.precision, "escapes": esc, "n_defects": n_def, "escape_rate": esc / max(n_def, 1),
            "expected_escape_rate": metrics.expected_escape_rate(op), "escape_bound95": metrics.escape_bound(op),
            "promise": metrics.promise_check(esc, n_def, op), "good_pass": float((~rej & good).mean() / good.mean()),
            "val_defects": op.get("n_defects")}


def deployed_lines(results: List[Dict[str, Any]], md: bool) -> List[str]:
    """The demo criterion: per artifact at its card's threshold, then the mean over the INT8 (deployed) ones."""
    head = ["artifact", "crops", "threshold", "escapes", "escape rate", "card: expected / 95 % bound",
            "within bound (P)", "good PASSed"]
    body = []
    for r in results:
        d = r["deployed"]
        pr = d["promise"] or {}
        body.append([r["artifact"], f"{d['crops']} {d['aggregate']}", f"{d['threshold']:.4g}",
                     f"{d['escapes']}/{d['n_defects']}", f"{100 * d['escape_rate']:.2f}%",
                     f"{100 * (d['expected_escape_rate'] or float('nan')):.2f}% / "
                     f"{100 * (d['escape_bound95'] or float('nan')):.2f}%",
                     "-" if not pr else f"{'yes' if pr['within'] else 'NO'} ({pr['p_value']:.2g})",
                     f"{100 * d['good_pass']:.1f}%"])
    out = ["At each artifact's own card threshold (TPR 100 % on its validation split, as the daemon decides by "
           "default), on every held-out image:", "", report.table(head, body, markdown=md), ""]
    dep = [r["deployed"] for r in results if r["deployed"]["precision"] == "int8"] or \
        [r["deployed"] for r in results]
    if len(dep) > 1:
        esc = float(np.mean([d["escape_rate"] for d in dep]))
        bound = float(np.mean([d["escape_bound95"] for d in dep]))
        pas = float(np.mean([d["good_pass"] for d in dep]))
        out += [f"Mean over the {len(dep)} deployed ({dep[0]['precision']}) artifacts: escape rate {100 * esc:.2f} % "
                f"(spread {100 * min(d['escape_rate'] for d in dep):.2f} to {100 * max(d['escape_rate'] for d in dep):.2f}"
                f" %) against the cards' 95 % bound {100 * bound:.2f} % on average: "
                f"{'within' if esc <= bound else 'NOT within'}; good devices PASSed {100 * pas:.1f} % (spread "
                f"{100 * min(d['good_pass'] for d in dep):.1f} to {100 * max(d['good_pass'] for d in dep):.1f} %): "
                f"{'at least' if pas >= 0.5 else 'LESS than'} half. Criterion (both): "
                f"{'met' if esc <= bound and pas >= 0.5 else 'NOT met'}.", ""]
    return out


def demo_model(run: str) -> str:
    """The FP32 model of a `nexedge demo` run folder (``model/model.onnx``; ``model.ten.onnx`` before the
    demo chose its crops by measurement)."""
    for name in ("model.onnx", "model.ten.onnx"):
        path = os.path.join(run, "model", name)
        if os.path.exists(path):
            return path
    return os.path.join(run, "model", "model.onnx")


def demo_artifacts(where: str, seeds: str) -> List[str]:
    """FP32 then INT8 models of `nexedge demo --seed S` for each seed (about 6 minutes a run)."""
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        seed_list = []
    if not seed_list:
        raise SystemExit(f"seeds {seeds!r}: expected comma-separated integers such as 0,1")
    fp32, int8 = [], []
    for seed in seed_list:
        run = os.path.join(where, f"tail-demo-seed{seed}")
        model = demo_model(run)
        if not os.path.exists(model):
            from nexedge.cli import main as nexedge

            if nexedge(["demo", "--seed", str(seed), "--out", run]) != 0:
                raise SystemExit(f"nexedge demo --seed {seed} --out {run} failed")
        q = os.path.splitext(model)[0] + ".int8-ort.onnx"
        if not os.path.exists(q):
            raise SystemExit(f"{run}: no INT8 model {q}; the demo run there stopped before its int8 stage "
                             "(delete the folder to run it again)")
        fp32.append(model)
        int8.append(q)
    return fp32 + int8


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE)
    p.add_argument("artifacts", nargs="*",
                   help="ONNX models, INT8 models or checkpoints with their cards (default: the demo's FP32 and INT8 "
                        "models for each of the recipe's seeds, trained first unless their run folders exist)")
    p.add_argument("--demo-dir", default="runs", help="where those demo runs go, as tail-demo-seedS (default runs)")
    common.add_data(p, "held-out `nexedge synth` folder, rendered when missing (default %(default)s)",
                    default=os.path.join("runs", "line-tail-set"))
    return common.parse(p, RECIPE, argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not os.path.isdir(args.data):
        from nexedge.cli import main as cli

        if cli(["synth", args.data, "--n", str(args.n), "--seed", str(args.seed), "--good-fraction", "0.5",
                "--no-progress"]) != 0:
            raise SystemExit(f"nexedge synth {args.data} failed")
    if not args.artifacts:
        args.artifacts = demo_artifacts(args.demo_dir, args.seeds)
    rows = load_manifest(args.data)
    problem = split_problem(rows, args.split)
    if problem:  # before scoring anything
        raise SystemExit(f"bench_line_tail.py: error: {problem} in {args.data} (render a larger set or set a "
                         "smaller split)")
    command = "python benchmarks/bench_line_tail.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_start = benv.load_average()
    results = []
    for art in args.artifacts:
        t0 = time.perf_counter()
        sc = score_all(art, args.data, rows)
        res = summarize(rows, sc)
        res.update(modes=per_mode_auc(rows, sc), split=simulate_split(rows, sc, *args.split))
        res.update(artifact=os.path.relpath(art), seconds=round(time.perf_counter() - t0, 1),
                   deployed=at_card_threshold(art, rows, sc))
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
        modes = sorted({k for r in results for k in r["modes"]})
        if modes:
            lines += ["AUC of good vs each defect mode:", ""]
            lines += [report.table(["artifact"] + [f"{k} (n={results[0]['modes'].get(k, {}).get('n', 0)})"
                                                   for k in modes],
                                   [[r["artifact"]] + [f"{100 * r['modes'][k]['auc']:.1f}" if k in r["modes"]
                                                       else "-" for k in modes] for r in results], markdown=md), ""]
        sp = results[0]["split"]
        lines += [f"The demo's line criterion on random splits of these scores ({sp['draws']} draws): threshold = "
                  f"lowest of {sp['n_val']} validation defects (TPR 100 %), then {sp['n_test']} test defects and "
                  f"{sp['n_good']} good. For any model whose scores do not tie, P(0 escapes) = {sp['n_val']}/"
                  f"({sp['n_val']}+{sp['n_test']}) = {sp['bound']:.2f}: the lowest of the "
                  f"{sp['n_val'] + sp['n_test']} defects is a validation one (the draws below estimate it within "
                  f"about +-{2 * (sp['bound'] * (1 - sp['bound']) / sp['draws']) ** 0.5:.2f}).", ""]
        lines += [report.table(["artifact", "P(0 escapes)", "good PASSed, median", "p25", "P(half PASS)",
                                "P(both)"],
                               [[r["artifact"], f"{r['split']['p_zero_escapes']:.2f}",
                                 f"{100 * r['split']['pass_median']:.0f}%", f"{100 * r['split']['pass_p25']:.0f}%",
                                 f"{r['split']['p_half_pass']:.2f}", f"{r['split']['p_both']:.2f}"]
                                for r in results], markdown=md), ""]
        lines += deployed_lines(results, md)
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
