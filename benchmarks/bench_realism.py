"""Realism of ``nexedge synth``: legacy vs calibrated ("real") look against real line images, in one run.

Three parts, each measured for both looks side by side:

* realism figures (nexedge.data.realism): per-region intensity statistics and noise
  spectra against the references, KID on ImageNet EfficientNet-Lite0 features, and the
  leave-one-out real-vs-synthetic classifier;
* render speed: images/s of ``nexedge synth`` (2 worker processes) per look, interleaved;
* transfer: a model trained only on synthetic images of each look scores the references
  (per image, means by label, AUC of good vs defect references). By default the model
  is ImageNet EfficientNet-Lite0 features with a logistic-regression head
  (nexedge.data.realism.transfer_probe, minutes); ``--set finetune=1`` also fine-tunes Lite0
  with the demo's recipe on ``finetune_images`` images for each of ``finetune_seeds``
  (minutes per run on a CPU) and scores the references with TenCrop: AUC per seed, mean,
  and the AUC of the seeds' ensemble; finished runs in ``runs/bench/realism/`` are reused.

    python benchmarks/bench_realism.py --ref ../shared/reference/nexperia \\
        --markdown benchmarks/results/realism.md
"""

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import _common as common  # noqa: E402
from nexedge.data.realism import REGIONS, load_references, measure, transfer_probe  # noqa: E402
from nexedge.data.spec import GOOD, LOOKS  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    n=(90, "synthetic images per look for the figures"),
    repeats=(10, "domain-classifier draws"),
    speed_images=(200, "images per speed round"),
    speed_rounds=(2, "interleaved speed rounds"),
    probe_images=(240, "synthetic training images of the Lite0-features probe per look"),
    finetune=(False, "also fine-tune Lite0 on each look (long on a CPU)"),
    finetune_images=(1200, "fine-tuning images"),
    finetune_seeds=("0", "data and training seeds of the fine-tuned models, comma-separated; nine references "
                         "move the AUC by 0.06 a pair, so compare looks over several seeds"),
)

LOOK_ORDER = ("legacy", "real")


def render_speed(looks: List[str], n: int, rounds: int) -> Dict[str, Any]:
    """CPU ms per image and wall images/s of generate() (1 worker, in process) per look, rounds interleaved.

    CPU time is what the load of a shared machine does not inflate: 2 free cores render
    about 2 * 1000 / (CPU ms per image) images/s.
    """
    import cv2

    from nexedge.data.generate import generate

    cv2.setNumThreads(1)
    cpu: Dict[str, List[float]] = {lk: [] for lk in looks}
    wall: Dict[str, List[float]] = {lk: [] for lk in looks}
    loads: List[float] = []
    for r in range(rounds):
        for lk in looks:
            d = tempfile.mkdtemp(prefix="nexedge-realism-speed-")
            try:
                c0, w0 = time.process_time(), time.perf_counter()
                s = generate(os.path.join(d, "data"), n=n, seed=r, workers=1, progress=False, look=lk)
                cpu[lk].append(1e3 * (time.process_time() - c0) / s["n"])
                wall[lk].append(s["n"] / (time.perf_counter() - w0))
                loads.append(os.getloadavg()[0])
            finally:
                shutil.rmtree(d, ignore_errors=True)
    out: Dict[str, Any] = {lk: {"cpu_ms_per_image": float(np.median(cpu[lk])), "wall_images_per_s": float(np.median(wall[lk])),
                                "free_2core_images_per_s": 2e3 / float(np.median(cpu[lk]))} for lk in looks}
    out["_load"] = {"mean": float(np.mean(loads))}
    return out


# The demo's CPU recipe (nexedge/demo/profiles.py, profile "default"): ImageNet Lite0, first 3 stages
# frozen, 184 -> 160 px, batch 16, AdamW + cosine, the final epoch deployed (--select last); plus the
# photometric shift augmentation, which helped transfer (docs/data.md). CenterCrop validation while
# training, TenCrop scoring. The training seed is the data seed (``{seed}``).
TRAIN_ARGS = ["--arch", "efficientnet_lite0", "--pretrained", "imagenet", "--freeze", "3", "--channels-last",
              "--resize", "184", "--crop", "160", "--crop-mode", "center", "--epochs", "5", "--batch-size", "16",
              "--lr", "1e-3", "--schedule", "cosine", "--optimizer", "adamw", "--optimizer-kw", "warmup_epochs=1",
              "--balanced", "sqrt", "--photometric", "shift", "--select", "last", "--seed", "{seed}", "--keep", "1",
              "--no-test-curves", "--no-progress"]
