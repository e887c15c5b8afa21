#!/usr/bin/env python3
"""What limits ONNX Runtime INT8 on this CPU: speed-up per architecture, flavour and quantization
setting, a kernel-level profile of the quantized graph, and accuracy beside each.

Three parts, one run (ratios are what count on a shared box: rounds are interleaved):

* speed: per architecture (``--archs``) and flavour (host crops / in-graph TenCrop), the fp32
  model and one Q/DQ INT8 model per quantization setting (``--variants``: U8S8 per-channel, the
  default; per-tensor; reduce_range; U8U8; S8S8), all at ``--size`` px crops, batch 10 (one image
  TenCrop) through ``nexedge.runtime.open_backend`` (what the daemon runs). Untrained weights:
  speed does not depend on them.
* profile: per architecture, host flavour, fp32 vs default INT8: the graph after ORT's optimizer
  (``optimized_model_filepath``: which nodes stay float, Q/DQ pairs left unfused, Transpose/Reshape)
  and ORT's per-node profile (time per op type), set against an INT8 and an fp32 GEMM measured in
  the same run, giving the fraction of time in int8 kernels and the speed-up ceiling.
* accuracy: per architecture, a model trained on generated images (``nexedge.export.toy``) at
  ``--acc-size`` px, exported in both flavours, calibrated per setting with ``nexedge calibrate``'s
  code, operating points measured on val on each artifact, AUC and escapes/overkill on test at the
  deployed threshold (TPR 100 %).

    python benchmarks/bench_int8.py --markdown benchmarks/results/int8.md
"""

import argparse
import collections
import datetime as _dt
import json
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import _common as common  # noqa: E402
from nexedge.bench import env as benv  # noqa: E402
from nexedge.bench import report  # noqa: E402
from nexedge.threads import default_threads  # noqa: E402

#: name -> ORT quantization settings (nexedge.export.quantize.ort_settings).
VARIANTS = {
    "u8s8": {},
    "u8s8-tensor": {"per_channel": False},
    "u8s8-rr": {"reduce_range": True},
    "u8u8": {"weights": "u8"},
    "s8s8": {"activations": "s8"},
}
ARCH_KW = {"efficientnet_lite0": {"pretrained": "imagenet"}}
FLAVOURS = ("host", "ten")
INT8_OPS = ("QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearGlobalAveragePool", "QLinearConcat",
            "QLinearMul", "QLinearSigmoid", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
            "DynamicQuantizeMatMul", "NhwcMaxPool", "MaxPool_uint8")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    archs=("resnet18,small_max,efficientnet_lite0", "architectures timed"),
    variants=(",".join(VARIANTS), "quantization settings timed on explore_archs (of " + ", ".join(VARIANTS) + ")"),
    explore_archs=("resnet18", "archs timed with every variant; the others with the default u8s8 only"),
    size=(224, "crop size of the speed models"),
    repeats=(10, "interleaved timing rounds"),
    profile_runs=(5, "profiled calls per model"),
    acc_size=(64, "crop size of the accuracy models"),
    acc_steps=(80, "training steps of the accuracy models (0: skip the accuracy part)"),
    acc_archs=(None, str, "architectures whose accuracy is measured (None: archs)"),
    acc_variants=("u8s8", "quantization settings whose accuracy is measured (u8s8: the default setting)"),
)


def _arch_kwargs(arch: str, size: int, trained: bool) -> Dict[str, Any]:
    """Every zoo factory takes ``input_size``; the trained Lite0 starts from its ImageNet weights (the
    demo default), the speed models keep random weights."""
    return dict(ARCH_KW.get(arch, {}) if trained else {}, input_size=[size, size])


