#!/usr/bin/env python3
"""Daemon end to end over loopback vs the bare backend, and latency at 50 % / 100 % of capacity.

One run, side by side:
1. bare backend: ``backend.infer`` on prepared images at the recipe's ``max_batch`` -> images/s;
2. the daemon (a real ``nexedge-daemon`` process) fed by simulated cameras (native
   protocol, PNG frames larger than the model input, so decode + resize are real)
   as fast as they are answered -> inferred images/s; ratio to (1);
3. open-loop camera load at 50 % and 100 % of the capacity measured in (2):
   client round-trip p50/p95/p99 and RECHECKs;
4. where the daemon's time went (its own stage histograms, scraped over HTTP).

Without ``--model`` it trains a small toy model (ResNet18 by default, TenCrop, host
crops), exports it to ONNX and calibrates an ONNX Runtime INT8 (U8S8 Q/DQ) copy
(``--set precision=fp32`` skips that).

    python benchmarks/bench_daemon.py --markdown benchmarks/results/daemon.md
    python benchmarks/bench_daemon.py --model runs/x/best.ten.int8-ort.onnx --set seconds=20
"""

import argparse
import datetime as _dt
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks import _common as common  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    arch=("resnet18", "arch of the toy model when --model is not given"),
    size=(72, "toy model resize (crop = size - 8)"),
    crop_mode=("ten", ("center", "five", "ten"), "toy model crops"),
    precision=("int8", ("int8", "fp32"), "toy model: ONNX Runtime INT8 (U8S8 Q/DQ, calibrated here) or fp32"),
    max_batch=(8, "daemon max_batch and bare-backend batch"),
    cameras=(2, "simulated cameras"),
    seconds=(15.0, "seconds per measured phase"),
    frame_size=(0, "camera frame side in px (0: 1.5 x model resize)"),
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE, threads=2, threads_help="ONNX Runtime intra-op threads")
    common.add_model(p, ".onnx model with its card (default: build the recipe's toy model)")
    return common.parse(p, RECIPE, argv)


# -- model ----------------------------------------------------------------------
def build_model(args: argparse.Namespace, work: str) -> Tuple[str, str]:
    """Toy checkpoint -> host-crop ONNX (-> INT8). Returns (path, description)."""
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.toy import train_toy_checkpoint

    inp = {"color": "gray", "resize": [args.size, args.size], "crop": [args.size - 8, args.size - 8],
           "crop_mode": args.crop_mode}
    print(f"building a toy {args.arch} ({args.size} px, {args.crop_mode} crops) ...", flush=True)
    ck = train_toy_checkpoint(os.path.join(work, "toy.pt"), arch=args.arch, inp=inp, steps=20, n_val=60)
    onnx = export_onnx(ck, os.path.join(work, "toy.onnx"), crops="host", max_batch=64).path
    desc = f"toy {args.arch}, {args.size} px gray, {args.crop_mode} crops on the host, ONNX Runtime fp32"
    if args.precision == "fp32":
        return onnx, desc
    try:
        from nexedge.export.int8 import run_calibration
        from nexedge.export.toy import write_toy_dataset
    except ImportError as e:
        print(f"INT8 calibration stage not installed ({e}); using fp32", flush=True)
        return onnx, desc + " (INT8 requested but the calibration stage is not installed)"
    data = write_toy_dataset(os.path.join(work, "data"), inp, {"train": 64, "val": 32, "test": 8})
    res = run_calibration(onnx, data, name="bench", n_images=64, targets=("ort",), out_root=os.path.join(work, "cal"))
    return res.outputs["ort"], desc.replace("fp32", "INT8 (Q/DQ, calibrated on 64 toy images)")


# -- phases ---------------------------------------------------------------------
def bare_backend(model: str, batch: int, threads: int, seconds: float, images: List[np.ndarray]) -> Dict[str, float]:
    from nexedge import preprocess as pp
    from nexedge.runtime import open_backend

    with open_backend(model, intra_threads=threads) as b:
        prepared = np.stack([pp.prepare(images[i % len(images)], b.card.input) for i in range(batch)])
        b.warmup(2)
        b.infer(prepared)
        n, t0 = 0, time.perf_counter()
        lat = []
        while time.perf_counter() - t0 < seconds:
            t = time.perf_counter()
            b.infer(prepared)
            lat.append(time.perf_counter() - t)
            n += batch
        dt = time.perf_counter() - t0
    return {"images_per_s": n / dt, "batch_ms_p50": 1000 * float(np.median(lat)), "batches": len(lat)}