SYNTH_ARGS = ["--good-fraction", "0.5", "--seed", "{seed}", "--no-progress"]  # the batch-2 defect mix, half good


def _with_seed(args: List[str], seed: int) -> List[str]:
    return [a.replace("{seed}", str(seed)) for a in args]


def train_on_synth(look: str, images: int, work: str, seed: int = 0) -> str:
    """Synthesize ``images`` (half good, every batch-2 defect class) of ``look`` and fine-tune Lite0; returns the run.

    A finished run of the same look and seed already in ``work`` (its summary.json written) is reused.
    """
    from nexedge.cli import main

    data, run = os.path.join(work, f"data-{look}-s{seed}"), os.path.join(work, f"train-{look}-s{seed}")
    if os.path.exists(os.path.join(run, "summary.json")):
        return run
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    if main(["synth", data, "--n", str(images), "--look", look] + _with_seed(SYNTH_ARGS, seed)) != 0:
        raise RuntimeError(f"nexedge synth failed for look {look}")
    if main(["train", "--data", data, "--out", run] + _with_seed(TRAIN_ARGS, seed)) != 0:
        raise RuntimeError(f"nexedge train failed for look {look}")
    shutil.rmtree(data, ignore_errors=True)
    return run


def over_seeds(per_seed: List[Dict[str, Any]]) -> Dict[str, Any]:
    """AUC per seed, their mean, and the AUC of the seeds' mean log-odds (an ensemble) on the references."""
    from nexedge import metrics
    from nexedge.metrics import logit_exact as logit

    files = [r["file"] for r in per_seed[0]["rows"]]
    y = np.array([0 if r["label"] == GOOD else 1 for r in per_seed[0]["rows"]])
    s = np.array([[{r["file"]: r["score"] for r in t["rows"]}[f] for f in files] for t in per_seed])
    s = np.clip(s, 1e-9, 1 - 1e-9)
    aucs = [float(t["auc"]) for t in per_seed]
    return {"aucs": aucs, "auc_mean": float(np.mean(aucs)), "auc_ensemble": metrics.roc_auc(y, logit(s).mean(0)),
            "met": sum(a >= 1.0 for a in aucs), "good_mean": float(s[:, y == 0].mean()),
            "defect_mean": float(s[:, y == 1].mean())}


