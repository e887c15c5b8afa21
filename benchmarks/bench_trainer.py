#!/usr/bin/env python3
"""Trainer section: CE vs SAT under injected label noise, CenterCrop vs TenCrop at test
time (the report's Table 3/4 layout) and mislabel-ranking precision/recall, all in one
run on a synthetic data set rendered by ``nexedge synth``.

The synthetic noise is the report's kind: defect images written with the label
``good`` (escapees), only in the training split. The recipe's ``noise`` is the fraction of all
training labels that are wrong; the script sets the generator's per-defect noise
rate from it and the defect share.

    python benchmarks/bench_trainer.py --markdown benchmarks/results/trainer.md
    python benchmarks/bench_trainer.py --set n=600 --set epochs=2 --set arch=tiny   # smoke run, a minute

``--speed``: what each near-native-resolution training speed-up buys on this CPU,
measured side by side in one run: a training step (forward, backward, optimizer) of
EfficientNet-Lite0 with and without channels_last and frozen early stages, ResNet18 and
small_max for scale, and the per-image data cost with and without the decoded-image
cache. CPU seconds are reported beside wall time (the box is shared).

    python benchmarks/bench_trainer.py --speed --set crop=160 --markdown benchmarks/results/trainer_speed.md

``--compare RUN [RUN ...] --data ROOT``: trained run folders of the same data set side by
side: test AUC, FPR at TPR 99.1 % and 100 %, AUC of good vs each defect class (TenCrop
and CenterCrop of the best checkpoint), training wall and CPU time from the run's own
records, and ms per TenCrop image through ONNX Runtime fp32 and INT8 (in-graph TenCrop
export and ``nexedge calibrate --targets ort``, opened like the daemon opens them).

    python benchmarks/bench_trainer.py --compare runs/lite0 runs/resnet18 runs/small_max --data data \
        --markdown benchmarks/results/trainer_compare.md
"""

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import _common as common  # noqa: E402
from nexedge.bench import env  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    n=(2500, "images in the synthetic set"),
    size=(96, "rendered image size in px"),
    resize=(72, "model resize"),
    crop=(64, "model crop (also the --speed crop)"),
    good_fraction=(0.6, "share of good images"),
    noise=(0.05, "fraction of training labels that are wrong"),
    toy=(False, "use the drawn toy set (nexedge.train.toydata: good, scratch, blob, dots; marks a small CNN learns "
                "in minutes) instead of nexedge synth; noise flips good <-> scratch in train"),
    arch=("resnet18", "architecture trained"),
    arch_kw=([], list, "KEY=VALUE architecture keyword, e.g. width=32 for tiny"),
    epochs=(12, "training epochs"),
    sat_es=(None, int, "SAT start epoch (None: half the epochs)"),
    losses=("ce,sat", "comma list of losses to compare"),
    lr=(0.02, "learning rate"),
    optimizer=("sgd", ("sgd", "adamw"), "optimizer"),
    warmup_epochs=(0, "warm-up epochs"),
    class_counts=("", "CLS=N,... exact images per class for nexedge synth (overrides n and good_fraction)"),
    batch_size=(32, "training batch size (also the --speed batch)"),
    keep=(5, "top-k checkpoints per run (table: mean (std) over them)"),
    seed=(0, "data and training seed"),
    steps=(3, "--speed: timed steps per configuration (best kept)"),
)


def _parse(argv: List[str]) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE, threads=2, threads_help="torch threads (and nexedge synth workers)")
    p.add_argument("--speed", action="store_true", help="measure training-step speed-ups instead (see above)")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="compare these trained run folders (see above)")
    common.add_data(p, "--compare: the data root the runs were trained on")
    p.add_argument("--train-log", action="append", default=[], metavar="RUN=LOG",
                   help="--compare: a /usr/bin/time -v log of the run's training (CPU seconds, load)")
    return common.parse(p, RECIPE, argv)


