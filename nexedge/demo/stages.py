"""The stages of ``nexedge demo``; each calls the real command or library of its stage.

Commands run in this process through ``nexedge.cli.main`` (their own progress
output shows); the daemon runs as a separate ``nexedge-daemon`` process, as on
a line computer. A stage whose piece is not in this build raises, naming it.
"""

import glob
import json
import os
import time
from typing import Any, Dict, List, Sequence

from nexedge.demo import line
from nexedge.demo.context import Demo


def _require(command: str) -> None:
    """Fail loudly when a subcommand is not registered or its module does not load."""
    import importlib

    from nexedge.cli import COMMANDS

    entry = next((c for c in COMMANDS if c[0] == command), None)
    if entry is None:
        raise RuntimeError(f"this build has no `nexedge {command}` command; the demo needs it")
    try:
        mod = importlib.import_module(entry[1])
    except ImportError as e:
        raise RuntimeError(f"`nexedge {command}` is not available: {entry[1]} does not import ({e})") from e
    fn = "run_" + command.replace("-", "_")
    if not hasattr(mod, fn):
        raise RuntimeError(f"`nexedge {command}` is not available: {entry[1]} has no {fn}()")


def nexedge(demo: Demo, argv: Sequence[str]) -> None:
    """Run ``nexedge ARGV`` in this process; a non-zero exit fails the stage."""
    from nexedge.cli import main

    _require(argv[0])
    demo.say("$ nexedge " + " ".join(argv))
    rc = main(list(argv))
    if rc != 0:
        raise RuntimeError(f"`nexedge {' '.join(argv)}` exited with status {rc}")


# -- 1. data -----------------------------------------------------------------

def count_images(root: str) -> Dict[str, Dict[str, int]]:
    """{split: {class: n}} of an ImageFolder tree."""
    out: Dict[str, Dict[str, int]] = {}
    for split in ("train", "val", "test"):
        d = os.path.join(root, split)
        if os.path.isdir(d):
            out[split] = {c: len(os.listdir(os.path.join(d, c))) for c in sorted(os.listdir(d))
                          if os.path.isdir(os.path.join(d, c))}
    return out


