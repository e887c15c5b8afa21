"""Shift-monitor benchmark: detection delay for a batch-2 -> batch-3 change and the
false-alarm rate on batch 2 alone, over several seeds, on synthetic images.

Per seed, two streams of the same length go through a fresh ShiftMonitor each:

* shift:  ``before`` batch-2 frames, then ``after`` batch-3 frames (recipe values)
* steady: ``before + after`` batch-2 frames

Frames are rendered by nexedge.data (class mix of the batch), prepared with the
card's input geometry and measured with nexedge.preprocess.image_stats, as the
daemon does. Scores come from ``--checkpoint`` (a trained model, run with torch
on the CPU) when given; without one, a fixed class-conditional score model
(good ~ Beta(1.2, 12), defect ~ Beta(8, 2)) stands in, identical for both
batches, so then only the image statistics can detect the change (PSI and score
statistics are not a real test without a model). The card's references
(val_scores, image_stats) are used when the checkpoint's card has them, else
computed from the recipe's ``ref`` separate batch-2 images.

    python benchmarks/bench_shift.py --train /tmp/shift --seeds 5 --markdown benchmarks/results/shift.md
"""

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import _common as common  # noqa: E402
from nexedge.preprocess import image_stats, prepare  # noqa: E402
from nexedge.serve.monitor import DEFAULT_LIMITS, STAT_NAMES, ShiftMonitor  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    train_arch=("tiny", "architecture for --train"),
    train_epochs=(6, "epochs for --train"),
    seeds=(5, "shift and steady streams, one pair per seed"),
    before=(300, "batch-2 frames before the switch"),
    after=(300, "batch-3 frames after the switch"),
    window=(200, "monitor window (frames)"),
    ref=(300, "batch-2 reference images when the card has no references"),
    resize=(72, "input size without a checkpoint"),
    workers=(2, "processes rendering the streams"),
)

EDGES = [i / 20 for i in range(21)]
TAGS = {"ref": 0, "steady": 1, "after": 2}


def _render_many(args: Tuple[int, str, int, int, Dict[str, Any]]) -> Tuple[np.ndarray, List[str], np.ndarray]:
    """(prepared images, classes, stats) for frames ``start..start+n`` of one stream."""
    from nexedge.data.spec import default_weights
    from nexedge.data.synth import render_image

    batch, tag, seed, n, inp = args[0], args[1], args[2], args[3], args[4]
    w = default_weights(batch)
    names = sorted(w)
    p = np.array([w[c] for c in names])
    rng = np.random.default_rng([seed, batch, TAGS[tag]])
    cls = [str(c) for c in rng.choice(names, size=n, p=p / p.sum())]
    imgs, stats = [], []
    for i, c in enumerate(cls):
        img, _ = render_image(c, (seed, batch, TAGS[tag], i), batch=batch)
        pre = prepare(img, inp)
        imgs.append(pre)
        stats.append(image_stats(pre))
    return np.stack(imgs), cls, np.asarray(stats)


class Scorer:
    """Defect scores from a checkpoint, or the fixed class-conditional stand-in."""

    def __init__(self, checkpoint: Optional[str], seed: int) -> None:
        self.card = None
        self.model = None
        self.rng = np.random.default_rng(seed)
        if checkpoint:
            import torch

            from nexedge.models.checkpoint import model_from_checkpoint

            torch.set_num_threads(1)
            self.model, self.card = model_from_checkpoint(checkpoint)
            self.model.eval()

    def __call__(self, imgs: np.ndarray, classes: List[str]) -> np.ndarray:
        if self.model is None:
            good = np.array([c == "good" for c in classes])
            return np.where(good, self.rng.beta(1.2, 12, len(classes)), self.rng.beta(8, 2, len(classes)))
        import torch

        from nexedge.metrics import defect_score
        from nexedge.preprocess import average_crops, host_batch, n_crops

        inp = self.card.input
        out = []
        with torch.no_grad():
            for i in range(0, len(imgs), 64):
                x = host_batch(imgs[i : i + 64], inp)
                logits = self.model(torch.from_numpy(x)).numpy()
                out.append(defect_score(average_crops(logits, n_crops(inp["crop_mode"])), self.card.good_index))
        return np.concatenate(out)


