"""The prepared GPU check: TensorRT engines vs ONNX Runtime, for the day a GPU is at hand.

On an x86 machine with an NVIDIA GPU and TensorRT (``pip install ".[train,trt]"`` from the checkout):

    python benchmarks/gpu_check.py [--set archs=resnet18,resnet50] [--set size=136]

Work files and ``gpu_check.json`` go to ``runs/bench/gpu_check/``.

For each architecture (default: ResNet18 and the trainer's default backbone, plus
ResNet50 as the larger one) it trains a toy checkpoint for a few steps on CPU,
exports it in host-crop and in-graph TenCrop flavours, makes the TensorRT Q/DQ
INT8 model, lints every graph (``nexedge check-onnx``), builds FP16 and INT8
engines, compares each engine with the fp32 ONNX model under ONNX Runtime on fresh
images (scores in log-odds near the card's operating-point thresholds, where an absolute
probability tolerance cannot see an FP16 flush; decisions flipped at those thresholds),
and prints a latency table through ``nexedge bench``. Output format:
docs/benchmarking.md, "GPU check". Exit 0 when every engine is within tolerance,
1 otherwise; exit 0 with a "skipped:" line where TensorRT or a GPU is absent.
Budget: under 8 minutes on a current GPU box (two archs, 8 engines).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _common as common  # noqa: E402

#: What this check measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    archs=("", "comma list of architectures ('': resnet18, the trainer default, resnet50)"),
    size=(136, "resize side; crops are size*224/255"),
    steps=(20, "toy training steps per arch"),
    images=(64, "parity images"),
    max_batch=(8, "engine max batch in images"),
    bench_seconds=(2.0, "nexedge bench --duration"),
)

# Scores are compared in log-odds near the card's thresholds: TPR-100 % thresholds often lie below 1e-6,
# where an absolute probability tolerance sees nothing (an FP16 softmax flushes 5e-8 to 0: |dprob| 5e-8).
FP16_LOGIT_TOL = 0.1  # max |d logit(score)| engine vs ONNX Runtime fp32, over images near a threshold
INT8_LOGIT_TOL = 1.0
NEAR_LOGIT = 3.0  # "near a threshold": within this many log-odds of one
INT8_MAX_FLIPS = 0.05  # fraction of images whose decision flips at any operating point


def skip_reason() -> Optional[str]:
    """Why this machine cannot run the check (None when it can)."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising OSError on its libraries
        return f"TensorRT is not installed ({type(e).__name__}: {e})"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed (pip install '.[train]' from the nexedge checkout)"
    from nexedge.export import cuda_device

    try:
        cuda_device.device_info(0)
    except Exception as e:
        return f"no usable CUDA device ({e})"
    return None


def flips(a: np.ndarray, b: np.ndarray, thresholds: List[float]) -> float:
    """Largest fraction of images whose REJECT decision differs between a and b at any threshold."""
    return max((float(np.mean((a >= t) != (b >= t))) for t in thresholds), default=0.0)


def logodds_near(ref: np.ndarray, got: np.ndarray, thresholds: List[float], near: float = NEAR_LOGIT
                 ) -> Dict[str, Any]:
    """Largest |logit(got) - logit(ref)| over the images whose reference score lies within ``near``
    log-odds of a threshold, and how many of those scores the engine flushed to exactly 0 or 1."""
    from nexedge.metrics import logit_exact

    lr, lg = logit_exact(ref), logit_exact(got)
    lt = logit_exact(np.asarray(thresholds, np.float64))
    mask = np.zeros(len(lr), bool)
    for t in lt:
        mask |= np.abs(lr - t) <= near
    flushed = int(np.sum(mask & ~np.isfinite(lg) & np.isfinite(lr)))
    both = mask & np.isfinite(lg) & np.isfinite(lr)
    gap = float(np.abs(lg[both] - lr[both]).max()) if both.any() else 0.0
    return {"max_dlogit_near": float("inf") if flushed else gap, "near": int(mask.sum()), "flushed": flushed}


