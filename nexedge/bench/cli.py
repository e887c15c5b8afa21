"""``nexedge bench``: throughput and latency of a model on a backend, like trtexec / perf_analyzer.

Light at import (argparse only); numpy, onnx and the backends load inside :func:`run_bench`.
"""

import argparse
import datetime as _dt
import shlex
import sys
import textwrap
from typing import Any, Dict, List, Optional

from nexedge.card import CROP_MODES, PRECISIONS
from nexedge.cliopts import Key, add_kw_option, uses_globals
from nexedge.threads import given


def configure_bench(p: argparse.ArgumentParser) -> None:
    from nexedge.runtime import registry

    p.description = textwrap.fill(
        "Measure images/s and latency (min, mean, median, p90, p95, p99, max) of a model, split by "
        "stage (decode, resize, preprocess, h2d, inference, d2h, postprocess) as far as the backend "
        "can tell them apart. MODEL is an artifact a backend opens (" + registry.suffix_text() + "; "
        "backends below), with its card beside it. The machine (CPU, threads, library versions, load; on "
        "a Jetson the power mode and clock lock) is recorded with the result.", 100)
    p.epilog = ("backends (--backend auto picks by suffix):\n" + registry.describe() + "\n\n"
                "examples:\n  nexedge bench model.onnx --batch 1,10 --duration 10\n"
                "  nexedge bench model.int8.onnx --json int8.json\n"
                "  nexedge bench --compare fp32.json int8.json")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("model", nargs="?", help=f"model artifact ({registry.suffix_text()}) with its .card.json")
    p.add_argument("--backend", default=registry.AUTO, choices=(registry.AUTO,) + registry.backend_names(),
                   help="backend; auto picks by suffix, an explicit one must open the artifact (default auto)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="require the artifact to be of this precision (its card says which); no conversion")
    p.add_argument("--providers", help="ONNX Runtime execution providers, e.g. cpu, cuda or tensorrt,cuda")
    p.add_argument("--batch", default="1,10", help="batch sizes in images, comma-separated (default 1,10)")
    p.add_argument("--crops", default="",
                   help="crop modes to run for a host-crop model, comma-separated from center,five,ten "
                        "(default: the card's mode)")
    p.add_argument("--cascade", type=float, metavar="TPR", nargs="?", const=1.0,
                   help="also run the cascade plan (center crop, full crops only in the card's guard band) at the "
                        "card's threshold for this target TPR (default 1.0); needs a band measured with "
                        "`nexedge thresholds --cascade`; the stage-2 share is meaningful only with --images")
    p.add_argument("--warmup", type=int, default=10, help="untimed iterations per batch size (default 10)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--duration", type=float, default=5.0,
                   help="seconds of timed iterations per batch size (default 5)")
    g.add_argument("--iterations", type=int, help="exact number of timed iterations per batch size")
    p.add_argument("--images", help="folder or glob of image files: include JPEG/PNG decode and resize "
                                    "(default: random prepared images, decode not timed)")
    p.add_argument("--gemm", action="store_true",
                   help="also measure GEMM GFLOP/s on this machine and report achieved GFLOP/s vs that peak "
                        "(ONNX models; needs the onnx package)")
    add_kw_option(p, "--gemm-kw", {
        "size": Key("gemm_size", int, 1024, "matrix size"),
        "seconds": Key("gemm_seconds", float, 1.0, "seconds per GEMM kernel"),
    }, help="--gemm settings")
    p.add_argument("--json", metavar="OUT", help="write the result document to this JSON file")
    p.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="compare two result files (ratios B/A) instead of running a benchmark")
    uses_globals(p, "--threads")


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def effective_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run, defaults spelled out."""
    parts = ["nexedge", "bench", args.model, "--backend", args.backend, "--batch", args.batch,
             "--warmup", str(args.warmup)]
    parts += ["--iterations", str(args.iterations)] if args.iterations else ["--duration", str(args.duration)]
    for flag, value in (("--precision", args.precision), ("--providers", args.providers), ("--crops", args.crops),
                        ("--threads", given(args)), ("--images", args.images)):
        if value:
            parts += [flag, str(value)]
    if args.cascade is not None:
        parts += ["--cascade", str(args.cascade)]
    if args.gemm:
        parts += ["--gemm", "--gemm-kw", f"size={args.gemm_size}", "--gemm-kw", f"seconds={args.gemm_seconds}"]
    if args.json:
        parts += ["--json", args.json]
    return " ".join(shlex.quote(p) for p in parts)


def bench_document(args: argparse.Namespace, progress: Any = _progress) -> Dict[str, Any]:
    """Run the benchmark the arguments describe and return the result document."""
    from nexedge.bench import env, gemm, runner
    from nexedge.bench.report import SCHEMA

    batches = runner.parse_int_list(args.batch, "--batch")
    crops: List[Optional[str]] = [c.strip() for c in args.crops.split(",") if c.strip()] or [None]
    for c in crops:
        if c is not None and c not in CROP_MODES:
            raise ValueError(f"--crops {c!r}: expected one of {', '.join(CROP_MODES)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup}: expected 0 or more iterations")
    if args.iterations is not None and args.iterations < 1:
        raise ValueError(f"--iterations {args.iterations}: expected a positive number")
    if args.gemm and not args.model.lower().endswith(".onnx"):
        raise ValueError("--gemm counts FLOPs from the ONNX graph; bench the .onnx model (or drop --gemm)")
    doc: Dict[str, Any] = {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": effective_command(args),
        "env": env.capture(threads=args.threads),
    }
    doc.update(runner.bench_model(
        args.model, backend=args.backend, precision=args.precision, batches=batches, crops=crops,
        warmup=args.warmup, duration=None if args.iterations else args.duration, iterations=args.iterations,
        threads=given(args), providers=args.providers, images=args.images, progress=progress,
        cascade=args.cascade,
    ))
    if args.gemm:
        progress(f"GEMM peak: {args.gemm_size}x{args.gemm_size} matrix products ...")
        doc["gemm"] = gemm.measure_peaks(args.gemm_size, threads=args.threads, seconds=args.gemm_seconds)
        progress("counting model FLOPs from the ONNX graph ...")
        doc["flops"] = f = gemm.model_flops(args.model, batch=1)
        for r in doc["results"]:
            if r.get("plan"):  # a cascade's work per image depends on its stage-2 share
                continue
            host_k = runner.pp.n_crops(r["crops"]) if r["crops_where"] == "host" else 1
            r["flops_per_image"] = f["flops"] * host_k
            kind = "int8" if r["precision"] == "int8" and doc["gemm"]["int8_peak"] else "fp32"
            u = gemm.utilisation(r["flops_per_image"], r["images_per_s"], doc["gemm"][kind + "_peak"])
            u["peak_kind"] = kind
            r["utilisation"] = u
    return doc


def run_bench(args: argparse.Namespace) -> int:
    from nexedge.bench import report

    if args.compare:
        if args.model:
            raise ValueError("--compare takes two result files and no MODEL")
        a, b = (report.load_json(p) for p in args.compare)
        print(report.compare(a, b, markdown=args.markdown, names=("A", "B")))
        return 0
    if not args.model:
        from nexedge.runtime.registry import suffix_text

        raise ValueError(f"give a MODEL to benchmark ({suffix_text()}) or --compare A.json B.json")
    doc = bench_document(args)
    print(report.render(doc, markdown=args.markdown))
    if args.json:
        report.save_json(doc, args.json)
        print(f"wrote {args.json}")
    return 0