def stage_data(demo: Demo) -> None:
    s = demo.settings
    root = demo.path("data")
    argv = ["synth", root, "--seed", str(s["seed"]), "--workers", str(s["threads"])]
    if s.get("size"):  # else the generator's native 275 x 267
        argv += ["--size", str(s["size"])]
    if not s.get("class_counts"):
        argv += ["--n", str(s["images"])]
    if s.get("class_counts"):
        counts = dict(s["class_counts"])
        scale = s["images"] / float(sum(counts.values()))
        argv += ["--class-counts", ",".join(f"{c}={max(3, round(n * scale))}" for c, n in counts.items())]
        left_out = [c for c in ("chipping", "lead_glue", "pocket_damage") if c not in counts]
        demo.say("demo class mix (learnable on a CPU in minutes; left out: " + ", ".join(left_out)
                 + "): " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    elif s.get("good_fraction"):
        argv += ["--good-fraction", str(s["good_fraction"])]
        demo.say("demo class mix: the report's batch 2 (every class, chipping included), "
                 f"{100 * s['good_fraction']:.0f} % good, 1 % label noise")
    nexedge(demo, argv)
    counts = count_images(root)
    if not counts.get("test") or not counts.get("train"):
        raise RuntimeError(f"`nexedge synth` wrote no train/test split under {root}")
    demo.results["data"] = {"root": root, "counts": {k: sum(v.values()) for k, v in counts.items()},
                            "classes": sorted(counts["train"])}
    demo.say("images per split: " + ", ".join(f"{k} {sum(v.values())}" for k, v in counts.items()))
    demo.say("test split: " + ", ".join(f"{c} {n}" for c, n in counts["test"].items()))


# -- 2. train ----------------------------------------------------------------

def stage_train(demo: Demo) -> None:
    s = demo.settings
    run = demo.path("train")
    nexedge(demo, ["train", "--data", demo.results["data"]["root"], "--out", run, "--arch", s["arch"],
                   "--resize", str(s["resize"]), "--crop", str(s["crop"]), "--crop-mode", s.get("val_crop", "ten"),
                   "--epochs", str(s["epochs"]), "--batch-size", str(s["batch_size"]), "--lr", str(s["lr"]),
                   "--schedule", "cosine", "--seed", str(s["seed"]), "--keep", "3", "--no-test-curves",
                   "--select", s.get("select", "val_auc")]
             + ["--optimizer", s.get("optimizer", "sgd"), "--optimizer-kw", "warmup_epochs={}".format(s.get("warmup_epochs", 0))]
             + [a for kw in s.get("arch_kw", []) for a in ("--arch-kw", kw)]
             + ["--pretrained", s.get("pretrained", "none"), "--freeze", str(s.get("freeze", 0)),
                "--balanced", s.get("balanced", "none")]
             + (["--channels-last"] if s.get("channels_last") else []))
    from nexedge.train.evaluate import resolve_checkpoints

    _, ckpts = resolve_checkpoints(run)
    summary: Dict[str, Any] = {}
    if os.path.exists(os.path.join(run, "summary.json")):
        with open(os.path.join(run, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    demo.results["train"] = {"run": run, "best": ckpts[0], "best_val_auc": (summary.get("best") or {}).get("val_auc"),
                             "wall_s": summary.get("wall_s")}


# -- 3. eval -----------------------------------------------------------------

def stage_eval(demo: Demo) -> None:
    # CenterCrop only: the TenCrop numbers are measured on the exported artifact itself (ONNX Runtime
    # fp32 and INT8, same test images) by `calibrate`, and parity holds the two to 1e-4; scoring ten
    # crops here too took about 50 s of the 10-minute budget for the same numbers.
    out = demo.path("eval")
    nexedge(demo, ["eval", demo.results["train"]["run"], "--data", demo.results["data"]["root"],
                   "--split", "test", "--crops", "center", "--top", "1", "--out", out, "--no-progress"])
    path = os.path.join(out, "eval.json")
    if not os.path.exists(path):
        raise RuntimeError(f"`nexedge eval` wrote no {path}")
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    run = next(iter(table["runs"].values()))
    demo.results["eval"] = {"file": path, "n_good": run.get("n_good"), "n_defects": run.get("n_defects"), "crops": {
        crop: {"auc": r["auc"]["mean"], "fpr_at_tpr": {k: v["mean"] for k, v in r["fpr_at_tpr"].items()}}
        for crop, r in run["crops"].items()}}


# -- 4. export ---------------------------------------------------------------

#: The demo's exported model (its crops are chosen by measurement, so the name does not carry them).
MODEL_FILE = "model.onnx"


def stage_export(demo: Demo) -> None:
    # The crop mode is measured, not assumed: `--crops auto` scores center, five (and ten, for a model trained
    # with mirrors; the demo's is not: a mirrored device reads as a flipped one) on the validation split through
    # ONNX Runtime and keeps the lowest FPR at TPR 100 % (docs/training.md, "Which crops").
    best = demo.results["train"]["best"]
    onnx_path = demo.path("model", MODEL_FILE)
    os.makedirs(os.path.dirname(onnx_path), exist_ok=True)
    nexedge(demo, ["export", best, "--crops", "auto", "--aggregate", demo.settings.get("aggregates", "mean"),
                   "-o", onnx_path, "--max-batch", "16", "--parity-kw", "data=" + demo.results["data"]["root"],
                   "--threads", str(demo.settings["threads"])])
    from nexedge.card import load_card

    card = load_card(onnx_path)
    demo.results["export"] = {"onnx": onnx_path, "bytes": os.path.getsize(onnx_path),
                              "crops": card.runtime_crop_mode, "aggregate": card.aggregate,
                              "crop_selection": card.data.get("crop_selection")}


# -- 5. int8 -----------------------------------------------------------------

def stage_calibrate(demo: Demo) -> None:
    src = demo.results["export"]["onnx"]
    model_dir = demo.path("model")
    nexedge(demo, ["calibrate", src, "--data", demo.results["data"]["root"], "--name", "demo",
                   "--images", str(demo.settings["calib_images"]), "--targets", "ort",
                   "--calib-root", demo.path("calibrate"), "--out-dir", model_dir,
                   "--threads", str(demo.settings["threads"])])
    found = sorted(glob.glob(os.path.join(model_dir, "*.int8-ort.onnx")))
    if not found:
        raise RuntimeError(f"`nexedge calibrate` wrote no *.int8-ort.onnx under {model_dir}")
    from nexedge.card import load_card

    card = load_card(found[0])
    if card.precision != "int8":
        raise RuntimeError(f"{found[0]}: card says precision {card.precision!r}, expected int8")
    rep = (card.data.get("metrics") or {}).get("int8_vs_fp32") or {}
    # the decisions that differ between INT8 and fp32 at the point the demo line decides at (TPR 100 %)
    dep = next((d for d in rep.get("deployed", []) if abs(d["target_tpr"] - 1.0) < 1e-9), None)
    demo.results["int8"] = {
        "onnx": found[0], "bytes": os.path.getsize(found[0]), "fp32_bytes": demo.results["export"]["bytes"],
        "metrics": {k: rep.get(k) for k in ("split", "n_images", "auc_fp32", "auc_int8", "auc_delta_points",
                                            "max_abs_score_diff", "auc_delta_ci95_points")} if rep else None,
        "decision_flips": {"good": dep["flip_fraction_good"], "defect": dep["flip_fraction_defect"]} if dep else None,
    }
    if rep.get("auc_fp32") is not None:  # the deployed crops, fp32 artifact, on the same test images
        demo.results.setdefault("eval", {}).setdefault("crops", {})[card.graph["crops"] + " (ORT fp32)"] = {
            "auc": rep["auc_fp32"], "fpr_at_tpr": dict(rep.get("fpr_at_tpr_fp32") or {})}


# -- 6-8. the line: see line.py ----------------------------------------------

def stage_daemon(demo: Demo) -> None:
    line.start_daemon(demo)


def stage_stream(demo: Demo) -> None:
    line.stream_test_images(demo)


def wait_for_store(store: str, want: int, timeout: float = 30.0) -> int:
    """Wait until the daemon's background sample writer has stored ``want`` samples (it answers the
    camera first and writes afterwards); returns how many are there."""
    import sqlite3

    db, n = os.path.join(store, "samples.db"), 0
    deadline = time.monotonic() + timeout
    while True:
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
            try:
                n = int(con.execute("SELECT COUNT(*) FROM samples").fetchone()[0])
            finally:
                con.close()
        except sqlite3.Error:
            pass  # not created yet / busy: try again
        if n >= want or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


def stage_pull(demo: Demo) -> None:
    out = demo.path("pulled")
    store = demo.results["daemon"]["store"]
    wait_for_store(store, int((demo.results.get("stream") or {}).get("uncertain") or 0))
    nexedge(demo, ["pull", "--store", store, "--out", out, "--format", "labelstudio,folders",
                   "--classes", ",".join(demo.results["data"]["classes"])])
    manifest = os.path.join(out, "manifest.jsonl")
    if not os.path.exists(manifest):
        raise RuntimeError(f"`nexedge pull` wrote no {manifest}")
    with open(manifest, encoding="utf-8") as f:
        rows = [json.loads(text) for text in f if text.strip()]
    reasons: Dict[str, int] = {}
    for r in rows:
        key = "{} {}".format(r.get("decision", "?"), r.get("reason") or "").strip()
        reasons[key] = reasons.get(key, 0) + 1
    layout: List[str] = []
    for d, dirs, files in sorted(os.walk(out)):
        dirs.sort()
        if files:
            layout.append("  {:<60} {} file(s)".format(os.path.relpath(d, demo.out) + "/", len(files)))
    demo.results["pull"] = {"out": out, "samples": len(rows), "by_decision_reason": reasons, "layout": layout}
    demo.say(f"pulled {len(rows)} uncertain/audit samples out of the line store into {out}:")
    demo.say("  by decision and reason: " + ", ".join(f"{k} {n}" for k, n in sorted(reasons.items())))
    for entry in layout[:12]:
        demo.say(entry)
    demo.say("  (manifest.jsonl = canonical list; labelstudio/ = import into Label Studio; folders/ = by predicted "
             "class for CVAT; label them, then `nexedge import-labels` adds them to the data set)")