def start_daemon(model: str, args: argparse.Namespace, work: str) -> Tuple[subprocess.Popen, Dict[str, Any]]:
    import yaml

    cfg = {
        "model": {"path": model, "warmup": 3, "options": {"intra_threads": args.threads}},
        "sockets": {"frames": "tcp://127.0.0.1:*", "verdicts": "tcp://127.0.0.1:*", "decode_workers": 1},
        "batching": {"max_batch": args.max_batch, "max_delay_ms": 5, "max_queue": max(64, 8 * args.max_batch),
                     "deadline_ms": 5000},
        "uncertain": {"band": 1.0, "audit_fraction": 0.0},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "logging": {"level": "INFO", "format": "json"},
    }
    path = os.path.join(work, "line.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    cmd = [sys.executable, "-c", "import sys; from nexedge.serve.daemon import main; sys.exit(main())", "--config", path]
    log = open(os.path.join(work, "daemon.log"), "w+")
    proc = subprocess.Popen(cmd, stderr=log, stdout=log, cwd=ROOT)
    end = time.monotonic() + 180
    while time.monotonic() < end:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError("daemon exited before ready:\n" + log.read()[-3000:])
        log.seek(0)
        for line in log.read().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "ready":
                return proc, rec
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("daemon not ready within 180 s")


def scrape(port: int) -> Dict[Tuple[str, Tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def stage_table(before: Dict, after: Dict) -> List[Tuple[str, float, float]]:
    """(stage, mean ms per observation, count) from histogram deltas."""
    rows = []
    names = [("nexedge_stage_seconds", ("stage", s)) for s in
             ("decode", "backend_preprocess", "backend_inference", "backend_postprocess", "decide")]
    names += [("nexedge_queue_wait_seconds", None), ("nexedge_inference_seconds", None),
              ("nexedge_end_to_end_seconds", None)]
    for base, label in names:
        lab = (label,) if label else ()
        s = after.get((base + "_sum", lab), 0.0) - before.get((base + "_sum", lab), 0.0)
        c = after.get((base + "_count", lab), 0.0) - before.get((base + "_count", lab), 0.0)
        if c:
            rows.append((label[1] if label else base.replace("nexedge_", "").replace("_seconds", ""), 1000 * s / c, c))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from nexedge.bench.env import capture
    from nexedge.serve.camerasim import SimImage, run_sim

    work = tempfile.mkdtemp(prefix="bench-daemon-")
    if args.model:
        model, desc = os.path.abspath(args.model), f"given model {os.path.basename(args.model)}"
    else:
        model, desc = build_model(args, work)
    import cv2

    from nexedge.card import load_card

    card = load_card(model)
    side = args.frame_size or int(round(1.5 * card.input["resize"][0]))
    rng = np.random.default_rng(0)
    frames = []
    for i in range(16):  # textured frames, some with a blob, PNG as a camera would send
        img = cv2.GaussianBlur(rng.integers(0, 256, (side, side), dtype=np.uint8), (5, 5), 0)
        if i % 3 == 0:
            cv2.circle(img, (side // 3, side // 2), side // 8, 255, -1)
        frames.append(img)
    sims = [SimImage(f"f{i}.png", cv2.imencode(".png", f)[1].tobytes(), f, b"") for i, f in enumerate(frames)]

    print(f"model: {desc}; frames {side}x{side} PNG; batch {args.max_batch}; {args.threads} ORT threads", flush=True)
    bare0 = bare_backend(model, args.max_batch, args.threads, args.seconds, frames)
    print(f"bare backend: {bare0['images_per_s']:.1f} images/s at batch {args.max_batch}", flush=True)

    proc, ready = start_daemon(model, args, work)
    endpoint, port = ready["endpoints"]["frames"], ready["metrics_port"]
    results: Dict[str, Any] = {}
    try:
        # enough frames in flight to keep one batch in inference and the next one full
        window = max(1, -(-2 * args.max_batch // args.cameras))
        run_sim(endpoint, sims, cameras=args.cameras, rate=0, duration=2.0, window=window)  # warm the path
        m0 = scrape(port)
        sat = run_sim(endpoint, sims, cameras=args.cameras, rate=0, duration=args.seconds, window=window).summary()
        m1 = scrape(port)
        cap = sat["inferred_fps"]
        print(f"daemon saturated: {cap:.1f} inferred images/s ({sat['decisions']})", flush=True)
        results["saturation"] = sat
        results["stages"] = stage_table(m0, m1)
        nb = m1.get(("nexedge_batch_size_count", ()), 0) - m0.get(("nexedge_batch_size_count", ()), 0)
        ni = m1.get(("nexedge_batch_size_sum", ()), 0) - m0.get(("nexedge_batch_size_sum", ()), 0)
        results["mean_batch"] = ni / nb if nb else 0.0
        for frac in (0.5, 1.0):
            rate = frac * cap / args.cameras
            s = run_sim(endpoint, sims, cameras=args.cameras, rate=rate, duration=args.seconds, window=100000).summary()
            results[f"load_{int(frac * 100)}"] = dict(s, offered_fps=round(frac * cap, 2))
            print(f"{int(frac * 100)}% load ({frac * cap:.1f}/s offered): {s['latency_ms']} {s['decisions']}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    # the CPU is shared: measure the bare backend again after the daemon stopped and use the mean of both
    bare1 = bare_backend(model, args.max_batch, args.threads, args.seconds, frames)
    print(f"bare backend again: {bare1['images_per_s']:.1f} images/s", flush=True)
    bare = {"images_per_s": (bare0["images_per_s"] + bare1["images_per_s"]) / 2,
            "before": bare0["images_per_s"], "after": bare1["images_per_s"],
            "batch_ms_p50": (bare0["batch_ms_p50"] + bare1["batch_ms_p50"]) / 2}
    results.update({"bare": bare, "model": desc, "ratio": cap / bare["images_per_s"], "daemon_exit": rc})
    print(f"ratio daemon / bare = {results['ratio']:.3f}", flush=True)
    if args.markdown:
        write_markdown(args, results, capture(), argv)
        with open(common.json_path(args.markdown), "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


def write_markdown(args: argparse.Namespace, r: Dict[str, Any], env: Dict[str, Any], argv: Optional[List[str]]) -> None:
    cmd = "python benchmarks/bench_daemon.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    bare, sat = r["bare"], r["saturation"]
    lines = [
        "## daemon",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {env.get('cpu')} ({env.get('machine')}), {env.get('cores_usable')} cores usable, no GPU; "
        f"load average at start {' '.join(str(x) for x in env.get('load_average') or [])} (a shared dev box)",
        f"- command: `{cmd}`",
        f"- model: {r['model']}; daemon max_batch {args.max_batch}, max_delay 5 ms, {args.threads} ORT threads, "
        f"1 decode worker; {args.cameras} simulated cameras (native protocol, PNG frames) in the benchmark process, "
        "daemon in its own process, all on the same CPU",
        "",
        "| | images/s | notes |",
        "|---|---:|---|",
        f"| bare backend, batch {args.max_batch} | {bare['images_per_s']:.1f} | mean of {bare['before']:.1f} before "
        f"and {bare['after']:.1f} after the daemon phases; median batch {bare['batch_ms_p50']:.1f} ms |",
        f"| daemon end to end (saturated) | {sat['inferred_fps']:.1f} | {sat['received']} verdicts in "
        f"{sat['elapsed_s']:.1f} s, mean batch {r['mean_batch']:.2f}, RECHECK {sat['decisions'].get('RECHECK', 0)} |",
        f"| **ratio daemon / bare** | **{r['ratio']:.3f}** | target >= 0.9 |",
        "",
        "| load | offered/s | inferred/s | p50 ms | p95 ms | p99 ms | RECHECK |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, name in (("load_50", "50 %"), ("load_100", "100 %")):
        s = r[key]
        lat = s["latency_ms"]
        rc = ", ".join(f"{k} {v}" for k, v in s["recheck_reasons"].items()) or "0"
        lines.append(f"| {name} | {s['offered_fps']:.1f} | {s['inferred_fps']:.1f} | {lat['p50']:.1f} | "
                     f"{lat['p95']:.1f} | {lat['p99']:.1f} | {rc} |")
    lines += ["", "Where the daemon's time went at saturation (its own histograms, mean per observation):", "",
              "| stage | mean ms | observations |", "|---|---:|---:|"]
    for stage, ms, n in r["stages"]:
        lines.append(f"| {stage} | {ms:.2f} | {int(n)} |")
    lines += ["", "Latency is the camera's round trip (send to verdict) on loopback. decode is per frame "
              "(PNG decode + resize on the decode thread), the backend stages are per batch.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
    with open(args.markdown, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.markdown}")


if __name__ == "__main__":
    sys.exit(main())
