#!/usr/bin/env python3
"""INT8 with the stem convolutions kept float (what `nexedge calibrate` writes by default) vs every
backbone convolution quantized (`--quant-kw quantize_stem=true`, the recipe before): ranking kept from FP32
(test AUC, FPR at TPR 100 %), the line at each artifact's own validation threshold (good PASSed,
escapes) and ONNX Runtime time of a TenCrop batch, side by side in one run, on trained demo models.

    python benchmarks/bench_int8_stem.py --run runs/demo-A --run runs/demo-B \\
        --markdown benchmarks/results/int8_stem.md

Each RUN is a `nexedge demo` folder (model/model.ten.onnx with its card, data/). Without ``--run``
it first runs `nexedge demo --seed S` for each of the recipe's ``seeds`` (0,1; about 6 minutes each).
"""

import argparse
import datetime as _dt
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from benchmarks import _common as common  # noqa: E402
from nexedge import metrics  # noqa: E402
from nexedge.bench import env as benv  # noqa: E402
from nexedge.bench import report  # noqa: E402
from nexedge.card import load_card  # noqa: E402
from nexedge.threads import default_threads  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    seeds=("0,1", "demo seeds to run when no --run is given"),
    images=(64, "calibration images (as the demo)"),
    repeats=(8, "interleaved timing rounds"),
)

VARIANTS = (("fp32", None), ("int8, stem float", True), ("int8, stem quantized", False))


def scores(path: str, data: str, threads: int) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{split: (is_defect, defect score)} for val and test through the daemon's backend."""
    from nexedge.export.thresholds import score_images, split_images
    from nexedge.runtime import open_backend

    card = load_card(path)
    be = open_backend(path, intra_threads=threads)
    g = card.classes.index(card.good_class)
    out = {}
    for split in ("val", "test"):
        paths, labels = split_images(data, split, card.classes)
        s, _ = score_images(be, paths, card.input)
        out[split] = (labels != g, s)
    return out


def timing(paths: List[str], threads: int, repeats: int) -> List[float]:
    """Median ms of one batch of 4 frames per model, interleaved rounds."""
    from nexedge.runtime import open_backend

    bes = [open_backend(p, intra_threads=threads) for p in paths]
    card = load_card(paths[0])
    h, w = card.input["resize"]
    c = 1 if card.input["color"] == "gray" else 3
    x = np.random.default_rng(0).integers(0, 256, (4, h, w, c), dtype=np.uint8)
    for be in bes:
        be.infer(x)
    t: List[List[float]] = [[] for _ in bes]
    for _ in range(repeats):
        for i, be in enumerate(bes):
            t0 = time.perf_counter()
            be.infer(x)
            t[i].append(time.perf_counter() - t0)
    return [float(np.median(v)) * 1000 for v in t]


def measure(run: str, work: str, images: int, threads: int, repeats: int) -> List[List[Any]]:
    from bench_line_tail import demo_model

    from nexedge.export.int8 import run_calibration

    src = demo_model(run)
    data = os.path.join(run, "data")
    paths = {}
    for name, float_stem in VARIANTS:
        d = os.path.join(work, name.replace(" ", "_").replace(",", ""))
        os.makedirs(d, exist_ok=True)
        shutil.copy(src, d)
        shutil.copy(src[:-len(".onnx")] + ".card.json", d)
        fp32 = os.path.join(d, os.path.basename(src))
        if float_stem is None:
            paths[name] = fp32
            continue
        res = run_calibration(fp32, data, name="bench", n_images=images, targets=("ort",),
                              out_root=os.path.join(d, "cal"), eval_split=None, threads=threads,
                              float_stem=float_stem)
        paths[name] = res.outputs["ort"]
    ms = dict(zip(paths, timing(list(paths.values()), threads, repeats)))
    rows = []
    for name, path in paths.items():
        sc = scores(path, data, threads)
        (yv, sv), (yt, st) = sc["val"], sc["test"]
        thr = float(sv[yv].min())  # the card's TPR 100 % point: every validation defect caught
        good_pass = int((st[~yt] < thr).sum())
        escapes = int((st[yt] < thr).sum())
        fpr100 = float((st[~yt] >= st[yt].min()).mean())
        rows.append([os.path.basename(os.path.normpath(run)), name, f"{100 * metrics.roc_auc(yt, st):.2f}",
                     f"{100 * fpr100:.1f}", f"{good_pass}/{int((~yt).sum())}", escapes, f"{ms[name]:.0f}",
                     f"{ms['fp32'] / ms[name]:.2f}"])
    return rows


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE, threads=None)
    p.add_argument("--run", action="append", default=[],
                   help="a `nexedge demo` run folder (repeatable; default: run the demo for each of the recipe's seeds)")
    return common.parse(p, RECIPE, argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    threads = args.threads or default_threads()
    command = "python benchmarks/bench_int8_stem.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_start = benv.load_average()
    rows: List[List[Any]] = []
    with tempfile.TemporaryDirectory() as demos:
        runs = list(args.run)
        if not runs:
            from nexedge.cli import main as nexedge

            for seed in [int(x) for x in args.seeds.split(",") if x.strip()]:
                runs.append(os.path.join(demos, f"demo-seed{seed}"))
                if nexedge(["demo", "--seed", str(seed), "--out", runs[-1], "--threads", str(threads)]) != 0:
                    raise SystemExit(f"nexedge demo --seed {seed} failed")
        for run in runs:
            with tempfile.TemporaryDirectory() as tmp:
                rows += measure(run, tmp, args.images, threads, args.repeats)
    e = benv.capture(threads)
    headers = ["run", "model", "test AUC %", "test FPR at TPR 100 % (%)", "good PASSed at own val threshold",
               "escapes", "ms / 4 frames TenCrop", "speed-up vs fp32"]

    def render(md: bool) -> str:
        lines = ["## INT8 with the stem kept float vs fully quantized (ONNX Runtime U8S8)", ""]
        lines += [f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
                  f"- machine: {benv.one_line(e)}; load average at start {load_start}, at end "
                  f"{benv.load_average()}",
                  f"- command: `{command}`",
                  f"- trained demo models (EfficientNet-Lite0, in-graph TenCrop); {args.images} calibration "
                  "images; the threshold is each artifact's own lowest validation defect score (the "
                  f"card's TPR 100 % point); {threads} ORT thread(s), median of {args.repeats} interleaved "
                  "rounds", ""]
        lines.append(report.table(headers, rows, markdown=md))
        return "\n".join(lines) + "\n"

    report.emit(render, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
