#!/usr/bin/env python3
"""The magnetic tiles (real inspection images) through the CLI, against issue 27's targets.

Runs, in a work folder, what a user runs (each a `nexedge` command, timed):

    nexedge split SRC data --seed 0                      (reused when the folder exists)
    nexedge train --data data --out run TRAIN_RECIPE
    nexedge export run --crops auto --aggregate mean,max -o run/model.onnx --data data
    nexedge eval run/model.onnx --data data --split test
    with cv=K: nexedge train ... --cv K --out cv; nexedge export cv -o cv/ensemble.onnx;
                 nexedge eval cv/ensemble.onnx --data data --split test

and prints the targets beside what was measured: 6-class test accuracy >= 97 %, good-vs-defect
AUC >= 99.5 %, 0 escapes with overkill <= 5 % for the deployed artifact, the whole pipeline
<= 20 min wall, and with cv the operating point's 95 % TPR lower bound >= 99 %. The work
folder is runs/bench/tiles/; ``--set summarise_only=1`` summarises a finished one without
running anything.

    python benchmarks/bench_tiles.py --src ../shared/datasets/magnetic-tile \\
        --markdown benchmarks/results/tiles.md [--set cv=5]
"""

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from benchmarks import _common as common  # noqa: E402
from nexedge.bench import env as benv  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    cv=(0, "also nexedge train --cv K and the fold ensemble (K trainings; 0: not)"),
    summarise_only=(False, "run nothing: only summarise the finished work folder runs/bench/tiles/"),
)

#: The recipe docs/your-data.md gives for real line images (nothing in it is specific to the tiles).
TRAIN_RECIPE = ("--arch efficientnet_lite0 --pretrained imagenet --freeze 3 --channels-last --resize 128 "
                "--crop 128 --epochs 12 --batch-size 16 --optimizer adamw --lr 1e-3 --optimizer-kw warmup_epochs=1 "
                "--schedule cosine --balanced sqrt --select last")