def score_references(run: str, ref_dir: str) -> Dict[str, Any]:
    """Defect score (TenCrop, 1 - p(good)) of every reference image, with the run's best checkpoint."""
    from nexedge import metrics
    from nexedge.train.evaluate import resolve_checkpoints, score_checkpoint

    refs = load_references(ref_dir)
    _, ckpts = resolve_checkpoints(run)
    tmp = tempfile.mkdtemp(prefix="nexedge-realism-refs-")
    try:
        for f, lab, img in refs:  # an ImageFolder test split of the references, as they are
            import cv2

            os.makedirs(os.path.join(tmp, "test", lab), exist_ok=True)
            cv2.imwrite(os.path.join(tmp, "test", lab, f), img)
        s = score_checkpoint(ckpts[0], tmp, "test", ["ten"], progress=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [{"file": os.path.basename(p), "label": os.path.basename(os.path.dirname(p)), "score": float(v)}
            for p, v in zip(s["paths"], s["ten"])]
    good = [r["score"] for r in rows if r["label"] == GOOD]
    bad = [r["score"] for r in rows if r["label"] != GOOD]
    y = [0 if r["label"] == GOOD else 1 for r in rows]
    summary: Dict[str, Any] = {}
    if os.path.exists(os.path.join(run, "summary.json")):
        with open(os.path.join(run, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    return {"checkpoint": os.path.basename(ckpts[0]), "rows": rows, "good_mean": float(np.mean(good)), "defect_mean": float(np.mean(bad)),
            "good_max": float(np.max(good)), "defect_min": float(np.min(bad)),
            "auc": metrics.roc_auc(np.array(y), np.array([r["score"] for r in rows])),
            "synthetic_val_auc": (summary.get("best") or {}).get("val_auc"), "train_wall_s": summary.get("wall_s")}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE)
    p.add_argument("--ref", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                                                  "reference", "nexperia"),
                   help="folder of real reference images (default ../shared/reference/nexperia)")
    return common.parse(p, RECIPE, argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    looks = [lk for lk in LOOK_ORDER if lk in LOOKS]
    ref = os.path.normpath(args.ref)
    t0 = time.time()
    load0 = os.getloadavg()
    refs = load_references(ref)
    res = measure(refs, looks, n=args.n, repeats=args.repeats)
    speed = render_speed(looks, args.speed_images, args.speed_rounds)
    transfer: Dict[str, Any] = {"probe": {lk: transfer_probe(refs, lk, args.probe_images) for lk in looks}}
    if args.finetune:
        try:
            seeds = [int(v) for v in args.finetune_seeds.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"finetune_seeds {args.finetune_seeds!r}: expected comma-separated integers") from None
        if not seeds:
            raise SystemExit("finetune_seeds: expected at least one seed")
        work = common.work_dir("realism", fresh=False)  # finished runs found there are reused
        transfer["finetune"] = {}
        transfer["seeds"] = {}
        for lk in looks:
            runs = []
            for seed in seeds:  # looks interleaved per seed would not help: each run is minutes of steady load
                run = train_on_synth(lk, args.finetune_images, work, seed)
                # run folder names only: a temporary folder's path means nothing off this machine
                runs.append(score_references(run, ref) | {"run": os.path.basename(run), "seed": seed,
                                                          "images": args.finetune_images})
            transfer["finetune"][lk] = runs[0]
            transfer["seeds"][lk] = over_seeds(runs) | {"runs": runs}
    load1 = os.getloadavg()
    lines = section(res, speed, transfer, argv, ref, load0, load1, time.time() - t0)
    md = "\n".join(lines)
    print(md)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(md + "\n")
        with open(common.json_path(args.markdown), "w", encoding="utf-8") as f:
            json.dump({"realism": res, "speed": speed, "transfer": transfer}, f, indent=1, default=str)
    return 0


def section(res: Dict[str, Any], speed: Dict[str, Any], transfer: Dict[str, Any], argv: List[str], ref: str,
            load0: Any, load1: Any, secs: float) -> List[str]:
    from nexedge.bench.env import capture

    e = capture()
    looks = list(res["looks"])
    L = res["looks"]
    rel = os.path.relpath(ref, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    cmd = " ".join(["python", "benchmarks/bench_realism.py"] + [shlex.quote(a) for a in argv])
    out = [
        "## Realism: legacy vs calibrated synthetic look against real line images",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {secs / 60:.1f} min",
        f"- machine: {e.get('cpu')}, {e.get('cores_usable')}/{e.get('cores_online')} cores; load average "
        f"{' '.join(f'{v:.2f}' for v in load0)} at the start, {' '.join(f'{v:.2f}' for v in load1)} at the end "
        f"(shared box; this process at nice {os.nice(0)})",
        f"- command: `{cmd}`",
        f"- references: `{rel}`, {len(res['references'])} images ("
        + ", ".join(f"{lab}" for lab in sorted({r['label'] for r in res['references']})) + "); both sides viewed at "
        f"{res['size'][0]}x{res['size'][1]}, {'min-max stretched' if res['stretch'] else 'unstretched'}; "
        f"{res['n_synthetic']} synthetic images per look with the references' classes (batch {res['batch']})",
        "",
        "| figure | " + " | ".join(f"look {lk}" for lk in looks) + " | references |",
        "|---|" + "---|" * (len(looks) + 1),
    ]

    def row(name: str, vals: List[str], real: str) -> None:
        out.append(f"| {name} | " + " | ".join(vals) + f" | {real} |")

    row("KID x 1000 on Lite0 features (lower is closer)",
        [f"{1e3 * L[lk]['kid']:.1f} ± {1e3 * L[lk]['kid_std']:.1f}" for lk in looks], "0")
    row("leave-one-out real-vs-synthetic accuracy (50 % = cannot tell)",
        [f"{100 * L[lk]['domain_accuracy']:.0f} % ± {100 * L[lk]['domain_accuracy_std']:.0f}" for lk in looks], "50 %")
    row("mean per-region intensity gap (gray levels)", [f"{L[lk]['region_gap_mean']:.1f}" for lk in looks], "0")
    row("noise spectrum gap (mean abs log10 power, dex)", [f"{L[lk]['spectrum_gap']:.3f}" for lk in looks], "0")
    row("noise row/column anisotropy", [f"{L[lk]['anisotropy']:.2f}" for lk in looks], f"{res['real']['anisotropy']:.2f}")
    for r, *_ in REGIONS:
        for k in ("mean", "std", "p95"):
            row(f"{r} region {k}", [f"{L[lk]['regions'][r][k]:.1f}" for lk in looks],
                f"{res['real']['regions'][r][k]:.1f}")
    out += ["", "Render speed, `generate()` in one process (PNG writing included), rounds interleaved "
            "(load average {:.2f} during them):".format(speed["_load"]["mean"]), ""]
    out += ["| look | CPU ms per image | images/s on 2 free cores (2000 / CPU ms) | wall images/s under this load |",
            "|---|---|---|---|"]
    for lk in looks:
        sp = speed[lk]
        out.append(f"| {lk} | {sp['cpu_ms_per_image']:.1f} | {sp['free_2core_images_per_s']:.0f} | "
                   f"{sp['wall_images_per_s']:.0f} |")
    if "legacy" in speed and "real" in speed:
        out += ["", "real / legacy CPU cost per image: "
                f"{speed['real']['cpu_ms_per_image'] / speed['legacy']['cpu_ms_per_image']:.2f}"]
    for kind, res_t in transfer.items():
        if kind == "seeds":
            continue
        if kind == "probe":
            how = (f"ImageNet Lite0 features + logistic regression trained on {next(iter(res_t.values()))['n_train']} "
                   "synthetic images per look (half good), same view as the references")
        else:
            n_img = next(iter(res_t.values())).get("images", "?")
            how = (f"Lite0 (ImageNet weights) fine-tuned on `nexedge synth DATA --n {n_img} --look LOOK "
                   + " ".join(SYNTH_ARGS) + "` with `nexedge train --data DATA " + " ".join(TRAIN_ARGS)
                   + "`; the final epoch's checkpoint scores each reference with TenCrop through "
                   "`score_checkpoint`, the path of `nexedge eval`; first seed shown, all seeds below")
        out += ["", f"Transfer ({kind}): a model trained only on synthetic images scores the references; {how}:", ""]
        out += ["| look | synthetic val AUC | good refs mean | defect refs mean | max good | min defect | "
                "AUC good vs defect refs |", "|---|---|---|---|---|---|---|"]
        for lk, t in res_t.items():
            sv = t.get("synthetic_val_auc")
            out.append(f"| {lk} | {'-' if sv is None else f'{sv:.3f}'} | {t['good_mean']:.3f} | {t['defect_mean']:.3f} | "
                       f"{t['good_max']:.3f} | {t['defect_min']:.3f} | {t['auc']:.2f} |")
        if kind != "probe":
            out += ["", "Training: " + "; ".join(
                f"{lk} {t['train_wall_s'] / 60:.1f} min wall" if t.get("train_wall_s") else f"{lk} ?"
                for lk, t in res_t.items()) + " (shared box; a run reused from `runs/bench/realism/` keeps its own time)"]
        out += ["", "| reference | label | " + " | ".join(res_t) + " |", "|---|---|" + "---|" * len(res_t)]
        first = next(iter(res_t.values()))
        for i, r in enumerate(first["rows"]):
            out.append(f"| {r['file'][:44]} | {r['label']} | "
                       + " | ".join(f"{t['rows'][i]['score']:.3f}" for t in res_t.values()) + " |")
    if transfer.get("seeds"):
        sd = transfer["seeds"]
        seeds = [r["seed"] for r in next(iter(sd.values()))["runs"]]
        out += ["", "Transfer over seeds (data seed = training seed; 1.00 = every good reference below every "
                "defective one; ensemble: the seeds' mean log-odds):", "",
                "| look | " + " | ".join(f"seed {s}" for s in seeds) + " | mean AUC | seeds at 1.00 | ensemble AUC | "
                "good refs mean score | defect refs mean score |",
                "|---|" + "---|" * (len(seeds) + 5)]
        for lk, t in sd.items():
            out.append(f"| {lk} | " + " | ".join(f"{a:.2f}" for a in t["aucs"]) + f" | {t['auc_mean']:.2f} | "
                       f"{t['met']} of {len(seeds)} | {t['auc_ensemble']:.2f} | {t['good_mean']:.3f} | "
                       f"{t['defect_mean']:.3f} |")
    return out


if __name__ == "__main__":
    sys.exit(main())