def build(work: str, arch: str, size: int, variants: List[str], threads: int, trained_steps: int = 0
          ) -> Dict[str, Dict[str, str]]:
    """{flavour: {"fp32": path, variant: path}} for ``arch`` at ``size`` px crops.

    ``trained_steps`` 0: untrained weights and a small calibration set (speed only); > 0: trained on
    toy images, calibrated on 256 train images, each INT8 model's thresholds measured on val."""
    import torch

    from nexedge.card import ModelCard, load_card
    from nexedge.export.int8 import run_calibration
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.toy import CLASSES, train_toy_checkpoint, write_toy_dataset
    from nexedge.models import create_model
    from nexedge.models.checkpoint import save_checkpoint

    folder = os.path.join(work, f"{arch}-{size}" + ("-trained" if trained_steps else ""))
    os.makedirs(folder, exist_ok=True)
    resize = int(round(size * 255 / 224)) if not trained_steps else size + size // 8
    inp = {"color": "gray", "resize": [resize, resize], "crop": [size, size], "crop_mode": "ten"}
    ckpt = os.path.join(folder, f"{arch}.pt")
    torch.manual_seed(0)
    kw = _arch_kwargs(arch, size, bool(trained_steps))
    if not os.path.exists(ckpt):
        if trained_steps:
            train_toy_checkpoint(ckpt, arch=arch, inp=inp, steps=trained_steps, arch_kwargs=kw)
        else:
            card = ModelCard.new(CLASSES, resize=(resize, resize), crop=(size, size), crop_mode="ten", color="gray")
            model = create_model(arch, len(CLASSES), **kw).eval()
            save_checkpoint(ckpt, model, arch, CLASSES, "good", arch_kwargs=kw, card=card)
    splits = {"train": 300, "val": 300, "test": 600} if trained_steps else {"train": 16}
    data = os.path.join(folder, "data")
    if not os.path.isdir(data):
        write_toy_dataset(data, load_card(ckpt).input, splits)
    out: Dict[str, Dict[str, str]] = {}
    for flavour in FLAVOURS:
        fp32 = os.path.join(folder, f"{arch}.{flavour}.onnx")
        if not os.path.exists(fp32):
            export_onnx(ckpt, out=fp32, crops=flavour, parity_images=2, threads=threads, max_batch=16,
                        data=data if trained_steps else None)
        out[flavour] = {"fp32": fp32}
        for v in variants:
            vdir = os.path.join(folder, v)
            path = os.path.join(vdir, f"{arch}.{flavour}.int8-ort.onnx")
            if not os.path.exists(path):
                print(f"  quantizing {arch} {flavour} {v}", flush=True)
                run_calibration(fp32, data, n_images=256 if trained_steps else 8, targets=("ort",),
                                eval_split="test" if trained_steps else None,
                                out_root=os.path.join(vdir, "calibrate"), out_dir=vdir, threads=threads,
                                ort=VARIANTS[v], force=True, rebuild=True)
            out[flavour][v] = path
    return out


def open_ten(path: str, threads: int) -> Any:
    from nexedge.card import load_card
    from nexedge.runtime import open_backend

    kw = {"intra_threads": threads, "inter_threads": 1}
    if load_card(path).graph.get("crops", "host") == "host":
        kw["crop_mode"] = "ten"
    return open_backend(path, **kw)


def speed(models: Dict[str, Dict[str, Dict[str, str]]], threads: int, repeats: int) -> Dict[Tuple[str, str, str], List[float]]:
    """Median-ready times of one image TenCrop (batch 10) per (arch, flavour, model), interleaved."""
    backends = {(a, f, v): open_ten(p, threads) for a, per in models.items() for f, vs in per.items()
                for v, p in vs.items()}
    x = {}
    for key, be in backends.items():
        H, W, C = be.input_shape
        x[key] = np.random.default_rng(0).integers(0, 256, (1, H, W, C), dtype=np.uint8)
        be.infer(x[key])
        be.infer(x[key])
    times: Dict[Tuple[str, str, str], List[float]] = collections.defaultdict(list)
    for _ in range(repeats):
        for key, be in backends.items():
            t0 = time.perf_counter()
            be.infer(x[key])
            times[key].append(time.perf_counter() - t0)
    for be in backends.values():
        be.close()
    return dict(times)


def optimized_ops(path: str, threads: int, work: str) -> Dict[str, int]:
    """Op-type counts of the graph ORT actually runs (after its optimizer at ORT_ENABLE_ALL)."""
    import onnx
    import onnxruntime as ort

    from nexedge.runtime.backends.onnxruntime import session_options

    so = session_options(threads)
    out = os.path.join(work, os.path.basename(path) + ".opt.onnx")
    so.optimized_model_filepath = out
    ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    return dict(collections.Counter(n.op_type for n in onnx.load(out).graph.node))