def run(cmd: List[str], log: str) -> float:
    """Run ``nexedge ...`` (this interpreter's), output to ``log``; wall seconds. Fails loudly."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ nexedge " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        rc = subprocess.call([sys.executable, "-m", "nexedge.cli"] + cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"nexedge {' '.join(cmd)} exited {rc}; see {log}")
    return time.perf_counter() - t0


def deployed(eval_json: str) -> Dict[str, Any]:
    """The numbers of the first model of an eval.json: accuracy, AUC, escapes, overkill, promise."""
    with open(eval_json, encoding="utf-8") as f:
        res = json.load(f)
    best = next(iter(res["runs"].values()))["best"]
    cm = np.asarray(best["confusion"])
    op = best.get("operating_point") or {}
    crop = best["crop"]
    return {"model": best["checkpoint"], "crop": crop, "accuracy": float(np.trace(cm) / cm.sum()), "n": int(cm.sum()),
            "auc": best["metrics"][crop]["auc"], "fpr_at_tpr100": best["metrics"][crop]["fpr_at_tpr"]["100"],
            "escapes": op.get("escapes"), "n_defects": op.get("n_defects"), "overkill": op.get("overkill"),
            "n_good": op.get("n_good"), "threshold": op.get("threshold"), "lower95": op.get("val_tpr_lower95"),
            "source": op.get("source_split"), "promise": op.get("promise"),
            "escaped": [(r["path"], r["class"], r["score"]) for r in op.get("escaped_images") or []]}


def summarise(work: str, times: Dict[str, float]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"times": times}
    for key, path in (("checkpoint", "eval_ckpt"), ("deployed", "eval_onnx"), ("ensemble", "eval_ensemble")):
        p = os.path.join(work, path, "eval.json")
        if os.path.exists(p):
            out[key] = deployed(p)
    card = os.path.join(work, "run", "model.card.json")
    if os.path.exists(card):
        with open(card, encoding="utf-8") as f:
            out["crop_selection"] = json.load(f).get("crop_selection")
    cv = os.path.join(work, "cv", "cv.json")
    if os.path.exists(cv):
        with open(cv, encoding="utf-8") as f:
            out["cv"] = json.load(f)
    return out


def render(s: Dict[str, Any], command: str, md: bool) -> str:
    from nexedge.bench import report

    t = s["times"]
    pipeline = sum(t.get(k, 0.0) for k in ("train", "export", "eval"))
    lines = ["## Magnetic tiles (real images) through the CLI: issue 27's targets", "",
             f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {benv.one_line(benv.capture(benv.usable_cores()))}",
             f"- command: `{command}`",
             f"- recipe: `nexedge train --data data --out run {TRAIN_RECIPE}`", ""]
    rows = []
    d = s.get("deployed")
    if d:
        rows += [["6-class test accuracy (deployed ONNX, argmax)", ">= 97 %", f"{100 * d['accuracy']:.1f} % ({d['n']} images)"],
                 ["good-vs-defect test AUC (deployed)", ">= 99.5 %", f"{100 * d['auc']:.2f} %"],
                 ["escapes on test at the card's TPR-100 % threshold", "0", f"{d['escapes']} of {d['n_defects']}"],
                 ["overkill on test", "<= 5 %", f"{d['overkill']} of {d['n_good']} ({100 * d['overkill'] / d['n_good']:.1f} %)"],
                 ["train + export + eval wall", "<= 20 min", f"{pipeline / 60:.1f} min (train {t.get('train', 0) / 60:.1f})"]]
    e = s.get("ensemble")
    if e:
        rows += [["--cv: TPR 95 % lower bound of the operating point", ">= 99 %", f"{100 * e['lower95']:.2f} % ({e['source']})"],
                 ["--cv: ensemble escapes / overkill on test", "within the card's promise",
                  f"{e['escapes']} of {e['n_defects']} / {e['overkill']} of {e['n_good']}; "
                  + ("-" if not e["promise"] else ("within" if e["promise"]["within"] else "NOT within")
                     + f" (P = {e['promise']['p_value']:.2g})")],
                 ["--cv wall (K trainings + OOF scoring)", "(optional; its cost)", f"{t.get('cv', 0) / 60:.1f} min"]]
    lines += [report.table(["target", "wanted", "measured"], rows, markdown=md), ""]
    c = s.get("checkpoint")
    if c and d:
        lines += [report.table(["model", "crops", "accuracy", "AUC", "FPR at TPR 100 % (test)", "escapes", "overkill"],
                               [[m["model"], m["crop"], f"{100 * m['accuracy']:.1f} %", f"{100 * m['auc']:.2f} %",
                                 f"{100 * m['fpr_at_tpr100']:.1f} %", f"{m['escapes']}/{m['n_defects']}",
                                 f"{m['overkill']}/{m['n_good']}"] for m in (c, d) + ((e,) if e else ())],
                               markdown=md), ""]
    sel = s.get("crop_selection")
    if sel:
        lines += [f"`export --crops auto` on {sel['split']} ({sel['n_good']} good, {sel['n_defects']} defect):", ""]
        lines += [report.table(["crops", "aggregate", "AUC", "FPR at TPR 100 %", "FPR at TPR 99.1 %"],
                               [[r["crops"], r["aggregate"], f"{100 * r['auc']:.2f} %", f"{100 * r['fpr']:.2f} %",
                                 f"{100 * r['fpr_at_tpr']['99.1']:.2f} %"] for r in sel["candidates"]]
                               + [[r["crops"], r["aggregate"], "skipped", r["reason"], ""] for r in sel["skipped"]],
                               markdown=md),
                  "", f"chosen: {sel['chosen']['crops']} {sel['chosen']['aggregate']}", ""]
    cv = s.get("cv")
    if cv:
        lines += [f"Cross-validation, {cv['k']} folds over train+val ({cv['n_images']} images, {cv['n_defects']} "
                  "defects), fold-to-fold spread per candidate:", ""]
        rows = []
        for cand in cv["candidates"]:
            sp = cand["spread"]
            op = next(o for o in cand["operating_points"] if o["target_tpr"] == 1.0)
            rows.append([cand["crops"], cand["aggregate"],
                         f"{100 * sp['auc']['mean']:.2f} +- {100 * sp['auc']['std']:.2f}",
                         f"{100 * sp['fpr_at_tpr100']['mean']:.1f} +- {100 * sp['fpr_at_tpr100']['std']:.1f}",
                         f"{sp['threshold']['min']:.3g} - {sp['threshold']['max']:.3g}",
                         f"{100 * cand['pooled_auc']:.2f}", f"{100 * op['fpr']:.1f}", f"{100 * op['tpr_lower95']:.2f}"])
        lines += [report.table(["crops", "aggregate", "fold AUC %", "fold FPR@100 %", "fold thresholds",
                                "pooled OOF AUC %", "pooled FPR@100 %", "TPR 95 % low %"], rows, markdown=md), ""]
    for key, title in (("deployed", "deployed model"), ("ensemble", "fold ensemble")):
        m = s.get(key)
        if m and m["escaped"]:
            lines.append(f"Escapes of the {title} on test: " + "; ".join(f"{p} ({c}, score {sc:.3g})"
                                                                        for p, c, sc in m["escaped"]))
    lines.append("")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE)
    p.add_argument("--src", default=os.path.join("..", "shared", "datasets", "magnetic-tile"),
                   help="the magnetic-tile images, one folder per class (default %(default)s)")
    common.add_data(p, "an existing split of the tiles (default runs/bench/tiles/data, made by `nexedge split`)")
    return common.parse(p, RECIPE, argv, removed={"--from": "--set summarise_only=1 summarises runs/bench/tiles/"})


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/bench_tiles.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    work = common.work_dir("tiles", fresh=False)  # the split is reused; the runs are overwritten
    times: Dict[str, float] = {}
    tfile = os.path.join(work, "times.json")
    if args.summarise_only:
        if os.path.exists(tfile):
            with open(tfile, encoding="utf-8") as f:
                times = json.load(f)
    else:
        os.makedirs(work, exist_ok=True)
        data = args.data or os.path.join(work, "data")
        if not os.path.isdir(data):
            times["split"] = run(["split", args.src, data, "--seed", "0"], os.path.join(work, "split.log"))
        times["train"] = run(["train", "--data", data, "--out", os.path.join(work, "run"), "--overwrite"]
                             + TRAIN_RECIPE.split(), os.path.join(work, "train.log"))
        times["export"] = run(["export", os.path.join(work, "run"), "--crops", "auto", "--aggregate", "mean,max",
                               "-o", os.path.join(work, "run", "model.onnx"), "--data", data],
                              os.path.join(work, "export.log"))
        times["eval"] = run(["eval", os.path.join(work, "run", "model.onnx"), "--data", data, "--split", "test",
                             "--out", os.path.join(work, "eval_onnx"), "--no-progress"], os.path.join(work, "eval.log"))
        run(["eval", os.path.join(work, "run", "best.pt"), "--data", data, "--split", "test", "--out",
             os.path.join(work, "eval_ckpt"), "--no-progress"], os.path.join(work, "eval_ckpt.log"))
        if args.cv:
            times["cv"] = run(["train", "--data", data, "--out", os.path.join(work, "cv"), "--overwrite", "--cv",
                               str(args.cv)] + TRAIN_RECIPE.split(), os.path.join(work, "cv.log"))
            times["cv_export"] = run(["export", os.path.join(work, "cv"), "-o",
                                      os.path.join(work, "cv", "ensemble.onnx"), "--aggregate", "mean,max"],
                                     os.path.join(work, "cv_export.log"))
            run(["eval", os.path.join(work, "cv", "ensemble.onnx"), "--data", data, "--split", "test", "--out",
                 os.path.join(work, "eval_ensemble"), "--no-progress"], os.path.join(work, "eval_ensemble.log"))
        with open(tfile, "w", encoding="utf-8") as f:
            json.dump(times, f, indent=2)
    s = summarise(work, times)
    print(render(s, command, False))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(render(s, command, True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