def compare(onnx_path: str, engine_path: str, images: np.ndarray, batch: int) -> Dict[str, Any]:
    from nexedge.card import load_card
    from nexedge.runtime import open_backend

    card = load_card(onnx_path)
    thresholds = [float(op["threshold"]) for op in card.operating_points]
    pa, pb, sa, sb = [], [], [], []
    with open_backend(onnx_path) as a, open_backend(engine_path) as b:
        for i in range(0, len(images), batch):
            ra, rb = a.infer(images[i : i + batch]), b.infer(images[i : i + batch])
            pa.append(ra.probs)
            pb.append(rb.probs)
            sa.append(ra.defect_score)
            sb.append(rb.defect_score)
    p_a, p_b = np.concatenate(pa), np.concatenate(pb)
    s_a, s_b = np.concatenate(sa), np.concatenate(sb)
    return dict(logodds_near(s_a, s_b, thresholds), max_dprob=float(np.abs(p_a - p_b).max()),
                flips=flips(s_a, s_b, thresholds))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE, markdown=False)
    args = common.parse(p, RECIPE, argv, removed={"--out": "the work folder is runs/bench/gpu_check/ "
                                                  "(gpu_check.json is written there)"})
    args.out = os.path.join(common.WORK_ROOT, "gpu_check")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)

    why = skip_reason()
    if why:
        print(f"gpu_check: skipped: {why}")
        return 0

    import tensorrt as trt

    from nexedge.card import load_card
    from nexedge.export import calibrate as cal
    from nexedge.export import cuda_device, trt_build, trt_rules
    from nexedge.export import onnx_check as oc
    from nexedge.export import quantize as qz
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.toy import toy_images, train_toy_checkpoint

    default_arch = _trainer_default_arch()
    archs = [a for a in (args.archs.split(",") if args.archs else ["resnet18", default_arch, "resnet50"]) if a]
    archs = list(dict.fromkeys(archs))
    crop = args.size * 224 // 255
    inp = {"color": "gray", "resize": [args.size, args.size], "crop": [crop, crop], "crop_mode": "ten"}
    common.work_dir("gpu_check")
    dev = cuda_device.device_info(0)
    print(f"gpu_check: TensorRT {trt.__version__} on {dev.name} (SM {dev.compute_capability[0]}."
          f"{dev.compute_capability[1]}, {dev.sm_count} SMs, {dev.total_mem_gib} GiB); archs {', '.join(archs)}; "
          f"input {args.size}x{args.size} gray, TenCrop {crop}x{crop}")
    t_start = time.perf_counter()
    rows, engines, ok = [], [], True
    test_imgs = toy_images(args.images, inp, seed=99)[0]
    for arch in archs:
        ckpt = train_toy_checkpoint(os.path.join(args.out, f"{arch}.pt"), arch=arch, inp=dict(inp), steps=args.steps,
                                    arch_kwargs=_arch_kwargs(arch, crop))
        for flavour in ("host", "ten"):
            fp32 = export_onnx(ckpt, crops=flavour, max_batch=args.max_batch, parity_images=4).path
            card = load_card(fp32)
            qdq = fp32.replace(".onnx", ".int8-trt.onnx")
            calib = toy_images(64, inp, seed=5)[0]
            quant = qz.quantize_model(fp32, qdq, card, cal.OrtCalibrationReader(calib, card), "tensorrt")
            qz.int8_card(card, quant, None, {"n_images": len(calib)}).save_for(qdq, parent=fp32)
            for precision, model, tol in (("fp16", fp32, FP16_LOGIT_TOL), ("int8", qdq, INT8_LOGIT_TOL)):
                lint = oc.summary(model, [oc.target_for_version(trt.__version__)])
                t0 = time.perf_counter()
                try:
                    path, _ = trt_build.build_engine(model, trt_rules.BuildOptions(precision=precision),
                                                     out_dir=os.path.join(args.out, "engines"), trt=trt, device=dev,
                                                     force=True)
                except Exception as e:  # report and go on: one failure should not hide the others
                    rows.append([arch, flavour, precision, "-", "-", "-", "-", f"BUILD FAILED: {e}".splitlines()[0]])
                    ok = False
                    continue
                build_s = time.perf_counter() - t0
                res = compare(fp32, path, test_imgs, args.max_batch)
                good = res["max_dlogit_near"] <= tol and (precision == "fp16" or res["flips"] <= INT8_MAX_FLIPS)
                ok &= good
                rows.append([arch, flavour, precision, f"{build_s:.1f}",
                             f"{res['max_dlogit_near']:.3f} ({res['near']} images, {res['flushed']} flushed)",
                             f"{res['max_dprob']:.2e}", f"{100 * res['flips']:.1f}%",
                             ("ok" if good else "OUT OF TOLERANCE")
                             + ("" if set(lint.values()) == {"ok"} else " (lint errors)")])
                engines.append(path)
    print()
    print("| arch | flavour | precision | build s | max abs d log-odds near a threshold vs ORT fp32 | "
          "max abs dprob | decision flips | result |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    for path in engines:
        print(f"## nexedge bench {os.path.basename(path)}")
        cmd = [sys.executable, "-m", "nexedge.cli", "bench", path, "--batch", f"1,{args.max_batch}",
               "--duration", str(args.bench_seconds), "--markdown"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        print(out.stdout if out.returncode == 0 else f"bench failed: {out.stderr.strip()[-500:]}")
    summary = {"ok": ok, "seconds": round(time.perf_counter() - t_start, 1), "rows": rows}
    with open(os.path.join(args.out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(f"gpu_check: {'PASS' if ok else 'FAIL'} in {summary['seconds']} s "
          f"(tolerances within {NEAR_LOGIT} log-odds of a threshold: fp16 |d log-odds| <= {FP16_LOGIT_TOL}, "
          f"int8 <= {INT8_LOGIT_TOL} and flips <= {100 * INT8_MAX_FLIPS:.0f}%; no score flushed to 0 or 1)")
    return 0 if ok else 1


def _trainer_default_arch() -> str:
    import argparse as ap

    from nexedge.train import cli as tcli

    parser = ap.ArgumentParser()
    tcli.configure_train(parser)
    return parser.get_default("arch") or "resnet18"


def _arch_kwargs(arch: str, crop: int) -> Optional[Dict[str, Any]]:
    """The zoo's STN factories need the crop size; the rest take no keyword."""
    return {"input_size": [crop, crop]} if "stn" in arch else None


if __name__ == "__main__":
    sys.exit(main())