def profile(path: str, threads: int, runs: int, work: str) -> Dict[str, Any]:
    """ORT per-node profile of ``runs`` batch-10 calls: microseconds per op type per call."""
    import onnxruntime as ort

    from nexedge.card import load_card
    from nexedge.runtime.backends.onnxruntime import session_options

    card = load_card(path)
    so = session_options(threads)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(work, "prof")
    sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    h, w = card.input["crop"]
    x = np.random.default_rng(0).standard_normal((10, 3, h, w)).astype(np.float32)
    name = sess.get_inputs()[0].name
    for _ in range(2):
        sess.run(None, {name: x})
    t0 = time.perf_counter()
    for _ in range(runs):
        sess.run(None, {name: x})
    wall = (time.perf_counter() - t0) / runs
    prof = sess.end_profiling()
    with open(prof, encoding="utf-8") as f:
        events = json.load(f)
    os.unlink(prof)
    by_op: Dict[str, float] = collections.defaultdict(float)
    model_us = 0.0
    for ev in events:
        if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
            by_op[ev["args"].get("op_name", "?")] += float(ev["dur"])
        elif ev.get("cat") == "Session" and ev.get("name") == "model_run":
            model_us += float(ev["dur"])
    calls = runs + 2
    return {"wall_ms": 1000 * wall, "by_op_ms": {k: v / calls / 1000 for k, v in by_op.items()},
            "model_run_ms": model_us / calls / 1000}


def limit_analysis(models: Dict[str, Dict[str, Dict[str, str]]], threads: int, runs: int, work: str
                   ) -> Dict[str, Any]:
    """Per arch: optimized-graph op counts and per-op-type time, fp32 vs default INT8 (host flavour),
    with the GEMM peaks of this run and the speed-up ceiling they imply."""
    from nexedge.bench import gemm

    peaks = gemm.measure_peaks(1024, threads, seconds=1.0)
    out: Dict[str, Any] = {"peaks": peaks, "archs": {}}
    for arch, per in models.items():
        fp32, int8 = per["host"]["fp32"], per["host"].get("u8s8")
        if int8 is None:
            continue
        flops = gemm.model_flops(fp32, batch=10)["flops"]
        p32, p8 = profile(fp32, threads, runs, work), profile(int8, threads, runs, work)
        o32, o8 = optimized_ops(fp32, threads, work), optimized_ops(int8, threads, work)
        t8 = sum(p8["by_op_ms"].values())
        t8_int = sum(v for k, v in p8["by_op_ms"].items() if k in INT8_OPS)
        t8_qdq = sum(v for k, v in p8["by_op_ms"].items() if k in QDQ_OPS)
        t8_layout = sum(v for k, v in p8["by_op_ms"].items() if k in LAYOUT_OPS)
        t8_conv = p8["by_op_ms"].get("QLinearConv", 0.0)
        t32 = sum(p32["by_op_ms"].values())
        t32_conv = sum(v for k, v in p32["by_op_ms"].items() if k in ("Conv", "FusedConv", "NchwcConv"))
        other8 = t8 - t8_int
        ceil_t8 = flops / (peaks["int8_peak"] * 1e9) * 1000 + other8
        out["archs"][arch] = {
            "gflop_batch10": flops / 1e9, "fp32": p32, "int8": p8, "ops_fp32": o32, "ops_int8": o8,
            "kernel_ms_fp32": t32, "kernel_ms_int8": t8, "int8_kernel_ms": t8_int, "qdq_ms": t8_qdq,
            "layout_ms": t8_layout, "float_ms_in_int8": other8,
            "int8_fraction": t8_int / t8 if t8 else float("nan"),
            "qlinearconv_gops": flops / (t8_conv / 1000) / 1e9 if t8_conv else float("nan"),
            "fp32_conv_gflops": flops / (t32_conv / 1000) / 1e9 if t32_conv else float("nan"),
            "ceiling_speedup": t32 / ceil_t8 if ceil_t8 else float("nan"),
        }
    return out


def accuracy(models: Dict[str, Dict[str, Dict[str, str]]]) -> List[List[Any]]:
    """Rows: arch, flavour, model, AUC, escapes and overkill at the deployed (TPR 100 %) threshold on test."""
    from nexedge.card import load_card

    rows = []
    for arch, per in models.items():
        for flavour, vs in per.items():
            fp32_done = False
            for v, path in vs.items():
                if v == "fp32":
                    continue
                rep = (load_card(path).data.get("metrics") or {}).get("int8_vs_fp32") or {}
                dep = next((d for d in rep.get("deployed", []) if abs(d["target_tpr"] - 1.0) < 1e-9), None)
                if not rep or dep is None:
                    continue
                if not fp32_done:
                    rows.append([arch, flavour, "fp32", f"{rep['auc_fp32']:.4f}", dep["escapes_fp32"],
                                 dep["overkill_fp32"], rep["n_defects"], rep["n_good"]])
                    fp32_done = True
                rows.append([arch, flavour, v, f"{rep['auc_int8']:.4f}", dep["escapes_int8"], dep["overkill_int8"],
                             rep["n_defects"], rep["n_good"]])
    return rows


