#!/usr/bin/env python3
"""How close to the machine's limit does inference run? Achieved GFLOP/s vs a measured GEMM.

In one run, on the same threads: (1) the GEMM rate of this machine — float32 matrix
products through numpy's BLAS and ONNX Runtime's MatMul (MLAS, the kernels its Conv
uses) and INT8 MatMulInteger (uint8 x int8, what U8S8 Q/DQ models run), measured
before and after the model runs so load changes show; (2) the models' images/s
through ``nexedge bench``'s runner; (3) each model's FLOPs per image counted from its
ONNX graph. Achieved GFLOP/s = FLOPs/image x images/s, reported as a fraction of the
GEMM peak of its precision.

By default the models are built here: an untrained ResNet18 at the report's geometry
(resize 255, crop 224; FLOPs and speed do not depend on the weights), exported with
``nexedge export --crops host`` and quantized with ``nexedge calibrate`` on a few
synthetic images. ``--model A.onnx,B.onnx`` benchmarks given ONNX files instead.

    python benchmarks/bench_gemm.py --markdown benchmarks/results/gemm.md
"""

import argparse
import datetime as _dt
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import _common as common  # noqa: E402
from nexedge.bench import env, gemm, report, runner  # noqa: E402
from nexedge.threads import default_threads  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    arch=("resnet18", "architecture of the built model"),
    resize=(255, "resize of the built model"),
    crop=(224, "crop of the built model"),
    calib_images=(32, "calibration images for INT8"),
    batch=("1,10", "batch sizes (10 = one TenCrop image)"),
    duration=(5.0, "seconds per model and batch"),
    gemm_size=(1024, "GEMM matrix size"),
    gemm_seconds=(2.0, "seconds per GEMM kernel"),
)

CLASSES = ["good", "chipping", "device_flip", "empty_pocket", "foreign_material", "lead_defect", "lead_glue",
           "marking_defect", "pocket_damage", "scratch"]


def build_models(work: str, arch: str, resize: int, crop: int, threads: int, calib_images: int) -> List[str]:
    """Untrained ``arch`` checkpoint -> fp32 host-crop ONNX -> INT8 ONNX for ONNX Runtime; returns the ONNX paths."""
    import glob

    import torch

    from nexedge.card import ModelCard
    from nexedge.cli import main
    from nexedge.models import create_model
    from nexedge.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    card = ModelCard.new(CLASSES, resize=(resize, resize), crop=(crop, crop), crop_mode="center", color="gray")
    card.update_provenance(arch=arch)
    ckpt = save_checkpoint(os.path.join(work, f"{arch}.pt"), create_model(arch, len(CLASSES)).eval(), arch, CLASSES,
                           "good", card=card)
    fp32 = os.path.join(work, f"{arch}.host.onnx")
    _nexedge(main, ["export", ckpt, "--crops", "host", "-o", fp32, "--threads", str(threads)])
    data = os.path.join(work, "calib-data")
    _nexedge(main, ["synth", data, "--n", str(max(60, 2 * calib_images)), "--size", str(resize),
                    "--workers", str(threads), "--no-progress"])
    _nexedge(main, ["calibrate", fp32, "--data", data, "--images", str(calib_images), "--targets", "ort",
                    "--report-kw", "eval_split=", "--calib-root", os.path.join(work, "calibrate"), "--out-dir", work])
    int8 = sorted(glob.glob(os.path.join(work, "*.int8-ort.onnx")))
    if not int8:
        raise RuntimeError(f"nexedge calibrate wrote no *.int8-ort.onnx under {work}")
    return [fp32, int8[0]]


def _nexedge(main: Any, argv: Sequence[str]) -> None:
    print("$ nexedge " + " ".join(argv), flush=True)
    rc = main(list(argv))
    if rc != 0:
        raise RuntimeError(f"`nexedge {' '.join(argv)}` exited with status {rc}")