def reference(scorer: Scorer, imgs: np.ndarray, classes: List[str], stats: np.ndarray) -> Dict[str, Any]:
    """Card-style references: use the checkpoint card's when present, else from these images."""
    card = dict(scorer.card.data) if scorer.card is not None else {}
    src = []
    if not card.get("val_scores"):
        s = scorer(imgs, classes)
        good = np.array([c == "good" for c in classes])
        card["val_scores"] = {"edges": EDGES, "good": np.histogram(s[good], EDGES)[0].tolist(),
                              "defect": np.histogram(s[~good], EDGES)[0].tolist()}
        src.append(f"val_scores from {len(classes)} batch-2 reference images")
    if not card.get("image_stats"):
        card["image_stats"] = {n: {"mean": float(stats[:, j].mean()), "std": float(stats[:, j].std())}
                               for j, n in enumerate(STAT_NAMES)}
        src.append(f"image_stats from {len(classes)} batch-2 reference images")
    card["_ref_source"] = "; ".join(src) or "the checkpoint's card"
    return card


def threshold_of(card: Dict[str, Any]) -> float:
    for op in card.get("operating_points") or []:
        if abs(float(op["target_tpr"]) - 1.0) < 1e-9:
            return float(op["threshold"])
    return 0.5


def run_stream(card: Dict[str, Any], scores: np.ndarray, stats: np.ndarray, thr: float, window: int,
               switch: Optional[int]) -> Dict[str, Any]:
    mon = ShiftMonitor(card, window=window, min_frames=window // 2)
    lt = np.log(thr / (1 - thr))
    first: Dict[str, int] = {}
    before_switch = 0
    t0 = time.perf_counter()
    for i, (s, st) in enumerate(zip(scores, stats)):
        sc = float(np.clip(s, 1e-6, 1 - 1e-6))
        unc = abs(np.log(sc / (1 - sc)) - lt) < 1.0
        for a in mon.observe("cam0", sc, "REJECT" if sc >= thr else "PASS", bool(unc), tuple(st)):
            first.setdefault(a, i)
            if switch is not None and i < switch:
                before_switch += 1
    cost = (time.perf_counter() - t0) / len(scores)
    return {"first": first, "before_switch": before_switch, "us_per_frame": cost * 1e6,
            "final": mon.snapshot()["cam0"]["values"]}


def train_model(workdir: str, arch: str = "tiny", epochs: int = 6) -> str:
    """nexedge synth (800 batch-2 images) + nexedge train; returns the best checkpoint by val AUC."""
    import json
    import subprocess

    data = os.path.join(workdir, "data")
    cli = [sys.executable, "-m", "nexedge.cli"]
    if not os.path.exists(os.path.join(data, "manifest.jsonl")):
        subprocess.run(cli + ["synth", data, "--n", "800", "--seed", "1", "--batch", "2", "--no-progress"], check=True)
    run = os.path.join(workdir, f"run-{arch}-{epochs}")
    if not os.path.exists(os.path.join(run, "topk.json")):
        subprocess.run(cli + ["train", "--data", data, "--out", run, "--arch", arch, "--epochs", str(epochs), "--resize", "72",
                              "--crop", "64", "--workers", "0", "--no-progress", "--seed", "1"], check=True)
    with open(os.path.join(run, "topk.json")) as f:
        best = json.load(f)["checkpoints"][0]["file"]
    return os.path.join(run, best)


def _git_head() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "?"
    except OSError:
        return "?"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = common.parser(__doc__, RECIPE)
    ap.add_argument("--checkpoint", help="trained checkpoint (.pt with card) for real scores; default: stand-in scores")
    ap.add_argument("--train", metavar="DIR", help="render a batch-2 data set with nexedge synth and train a model "
                    "on it in DIR (tiny: about 3 min on 2 CPU cores); its best checkpoint gives the scores")
    return common.parse(ap, RECIPE, argv)


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    if a.train and not a.checkpoint:
        a.checkpoint = train_model(a.train, a.train_arch, a.train_epochs)
    scorers = [Scorer(None, 0)] + ([Scorer(a.checkpoint, 0)] if a.checkpoint else [])
    model_card = scorers[-1].card
    inp = model_card.input if model_card is not None else {"color": "gray", "resize": [a.resize, a.resize]}
    t_start = time.time()
    jobs = [(2, "ref", 10_000, a.ref, inp)]
    for s in range(a.seeds):
        jobs += [(2, "steady", s, a.before + a.after, inp), (3, "after", s, a.after, inp)]
    with ProcessPoolExecutor(max_workers=a.workers) as ex:
        rendered = list(ex.map(_render_many, jobs))
    t_render = time.time() - t_start
    ref_imgs, ref_cls, ref_stats = rendered[0]
    frames = rendered[1][0]
    image_stats(frames[0])  # warm-up
    t0 = time.perf_counter()
    for img in frames[:200]:  # noqa: B007 - timing only
        image_stats(img)
    stats_us = (time.perf_counter() - t0) / min(200, len(frames)) * 1e6
    lines = [
        "## Shift monitor: batch 2 -> batch 3 (synthetic)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, no GPU, "
        f"shared with other jobs. Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"code (and synthetic generator) at commit {_git_head()}.",
        f"Command: `python benchmarks/bench_shift.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"{a.seeds} seeds; per seed a shift stream ({a.before} batch-2 frames, then {a.after} batch-3 frames) and a "
        f"steady stream ({a.before + a.after} batch-2 frames), each through a fresh monitor; window {a.window} frames "
        f"(alarms from {a.window // 2}), limits {dict((k, v) for k, v in DEFAULT_LIMITS.items() if v)}; "
        f"input {inp['resize']} {inp['color']}. Uncertain = |logit(score) - logit(threshold)| <= 1 (daemon default).",
        "",
    ]
    summary = []
    for scorer in scorers:
        card = reference(scorer, ref_imgs, ref_cls, ref_stats)
        thr = threshold_of(card)
        name = f"checkpoint {os.path.basename(a.checkpoint)}" if scorer.card is not None else "stand-in scores"
        about = ""
        if scorer.card is not None:
            prov = scorer.card.data.get("provenance") or {}
            auc = ((scorer.card.data.get("metrics") or {}).get("val") or {}).get("auc")
            about = (f" Model: arch {prov.get('arch', '?')}, epoch {prov.get('epoch', '?')}, "
                     f"val AUC {auc if auc is None else round(float(auc), 3)}.")
        rows = []
        for s in range(a.seeds):
            (b2, c2, st2), (b3, c3, st3) = rendered[1 + 2 * s], rendered[2 + 2 * s]
            sc2, sc3 = scorer(b2, c2), scorer(b3, c3)
            steady = run_stream(card, sc2, st2, thr, a.window, None)
            shift = run_stream(card, np.concatenate([sc2[: a.before], sc3]), np.concatenate([st2[: a.before], st3]),
                               thr, a.window, a.before)
            after = {k: v - a.before for k, v in shift["first"].items() if v >= a.before}
            lead = sorted(k for k, v in shift["first"].items() if v < a.before)
            rows.append({"seed": s, "delay": min(after.values()) if after else None, "by_stat": after,
                         "false": sorted(steady["first"]), "false_lead": lead,
                         "us": (steady["us_per_frame"] + shift["us_per_frame"]) / 2,
                         "b2": float(sc2.mean()), "b3": float(sc3.mean())})
        lines += [f"### {name}", "",
                  f"References: {card['_ref_source']}; threshold {thr:.3f}.{about}", "",
                  "| seed | delay (frames after switch) | first alarm per statistic | alarms on batch 2 | mean score b2 / b3 |",
                  "|---:|---:|---|---|---|"]
        for r in rows:
            by = ", ".join(f"{k} {v}" for k, v in sorted(r["by_stat"].items(), key=lambda kv: kv[1])) or "none"
            fs = ", ".join(r["false"]) or "none"
            if r["false_lead"]:
                fs += " / lead-in: " + ", ".join(r["false_lead"])
            lines.append(f"| {r['seed']} | {r['delay'] if r['delay'] is not None else 'missed'} | {by} | {fs} | "
                         f"{r['b2']:.3f} / {r['b3']:.3f} |")
        delays = [r["delay"] for r in rows if r["delay"] is not None]
        per_stat: Dict[str, int] = {}
        for r in rows:
            for k in set(r["false"]) | set(r["false_lead"]):
                per_stat[k] = per_stat.get(k, 0) + (k in r["false"]) + (k in r["false_lead"])
        n_fa = sum(bool(r["false"]) + bool(r["false_lead"]) for r in rows)
        summary.append((name, len(delays), float(np.median(delays)) if delays else float("nan"),
                        max(delays) if delays else float("nan"), n_fa, per_stat, float(np.mean([r["us"] for r in rows]))))
        lines.append("")
    lines += ["### Side by side", "",
              "| scores | detected | median delay | max delay | delay / window | batch-2 stretches with a false alarm | by statistic | observe() us/frame |",
              "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, det, med, mx, n_fa, per_stat, us in summary:
        lines.append(f"| {name} | {det}/{a.seeds} | {med:.0f} | {mx} | {med / a.window:.2f} | {n_fa}/{2 * a.seeds} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(per_stat.items())) or 'none'} | {us:.1f} |")
    lines += [
        "",
        f"Batch-2 stretches: every steady stream ({a.before + a.after} frames) and every shift stream's lead-in "
        f"({a.before} frames): {a.seeds * (2 * a.before + a.after)} batch-2 frames per scorer. image_stats costs "
        f"{stats_us:.0f} us/frame on {inp['resize'][0]}x{inp['resize'][1]}; rendering took {t_render:.0f} s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(a.markdown)), exist_ok=True)
        with open(a.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