def render(sp: Dict[Tuple[str, str, str], List[float]], lim: Dict[str, Any], acc: List[List[Any]], e: Dict[str, Any],
           args: argparse.Namespace, command: str, markdown: bool, load_start: Any) -> str:
    from nexedge.export.quantize import ort_label

    med = {k: float(np.median(v)) for k, v in sp.items()}
    best = {k: float(np.min(v)) for k, v in sp.items()}
    out = []
    if markdown:
        out += ["## INT8 on a CPU without VNNI: what limits the speed-up", ""]
    out += [f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: {benv.one_line(e)}; CPU SIMD: {cpu_flags()}; load average at start {load_start}",
            f"- command: `{command}`",
            f"- speed: {args.size} px crops, batch 10 = one image TenCrop, untrained weights, {args.threads or 'all'} "
            f"ORT threads, median / best of {args.repeats} interleaved rounds; variants: "
            + "; ".join(f"{v} = {ort_label(VARIANTS[v])}" for v in args.variants), ""]
    rows = []
    for (a, f, v), m in med.items():
        base = (a, f, "fp32")
        rows.append([a, f, v, f"{1000 * m:.1f}", f"{1000 * best[(a, f, v)]:.1f}",
                     "-" if v == "fp32" else f"{med[base] / m:.2f} / {best[base] / best[(a, f, v)]:.2f}"])
    out.append(report.table(["arch", "flavour", "model", "median ms", "best ms", "speed-up vs fp32 (median / best)"],
                            rows, markdown=markdown))
    pk = lim.get("peaks") or {}
    if lim.get("archs"):
        out += ["", f"Profile (host flavour, batch 10, {args.profile_runs} calls, ORT per-node profiler; GEMM peaks "
                f"measured in this run: fp32 {pk.get('fp32_peak', float('nan')):.1f} GFLOP/s, INT8 u8s8 "
                f"{pk.get('int8_peak', float('nan')):.1f} GOP/s, ratio {pk.get('int8_peak', 0) / max(pk.get('fp32_peak', 1), 1e-9):.2f}):", ""]
        prow = []
        for a, r in lim["archs"].items():
            o8 = r["ops_int8"]
            prow.append([a, f"{r['gflop_batch10']:.1f}", f"{r['kernel_ms_fp32']:.1f}", f"{r['kernel_ms_int8']:.1f}",
                         f"{100 * r['int8_fraction']:.0f}%", f"{r['qdq_ms']:.1f}", f"{r['layout_ms']:.1f}",
                         f"{r['float_ms_in_int8']:.1f}", f"{r['fp32_conv_gflops']:.0f}", f"{r['qlinearconv_gops']:.0f}",
                         f"{r['ceiling_speedup']:.2f}",
                         ", ".join(f"{k} {o8[k]}" for k in sorted(o8, key=lambda k: -o8[k])[:8])])
        out.append(report.table(["arch", "GFLOP", "fp32 kernel ms", "int8 kernel ms", "in int8 kernels",
                                 "Q/DQ ms", "Transpose/Reshape ms", "float ms in int8 model", "fp32 Conv GFLOP/s",
                                 "QLinearConv GOP/s", "ceiling x", "int8 graph after ORT optimizer (top ops)"],
                                prow, markdown=markdown))
        out += ["", "Time per op type in the INT8 model (ms per batch-10 call):", ""]
        trow = []
        for a, r in lim["archs"].items():
            ops = sorted(r["int8"]["by_op_ms"].items(), key=lambda kv: -kv[1])
            trow.append([a, ", ".join(f"{k} {v:.1f}" for k, v in ops[:8])])
        out.append(report.table(["arch", "INT8 op types by time"], trow, markdown=markdown))
        out += ["", "ceiling x = fp32 kernel time / (model GOP at the INT8 GEMM peak + the INT8 model's non-int8 "
                "kernel time): the speed-up if every int8 kernel ran at the measured INT8 GEMM peak."]
    out += ["", "Findings:", ""] + [f"- {line}" for line in findings(med, lim)]
    if acc:
        out += ["", f"Accuracy: each arch trained {args.acc_steps} steps on generated images at {args.acc_size} px "
                "crops (not Nexperia data), calibrated on 256 train images per setting, thresholds measured on 300 "
                "val images on each artifact, evaluated on 600 test images at its own TPR 100 % threshold:", ""]
        out.append(report.table(["arch", "flavour", "model", "AUC", "escapes", "overkill", "defects", "good"], acc,
                                markdown=markdown))
    return "\n".join(out) + "\n"


