#!/usr/bin/env python3
"""EfficientNet-Lite0 with its TF "same" Pads folded into the Conv pads (what `nexedge export`
writes) vs left as Pad nodes (the export before): ONNX Runtime fp32 and U8S8 INT8 time of one
image TenCrop, side by side in one run (interleaved rounds), the op counts of the graph ORT
runs, and the score difference between the two graphs.

Untrained weights (speed does not depend on them), the models of bench_int8.py's speed part
(``build``: both flavours, host crops and in-graph TenCrop).

    python benchmarks/bench_fold.py --markdown benchmarks/results/fold.md
"""

import argparse
import datetime as _dt
import importlib.util
import os
import shlex
import sys
from typing import Any, Dict, List, Optional
from unittest import mock

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from benchmarks import _common as common  # noqa: E402
from nexedge.bench import env as benv  # noqa: E402
from nexedge.bench import report  # noqa: E402
from nexedge.threads import default_threads  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    size=(224, "crop size in px"),
    repeats=(10, "interleaved timing rounds"),
)


def _bench_int8() -> Any:
    spec = importlib.util.spec_from_file_location("bench_int8", os.path.join(HERE, "bench_int8.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def build_pair(b8: Any, work: str, size: int, threads: int) -> Dict[str, Dict[str, Dict[str, str]]]:
    """{"folded" | "unfolded": {flavour: {"fp32": path, "u8s8": path}}}, same weights."""
    out = {"folded": b8.build(os.path.join(work, "folded"), "efficientnet_lite0", size, ["u8s8"], threads)}
    with mock.patch("nexedge.export.fold.fold_pads_into_conv", return_value=0):
        out["unfolded"] = b8.build(os.path.join(work, "unfolded"), "efficientnet_lite0", size, ["u8s8"], threads)
    return out


def score_diff(a: str, b: str, threads: int) -> float:
    """Max |defect score| difference of two graphs on 4 random images (one TenCrop batch each)."""
    b8 = _bench_int8()
    with b8.open_ten(a, threads) as x, b8.open_ten(b, threads) as y:
        H, W, C = x.input_shape
        imgs = np.random.default_rng(1).integers(0, 256, (4, H, W, C), dtype=np.uint8)
        return float(np.abs(x.infer(imgs).defect_score - y.infer(imgs).defect_score).max())


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return common.parse(common.parser(__doc__, RECIPE, threads=None), RECIPE, argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    threads = args.threads or default_threads()
    command = "python benchmarks/bench_fold.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_start = benv.load_average()
    b8 = _bench_int8()
    work = common.work_dir("fold")
    models = build_pair(b8, work, args.size, threads)
    times = b8.speed(models, threads, args.repeats)
    ops = {(g, f, v): b8.optimized_ops(p, threads, work) for g, per in models.items() for f, vs in per.items()
           for v, p in vs.items()}
    diffs = {(f, v): score_diff(models["folded"][f][v], models["unfolded"][f][v], threads)
             for f in models["folded"] for v in models["folded"][f]}
    med = {k: float(np.median(v)) * 1000 for k, v in times.items()}
    rows: List[List[Any]] = []
    for f in models["folded"]:
        for v in models["folded"][f]:
            before, after = med[("unfolded", f, v)], med[("folded", f, v)]
            o_b, o_a = ops[("unfolded", f, v)], ops[("folded", f, v)]
            rows.append([f, v, round(before, 1), round(after, 1), round(before / after, 2),
                         "{} / {}".format(o_b.get("Pad", 0), o_a.get("Pad", 0)),
                         "{} / {}".format(o_b.get("DequantizeLinear", 0), o_a.get("DequantizeLinear", 0)),
                         "{} / {}".format(o_b.get("QuantizeLinear", 0), o_a.get("QuantizeLinear", 0)),
                         f"{diffs[(f, v)]:.1e}"])
    e = benv.capture(threads)
    headers = ["flavour", "model", "Pad kept: median ms", "Pad folded: median ms", "speed-up",
               "Pad nodes (ORT graph, kept / folded)", "DequantizeLinear", "QuantizeLinear",
               "max |score diff|"]

    def render(md: bool) -> str:
        lines = ["## EfficientNet-Lite0: TF \"same\" Pads folded into Conv pads at export", ""]
        lines += [f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
                  f"- machine: {benv.one_line(e)}; load average at start {load_start}",
                  f"- command: `{command}`",
                  f"- one image TenCrop (batch 10 crops of {args.size} px), untrained weights, {threads} ORT "
                  f"thread(s), median of {args.repeats} interleaved rounds; INT8 = U8S8 per-channel Q/DQ "
                  "(`nexedge calibrate --targets ort`)", ""]
        lines.append(report.table(headers, rows, markdown=md))
        return "\n".join(lines) + "\n"

    report.emit(render, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