#: --speed configurations: (label, arch, pretrained, freeze, channels_last)
SPEED_CASES = [
    ("lite0 baseline (NCHW, all trainable)", "efficientnet_lite0", "imagenet", 0, False),
    ("lite0 + channels_last", "efficientnet_lite0", "imagenet", 0, True),
    ("lite0 + freeze 3", "efficientnet_lite0", "imagenet", 3, False),
    ("lite0 + channels_last + freeze 3", "efficientnet_lite0", "imagenet", 3, True),
    ("lite0 + channels_last + freeze 4", "efficientnet_lite0", "imagenet", 4, True),
    ("resnet18 (NCHW)", "resnet18", "none", 0, False),
    ("resnet18 + channels_last", "resnet18", "none", 0, True),
    ("small_max width 32 (NCHW)", "small_max", "none", 0, False),
]


def _step_cost(arch: str, pretrained: str, freeze: int, channels_last: bool, crop: int, batch: int,
               steps: int) -> Dict[str, float]:
    """Best-of-``steps`` wall and CPU seconds of one training step, per image."""
    import torch

    from nexedge.models import create_model
    from nexedge.models.freeze import freeze_stages

    torch.manual_seed(0)
    model = create_model(arch, 10, pretrained=pretrained)
    if freeze:
        freeze_stages(model, freeze)
    x, y = torch.randn(batch, 3, crop, crop), torch.randint(0, 10, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    walls, cpus = [], []
    for i in range(steps + 1):  # the first step warms up allocator and kernels
        t, c = time.perf_counter(), time.process_time()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
    model.eval()
    with torch.no_grad():
        t = time.perf_counter()
        model(x)
        ev = time.perf_counter() - t
    return {"train_ms": 1000 * min(walls) / batch, "train_cpu_ms": 1000 * min(cpus) / batch,
            "eval_ms": 1000 * ev / batch}


def _data_cost(crop: int, n: int, seed: int) -> Dict[str, float]:
    """Per-image ms: decode+resize from PNG (no cache) vs cached, and the train augmentation."""
    from nexedge.data.generate import generate
    from nexedge.train.data import ImageFolderSet, list_classes
    from nexedge.train.transforms import TrainTransform

    root = tempfile.mkdtemp(prefix="bench_speed_")
    generate(root, n=n, seed=seed, workers=1, progress=False, good_fraction=0.5)
    inp = {"color": "gray", "resize": [crop + crop // 8] * 2, "crop": [crop] * 2, "crop_mode": "ten",
           "mean": [0.5] * 3, "std": [0.5] * 3}
    classes = list_classes(root, "train")
    out = {}
    for cache in (False, True):
        ds = ImageFolderSet(root, "train", classes, inp, None, cache)
        for _ in range(2):  # second pass: what every epoch after the first costs
            t = time.perf_counter()
            for i in range(len(ds)):
                ds.prepared(i)
            dt = time.perf_counter() - t
        out["cached_ms" if cache else "decode_ms"] = 1000 * dt / len(ds)
    tf = TrainTransform(inp)
    t = time.perf_counter()
    for i in range(len(ds)):
        tf(ds.prepared(i))
    out["augment_ms"] = 1000 * (time.perf_counter() - t) / len(ds)
    out["native"] = "275x267"
    return out


def _cpu_from_time_log(path: str) -> Dict[str, float]:
    """User+system CPU seconds and wall seconds from a GNU ``time -v`` log."""
    out: Dict[str, float] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            k, _, v = line.strip().partition(": ")
            if k in ("User time (seconds)", "System time (seconds)"):
                out["cpu_s"] = out.get("cpu_s", 0.0) + float(v)
            elif k.startswith("Elapsed (wall clock) time"):
                parts = [float(x) for x in v.split(":")]
                out["wall_s"] = sum(x * 60 ** i for i, x in enumerate(reversed(parts)))
    return out


def _ms_per_tencrop_image(onnx_path: str, images, threads: int, repeats: int = 5) -> float:
    """Median ms per image of ``open_backend(path).infer`` on batches of 4 (in-graph TenCrop)."""
    import numpy as np

    from nexedge.runtime import open_backend

    batch = np.stack(images[:4])
    with open_backend(onnx_path, intra_threads=threads) as be:
        be.infer(batch)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            be.infer(batch)
            ts.append(time.perf_counter() - t)
    return 1000 * sorted(ts)[len(ts) // 2] / len(batch)


def compare_main(args: argparse.Namespace, argv: List[str]) -> int:
    from nexedge.card import load_card
    from nexedge.export.int8 import run_calibration
    from nexedge.export.onnx_export import export_onnx
    from nexedge.preprocess import prepare
    from nexedge.train.data import load_image, scan_split
    from nexedge.train.evaluate import resolve_checkpoints, run_evaluation

    if not args.data:
        raise SystemExit("--compare needs --data ROOT (the data set the runs were trained on)")
    logs = dict(kv.split("=", 1) for kv in args.train_log)
    t0 = time.time()
    rows: Dict[str, Dict[str, Any]] = {}
    for run in args.compare:
        _, ckpts = resolve_checkpoints(run, 1)
        ev = run_evaluation([ckpts[0]], args.data, "test", ["center", "ten"],
                            out=os.path.join(run, "eval_compare"), progress=False, print_table=False)
        res = next(iter(ev["runs"].values()))
        with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
            conf = json.load(f)
        summ = {}
        if os.path.exists(os.path.join(run, "summary.json")):
            with open(os.path.join(run, "summary.json"), encoding="utf-8") as f:
                summ = json.load(f)
        times = _cpu_from_time_log(logs[run]) if run in logs else {}
        onnx = export_onnx(ckpts[0], out=os.path.join(run, "compare.ten.onnx"), crops="ten", max_batch=8,
                           parity_data=args.data, parity_images=4, threads=args.threads).path
        int8 = run_calibration(onnx, args.data, n_images=64, targets=("ort",), out_root=os.path.join(run, "calib"),
                               threads=args.threads).outputs["ort"]
        card = load_card(onnx)
        items = scan_split(args.data, "test", card.classes)[:8]
        imgs = [prepare(load_image(os.path.join(args.data, p), card.input["color"]), card.input) for p, _ in items]
        rows[run] = {
            "arch": conf["arch"], "pretrained": conf.get("pretrained"), "freeze": conf.get("freeze", 0),
            "epochs": conf["epochs"], "input": f"{conf['resize'][0]}/{conf['crop'][0]}",
            "train_wall_s": times.get("wall_s", summ.get("wall_s")), "train_cpu_s": times.get("cpu_s"),
            "crops": res["crops"], "n_good": res["n_good"], "n_defects": res["n_defects"],
            "ort_fp32_ms": _ms_per_tencrop_image(onnx, imgs, args.threads),
            "ort_int8_ms": _ms_per_tencrop_image(int8, imgs, args.threads),
        }
        print(f"{run}: {rows[run]['arch']} test AUC ten {res['crops']['ten']['auc']['mean']:.4f}", flush=True)

    def pct(ms: Dict[str, Any]) -> str:
        v = ms.get("mean")
        return "-" if v is None or v != v else f"{100 * v:.1f}"

    first = next(iter(rows.values()))
    classes = list(first["crops"]["ten"]["class_auc"])
    head = ["", *[f"{r['arch']} ({'ImageNet' if r['pretrained'] == 'imagenet' else 'scratch'})" for r in rows.values()]]
    body = [["epochs, input resize/crop, frozen stages"]
            + [f"{r['epochs']}, {r['input']}, {r['freeze']}" for r in rows.values()]]
    for crop in ("ten", "center"):
        body.append([f"test AUC % ({crop})"] + [pct(r["crops"][crop]["auc"]) for r in rows.values()])
        for k in ("99.1", "100"):
            body.append([f"FPR % at TPR >= {k} ({crop})"] + [pct(r["crops"][crop]["fpr_at_tpr"][k])
                                                             for r in rows.values()])
    for c in classes:
        n = first["crops"]["ten"]["class_auc"][c]["n_images"]
        body.append([f"AUC % good vs {c} ({n} test images, ten)"]
                    + [pct(r["crops"]["ten"]["class_auc"].get(c, {})) for r in rows.values()])
    body.append(["training wall min (CPU min)"] + [
        "-" if r["train_wall_s"] is None else f"{r['train_wall_s'] / 60:.1f}"
        + ("" if r["train_cpu_s"] is None else f" ({r['train_cpu_s'] / 60:.1f})") for r in rows.values()])
    body.append(["ORT fp32 ms per TenCrop image"] + [f"{r['ort_fp32_ms']:.1f}" for r in rows.values()])
    body.append(["ORT INT8 ms per TenCrop image"] + [f"{r['ort_int8_ms']:.1f}" for r in rows.values()])
    lines = [
        "### EfficientNet-Lite0 pretrained vs ResNet18 from scratch vs small_max (`--compare`)",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {env.one_line(env.capture(args.threads))}; shared with other jobs",
        "- command: `python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + argv) + "`",
        f"- data: {os.path.relpath(args.data)}; test split {first['n_good']} good, {first['n_defects']} defect images; "
        "the best checkpoint (validation AUC) of each run; ORT times: median of 5 calls of 4 images, "
        f"{args.threads} thread(s), the daemon's backend; comparison took {time.time() - t0:.0f} s",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ] + ["| " + " | ".join(r) + " |" for r in body] + [""]
    _write_section(lines, args.markdown, rows)
    return 0


def _write_section(lines: List[str], path: Optional[str], payload: Any) -> None:
    """Print a Markdown section; with ``path``, write it there and ``payload`` beside it as JSON."""
    md = "\n".join(lines)
    print(md)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(md)
        with open(common.json_path(path), "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, default=str)


def speed_main(args: argparse.Namespace, argv: List[str]) -> int:
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = []
    for label, arch, pre, freeze, cl in SPEED_CASES:
        r = _step_cost(arch, pre, freeze, cl, args.crop, args.batch_size, args.steps)
        r.update(label=label, load=os.getloadavg()[0])
        rows.append(r)
        print(f"{label:40s} train {r['train_ms']:7.1f} ms/img (cpu {r['train_cpu_ms']:7.1f})  "
              f"eval {r['eval_ms']:6.1f} ms/img  load {r['load']:.1f}", flush=True)
    data = _data_cost(args.crop, 200, args.seed)
    print(f"data per image: decode+resize {data['decode_ms']:.2f} ms, "
          f"cached {data['cached_ms']:.3f} ms, augmentation {data['augment_ms']:.2f} ms", flush=True)
    base = rows[0]
    lines = [
        "### Training speed-ups at near-native resolution (`--speed`)",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {env.one_line(env.capture(args.threads))}; torch threads {args.threads}; shared with other jobs",
        "- command: `python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + argv) + "`",
        f"- one training step (forward, backward, AdamW) on a batch of {args.batch_size} x 3 x {args.crop} x "
        f"{args.crop}, best of {args.steps} after a warm-up step; eval = one no-grad forward; "
        f"total {time.time() - t0:.0f} s",
        "",
        "| configuration | train ms/img (wall) | train CPU ms/img | CPU vs lite0 baseline | eval ms/img (wall) | load |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['train_ms']:.1f} | {r['train_cpu_ms']:.1f} | "
                     f"{base['train_cpu_ms'] / r['train_cpu_ms']:.2f}x | {r['eval_ms']:.1f} | {r['load']:.1f} |")
    lines += [
        "",
        f"Data side, per image (native {data['native']} PNG, resize {args.crop + args.crop // 8}): decode + resize "
        f"{data['decode_ms']:.2f} ms without the cache, {data['cached_ms']:.3f} ms from the in-memory cache "
        f"(`--no-cache` turns it off); the random rotation/affine/jitter augmentation {data['augment_ms']:.2f} ms.",
        "",
    ]
    _write_section(lines, args.markdown,
                   {"steps": rows, "data": data, "crop": args.crop, "batch": args.batch_size})
    return 0


def main(argv: List[str]) -> int:
    args = _parse(argv)
    if args.speed:
        return speed_main(args, argv)
    if args.compare:
        return compare_main(args, argv)
    import torch

    torch.set_num_threads(args.threads)
    from nexedge.data.generate import generate
    from nexedge.train.cli import _kv
    from nexedge.train.evaluate import format_table, run_evaluation
    from nexedge.train.mislabels import rank_mislabels
    from nexedge.train.trainer import TrainConfig, train

    work = common.work_dir("trainer")
    data = os.path.join(work, "data")
    t0 = time.time()
    if args.toy:
        from nexedge.train.toydata import make_toy_imagefolder

        per = {"train": int(args.n * 0.7) // 4, "val": int(args.n * 0.15) // 4, "test": int(args.n * 0.15) // 4}
        # noise flips only good and scratch (half the classes): twice the rate gives --noise overall
        make_toy_imagefolder(data, ("good", "scratch", "blob", "dots"), {k: [v] * 4 for k, v in per.items()},
                             size=args.size, noise=min(1.0, 2 * args.noise), seed=args.seed)
        synth = {"n": 4 * sum(per.values())}
        counts = {k: 4 * v for k, v in per.items()}
    else:
        class_counts = {k: int(v) for k, v in _kv(args.class_counts.split(","), "class_counts").items()} \
            if args.class_counts else None
        if class_counts:
            args.n = sum(class_counts.values())
            args.good_fraction = class_counts.get("good", 0) / float(args.n)
        per_defect_noise = min(1.0, args.noise / (1.0 - args.good_fraction))
        synth = generate(data, n=args.n, seed=args.seed, noise=per_defect_noise, size=(args.size, args.size),
                         workers=args.threads, progress=False,
                         good_fraction=None if class_counts else args.good_fraction, class_counts=class_counts)
        counts = {s: sum(c.values()) for s, c in synth["counts"].items()}
    t_synth = time.time() - t0
    with open(os.path.join(data, "manifest.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    wrong = {sp: sum(1 for r in rows if r["split"] == sp and r["label"] != r["true_label"]) for sp in counts}
    synth["n_noisy"] = wrong.get("train", 0)
    synth["wrong"] = wrong
    print(f"synth: {synth['n']} images {counts}, {synth['n_noisy']} noisy train labels, {t_synth:.0f} s", flush=True)

    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    runs: Dict[str, Dict[str, Any]] = {}
    for loss in losses:
        out = os.path.join(work, loss)
        cfg = TrainConfig(data=data, out=out, arch=args.arch, arch_kw=_kv(args.arch_kw, "arch_kw"), resize=(args.resize,) * 2, crop=(args.crop,) * 2,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule="cosine",
                          loss=loss, sat_es=args.sat_es, keep=args.keep, seed=args.seed, progress=False,
                          test_curves=False, optimizer=args.optimizer, warmup_epochs=args.warmup_epochs)
        t = time.time()
        summary = train(cfg)
        runs[loss] = {"out": out, "train_s": time.time() - t, "summary": summary}

    t = time.time()
    ev = run_evaluation([runs[loss]["out"] for loss in losses], data, "test", ["center", "ten"],
                        out=os.path.join(work, "eval"), progress=False)
    t_eval = time.time() - t
    mis = {}
    for loss in losses:
        r = rank_mislabels(runs[loss]["out"], data, "train", top=max(1, synth["n_noisy"]), progress=False)
        mis[loss] = r
    wall = time.time() - t0
    md = _markdown(args, argv, synth, counts, runs, ev, mis, t_synth, t_eval, wall, format_table(ev, markdown=True))
    print(md)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(md)
        with open(common.json_path(args.markdown), "w", encoding="utf-8") as f:
            json.dump({"eval": ev, "mislabels": {k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                                                 for k, v in mis.items()},
                       "train_s": {k: v["train_s"] for k, v in runs.items()}}, f, indent=1, default=str)
    return 0


def _ratio(a: float, b: float) -> str:
    return "-" if not b or a != a or b != b else f"{a / b:.2f}"


def _markdown(args, argv, synth, counts, runs, ev, mis, t_synth, t_eval, wall, table) -> str:
    e = env.capture(args.threads)
    if args.toy:
        data_line = (f"- data: drawn toy set (`nexedge.train.toydata`: good, scratch, blob, dots), {synth['n']} images "
                     f"at {args.size}x{args.size} px (train {counts['train']}, val {counts['val']}, test "
                     f"{counts['test']}); {synth['n_noisy']} training labels wrong "
                     f"({100 * synth['n_noisy'] / counts['train']:.1f} % of train: good <-> scratch flips); val and "
                     "test clean")
    else:
        data_line = (f"- data: `nexedge synth` batch 2, {synth['n']} images rendered at {args.size}x{args.size} px "
                     f"(train {counts['train']}, val {counts['val']}, test {counts['test']}), good share "
                     f"{args.good_fraction:.2f}; {synth['n_noisy']} training labels wrong "
                     f"({100 * synth['n_noisy'] / counts['train']:.1f} % of train: defect images labelled good); the "
                     f"generator also leaves {synth['wrong'].get('val', 0)} in val and {synth['wrong'].get('test', 0)} "
                     "in test, scored by their given label as the report's test set was")
    lines = [
        "### " + ("Toy set" if args.toy else "Synthetic set (`nexedge synth`)"),
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {env.one_line(e)}; torch threads {args.threads}; shared with other jobs",
        "- command: `" + " ".join(["python", "benchmarks/bench_trainer.py"] + [shlex.quote(a) for a in argv]) + "`",
        data_line,
        f"- model: {args.arch} {' '.join(args.arch_kw)} from scratch, input resize {args.resize} / crop {args.crop} (gray), random-crop "
        f"augmentation, {args.epochs} epochs, {args.optimizer} lr {args.lr} cosine (warmup {args.warmup_epochs}), "
        f"batch {args.batch_size}, "
        f"SAT alpha 0.9 from epoch {args.sat_es if args.sat_es is not None else max(1, args.epochs // 2)}",
        f"- wall time: synth {t_synth:.0f} s; "
        + "; ".join(f"train {k} {v['train_s'] / 60:.1f} min" for k, v in runs.items())
        + f"; eval (all checkpoints, TenCrop pass) {t_eval:.0f} s; total {wall / 60:.1f} min",
        "",
        f"Test split, mean (std) over the top-{args.keep} checkpoints by validation AUC of each run "
        "(CenterCrop is crop 4 of the same TenCrop pass):",
        "",
        table,
    ]
    names = list(runs)
    if len(names) >= 2:
        a, b = names[0], names[1]
        fa = ev["runs"][a]["crops"]["center"]["fpr_at_tpr"]["100"]["mean"]
        fb = ev["runs"][b]["crops"]["center"]["fpr_at_tpr"]["100"]["mean"]
        lines += [f"Ratio FPR at TPR = 100 %, CenterCrop, {b} / {a}: {_ratio(fb, fa)}"]
    for k in names:
        c = ev["runs"][k]["crops"]
        lines += [f"Ratio FPR at TPR = 100 %, {k}, TenCrop / CenterCrop: "
                  f"{_ratio(c['ten']['fpr_at_tpr']['100']['mean'], c['center']['fpr_at_tpr']['100']['mean'])}"]
    lines += ["", "Mislabel ranking on the training split (`nexedge mislabels`, best checkpoint; flagging as many "
              "images as there are wrong labels):", "",
              "| run | suspicion from | flagged | wrong labels | found | precision | recall |", "|---|---|---|---|---|---|---|"]
    for k, r in mis.items():
        pr = r["noise"]["binary_flips"]
        src = "SAT soft labels" if r["sat"] else "model score"
        lines.append(f"| {k} | {src} | {pr['flagged']} | {pr['noisy']} | {pr['tp']} | {pr['precision']:.3f} | "
                     f"{pr['recall']:.3f} |")
    lines += ["", "One run per loss and one seed: differences of a few points are within run-to-run noise at this "
              "size; the numbers show the tool works end to end, not the report's results.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