def findings(med: Dict[Tuple[str, str, str], float], lim: Dict[str, Any]) -> List[str]:
    """The measured limit in words: speed-ups, the GEMM peak ratio, where the INT8 time goes."""
    out = []
    pk = lim.get("peaks") or {}
    peak_ratio = (pk.get("int8_peak") or 0) / max(pk.get("fp32_peak") or 1e-9, 1e-9)
    for a in sorted({k[0] for k in med}):
        for f in FLAVOURS:
            base = med.get((a, f, "fp32"))
            vs = {k[2]: base / v for k, v in med.items() if k[0] == a and k[1] == f and k[2] != "fp32" and base}
            if not vs:
                continue
            best = max(vs, key=lambda v: vs[v])
            out.append(f"{a} {f}: default u8s8 {vs.get('u8s8', float('nan')):.2f}x fp32 at batch 10; fastest "
                       f"setting {best} {vs[best]:.2f}x" + ("" if a != "resnet18" else
                                                           " (target >= 2.5x: " + ("met" if vs[best] >= 2.5 else
                                                                                   "not met") + ")"))
    for a, r in (lim.get("archs") or {}).items():
        out.append(f"{a}: {100 * r['int8_fraction']:.0f}% of the INT8 model's kernel time is in int8 kernels; "
                   f"QLinearConv runs at {r['qlinearconv_gops']:.0f} GOP/s = "
                   f"{100 * r['qlinearconv_gops'] / max(pk.get('int8_peak') or 1e-9, 1e-9):.0f}% of the INT8 GEMM "
                   f"peak, fp32 Conv at {r['fp32_conv_gflops']:.0f} GFLOP/s = "
                   f"{100 * r['fp32_conv_gflops'] / max(pk.get('fp32_peak') or 1e-9, 1e-9):.0f}% of the fp32 peak; "
                   f"Q/DQ {r['qdq_ms']:.1f} ms and Transpose/Reshape {r['layout_ms']:.1f} ms of "
                   f"{r['kernel_ms_int8']:.1f} ms; ceiling {r['ceiling_speedup']:.2f}x.")
    out.append(f"The INT8 GEMM peak of this CPU is {peak_ratio:.2f}x its fp32 peak (same run, same threads): "
               "without VNNI (no vpdpbusd int8 dot product) ORT's U8S8 kernels go through AVX2 vpmaddubsw / "
               "vpmaddwd / vpaddd sequences, so convolutions even at the full INT8 peak cannot run 2.5x faster than "
               "fp32 convolutions that already run near the fp32 peak; the ceiling column puts a number on it.")
    return out


def cpu_flags() -> str:
    from importlib import util

    spec = util.spec_from_file_location("bb", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                           "bench_backends.py"))
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.cpu_int8_flags()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE, threads=None)
    args = common.parse(p, RECIPE, argv)
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants + args.acc_variants.split(",") if v and v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; expected some of {', '.join(VARIANTS)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    threads = args.threads or default_threads()
    archs = [a for a in args.archs.split(",") if a]
    command = "python benchmarks/bench_int8.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_start = benv.load_average()
    work = common.work_dir("int8")
    t0 = time.time()
    explore = set(args.explore_archs.split(","))
    speed_models = {a: build(work, a, args.size, args.variants if a in explore else ["u8s8"], threads)
                    for a in archs}
    print(f"speed models built in {time.time() - t0:.0f} s", flush=True)
    sp = speed(speed_models, threads, args.repeats)
    lim = limit_analysis(speed_models, threads, args.profile_runs, work)
    acc: List[List[Any]] = []
    if args.acc_steps:
        acc_variants = [v for v in args.acc_variants.split(",") if v]
        acc_models = {a: build(work, a, args.acc_size, acc_variants, threads, trained_steps=args.acc_steps)
                      for a in (args.acc_archs.split(",") if args.acc_archs else archs) if a}
        acc = accuracy(acc_models)
    e = benv.capture(threads)
    print(render(sp, lim, acc, e, args, command, markdown=False, load_start=load_start))
    if args.markdown:
        report.write_markdown(args.markdown, render(sp, lim, acc, e, args, command, markdown=True, load_start=load_start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