def measure(models: Sequence[str], batches: Sequence[int], duration: float, threads: int, n: int,
            gemm_seconds: float) -> Dict[str, Any]:
    print(f"GEMM {n}x{n} before the models ...", flush=True)
    before = gemm.measure_peaks(n, threads=threads, seconds=gemm_seconds)
    rows = []
    for path in models:
        flops = gemm.model_flops(path, batch=1)
        doc = runner.bench_model(path, batches=batches, duration=duration, threads=threads,
                                 progress=lambda m: print(m, flush=True))
        for r in doc["results"]:
            k = runner.pp.n_crops(r["crops"]) if r["crops_where"] == "host" else 1
            rows.append({"model": os.path.basename(path), "precision": r["precision"],
                         "quantization": doc["model"].get("quantization"), "batch": r["batch"], "crops": r["crops"],
                         "images_per_s": r["images_per_s"], "p50_ms": r["latency_ms"]["e2e"]["median"],
                         "flops_per_image": flops["flops"] * k, "unresolved": len(flops["unresolved"])})
    print(f"GEMM {n}x{n} after the models ...", flush=True)
    after = gemm.measure_peaks(n, threads=threads, seconds=gemm_seconds)
    peaks = {"fp32": max(before["fp32_peak"], after["fp32_peak"]),
             "int8": max(before["int8_peak"] or 0.0, after["int8_peak"] or 0.0) or None}
    for r in rows:
        kind = "int8" if r["precision"] == "int8" and peaks["int8"] else "fp32"
        u = gemm.utilisation(r["flops_per_image"], r["images_per_s"], peaks[kind])
        r.update(achieved_gflops=u["achieved_gflops"], fraction=u["fraction_of_peak"], peak_kind=kind)
    return {"before": before, "after": after, "peaks": peaks, "rows": rows}


def render(res: Dict[str, Any], e: Dict[str, Any], command: str, markdown: bool) -> str:
    g_rows = []
    for when in ("before", "after"):
        for r in res[when]["rows"]:
            unit = "GOP/s" if "u8s8" in r["kernel"] else "GFLOP/s"
            g_rows.append([when, r["kernel"], r["n"], r.get("threads", "BLAS default"),
                           f"{r['best_gflops']:.1f} {unit}", f"{r['median_gflops']:.1f} {unit}"])
    m_rows = []
    for r in res["rows"]:
        m_rows.append([r["model"], r["precision"], r["crops"], r["batch"], r["images_per_s"], r["p50_ms"],
                       report.flops_text(r["flops_per_image"]), r["achieved_gflops"],
                       f"{100 * r['fraction']:.0f}% of {r['peak_kind']}" if r["fraction"] else "-"])
    out = []
    if markdown:
        out += ["## gemm", "", "Achieved GFLOP/s of inference against a GEMM measured on the same machine in the "
                "same run (FLOPs counted from the ONNX graph: Conv/Gemm/MatMul, 2 per multiply-accumulate).", ""]
    out += [f"- machine: {env.one_line(e)}", f"- date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"- command: `{command}`", "", "GEMM (square matrices; best and median of repeated products):", ""]
    out.append(report.table(["when", "kernel", "n", "threads", "best", "median"], g_rows, markdown=markdown))
    out += ["", "Models (images/s from `nexedge bench`'s runner, end-to-end infer() incl. host preprocessing):", ""]
    out.append(report.table(["model", "prec", "crops", "batch", "img/s", "p50 ms", "work/image", "achieved GFLOP/s",
                             "of GEMM peak"], m_rows, markdown=markdown))
    p = res["peaks"]
    out += ["", "Peaks used: fp32 {:.1f} GFLOP/s, int8 {} (best of before/after).".format(
        p["fp32"], "-" if not p["int8"] else f"{p['int8']:.1f} GOP/s")]
    return "\n".join(out) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE, threads=None)
    common.add_model(p, "comma-separated ONNX files (with cards) to measure instead of building the recipe's model")
    return common.parse(p, RECIPE, argv, removed={"--models": "use --model (comma-separated)"})


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = args.threads or default_threads()
    batches = runner.parse_int_list(args.batch, "batch")
    command = " ".join(["python", "benchmarks/bench_gemm.py"] + [shlex.quote(a) for a in argv])
    t0 = time.perf_counter()
    if args.model:
        models = [m.strip() for m in args.model.split(",") if m.strip()]
    else:
        models = build_models(common.work_dir("gemm"), args.arch, args.resize, args.crop, threads, args.calib_images)
    res = measure(models, batches, args.duration, threads, args.gemm_size, args.gemm_seconds)
    e = env.capture(threads)
    print(render(res, e, command, markdown=False))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.markdown:
        report.write_markdown(args.markdown, render(res, e, command, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
