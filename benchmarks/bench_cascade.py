#!/usr/bin/env python3
"""Cascade TenCrop vs full TenCrop: decisions on a labelled test split, stage-2 share, and the
daemon end to end (throughput at saturation, p99 latency at a common load), side by side.

Per case (a trained checkpoint and its labelled data root ``ROOT/{train,val,test}/<class>``):

1. export a host-crop ONNX model (TenCrop, the card's crops; a checkpoint validated with center
   crops gets the in-graph TenCrop graph and its center-crop stage-1 graph instead), calibrate the
   ONNX Runtime INT8 (U8S8 Q/DQ) copies on 256 train images, measure the operating points and the
   cascade band on val with the INT8 stage 1 (``nexedge thresholds --cascade``);
2. on the test split, through the runtime: full TenCrop and the cascade plan at the deployed
   threshold (TPR 100 %): identical decisions, escapes of each, stage-2 share;
3. the daemon (a real ``nexedge-daemon`` process per plan, the same INT8 model, ``model.cascade``
   off / on) fed the test images as PNG by simulated cameras: inferred images/s at saturation,
   then client p50/p99 latency at one offered rate both sustain (80 % of full TenCrop's capacity).

    python benchmarks/bench_cascade.py --case demo=runs/demo/model/best.pt:runs/demo/data \\
        --markdown benchmarks/results/cascade.md
"""

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from benchmarks import _common as common  # noqa: E402
from nexedge.bench import env as benv  # noqa: E402
from nexedge.bench import report  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    margin=(None, float, "band margin in log-odds (None: the runtime's, 1.0)"),
    max_batch=(8, "daemon max_batch"),
    cameras=(2, "simulated cameras"),
    seconds=(20.0, "seconds per daemon phase"),
)


def prepare_models(name: str, ckpt: str, data: str, work: str, threads: int, margin: Optional[float]
                   ) -> Tuple[str, str]:
    """(fp32 ONNX, INT8 ONNX with its cascade band measured on val).

    A checkpoint whose card runs multi-crops gets the host-crop flavour (stage 1 is a center-crop view
    of the same session). One validated with center crops (the demo's) gets the in-graph TenCrop graph
    and its center-crop stage-1 graph, both calibrated, the band measured with the INT8 stage 1."""
    from nexedge.card import load_card
    from nexedge.export.int8 import run_calibration
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.thresholds import measure_artifact
    from nexedge.runtime.cascade import STAGE1_CROPS

    folder = os.path.join(work, name)
    os.makedirs(folder, exist_ok=True)
    crops = "ten" if load_card(ckpt).input["crop_mode"] == STAGE1_CROPS else "host"
    fp32 = os.path.join(folder, f"model.{crops}.onnx")
    if not os.path.exists(fp32):
        export_onnx(ckpt, out=fp32, crops=crops, parity_images=4, threads=threads, data=data, cascade=True,
                    cascade_margin=margin)

    def calibrate(onnx: str) -> str:
        int8 = onnx[: -len(".onnx")] + ".int8-ort.onnx"
        if not os.path.exists(int8):
            run_calibration(onnx, data, n_images=256, targets=("ort",), eval_split="test",
                            out_root=os.path.join(folder, "calibrate"), threads=threads, force=True, rebuild=True)
        return int8

    stage1 = calibrate(os.path.join(folder, f"model.{STAGE1_CROPS}.onnx")) if crops != "host" else None
    int8 = calibrate(fp32)
    sec = load_card(int8).data.get("cascade") or {}
    want_file = os.path.basename(stage1) if stage1 else None
    if sec.get("status") != "measured" or (sec.get("stage1") or {}).get("file") != want_file:
        measure_artifact(int8, data, "val", backend_options={"intra_threads": threads}, cascade=True, margin=margin,
                         stage1=stage1)
    return fp32, int8


def offline(model: str, data: str, threads: int, batch: int) -> Dict[str, Any]:
    """Full TenCrop vs cascade on the test split through the runtime, at the TPR 100 % threshold."""
    from nexedge import preprocess as pp
    from nexedge.card import load_card
    from nexedge.export.parity import read_image
    from nexedge.export.thresholds import split_images
    from nexedge.runtime import open_backend
    from nexedge.runtime.cascade import band_for, make_plan

    card = load_card(model)
    thr = float(card.operating_point(1.0)["threshold"])
    paths, labels = split_images(data, "test", card.classes)
    y = labels != card.good_index
    be = open_backend(model, intra_threads=threads)
    plan = make_plan(be, model, thr, "on", intra_threads=threads)
    plan.warmup(2)
    s_full, s_cas, stage = [], [], []
    t_full = t_cas = 0.0
    for i in range(0, len(paths), batch):
        x = np.stack([pp.prepare(read_image(p), card.input) for p in paths[i : i + batch]])
        t0 = time.perf_counter()
        s_full.append(be.infer(x).defect_score)
        t1 = time.perf_counter()
        r = plan.infer(x)
        t2 = time.perf_counter()
        t_full, t_cas = t_full + t1 - t0, t_cas + t2 - t1
        s_cas.append(r.defect_score)
        stage.append(r.stage)
    sf, sc, st = np.concatenate(s_full), np.concatenate(s_cas), np.concatenate(stage)
    be.close()
    df, dc = sf >= thr, sc >= thr
    band = band_for(card, thr)
    return {
        "n": int(len(paths)), "n_defects": int(y.sum()), "n_good": int((~y).sum()), "threshold": thr,
        "band": [band["lo"], band["hi"]], "val_stage2_fraction": band["stage2_fraction"],
        "val_agreement": band["agreement"], "n_val": band["n_images"],
        "agreement": float((df == dc).mean()), "n_differ": int((df != dc).sum()),
        "escapes_full": int((y & ~df).sum()), "escapes_cascade": int((y & ~dc).sum()),
        "overkill_full": int((~y & df).sum()), "overkill_cascade": int((~y & dc).sum()),
        "stage2_fraction": float((st == 2).mean()), "rechecks": int((st == 0).sum()),
        "runtime_speedup": t_full / t_cas if t_cas else float("nan"),
    }


def daemon_run(model: str, data: str, mode: str, threads: int, max_batch: int, cameras: int, seconds: float,
               rate: Optional[float]) -> Dict[str, Any]:
    """Saturation (closed loop) and, with ``rate``, an open-loop run at that total rate."""
    from nexedge.card import load_card
    from nexedge.serve.camerasim import escapes_overkill, load_images, run_sim
    from tests.support.daemon_proc import DaemonProc

    good = load_card(model).good_class
    sims = load_images(os.path.join(data, "test"))
    cfg = {
        "model": {"path": model, "warmup": 3, "options": {"intra_threads": threads}, "cascade": mode},
        "sockets": {"frames": "tcp://127.0.0.1:*", "verdicts": "tcp://127.0.0.1:*", "decode_workers": 1},
        "batching": {"max_batch": max_batch, "max_delay_ms": 5, "max_queue": max(64, 8 * max_batch),
                     "deadline_ms": 10000},
        "uncertain": {"audit_fraction": 0.0},
        "metrics": {"host": "127.0.0.1", "port": 0},
    }
    d = DaemonProc(cfg).wait_ready(300)
    out: Dict[str, Any] = {}
    try:
        window = max(1, -(-2 * max_batch // cameras))
        run_sim(d.frames, sims, cameras=cameras, rate=0, duration=2.0, window=window)
        sat = run_sim(d.frames, sims, cameras=cameras, rate=0, duration=seconds, window=window).summary()
        out["saturation"] = sat
        out["quality"] = escapes_overkill(sat["by_label"], good)
        if rate:
            out["load"] = run_sim(d.frames, sims, cameras=cameras, rate=rate / cameras, duration=seconds,
                                  window=100000).summary()
        out["plan_line"] = next((r.get("message") for r in d.log_records()
                                 if "cascade" in str(r.get("message", ""))), None)
    finally:
        out["exit"] = d.stop()
    return out


def toy_case(work: str) -> Tuple[str, str]:
    """A ResNet18 trained briefly on generated images (nexedge.export.toy), 72 px -> 64 px TenCrop, with a
    300/300/600 train/val/test data root: (checkpoint, data root)."""
    from nexedge.card import load_card
    from nexedge.export.toy import train_toy_checkpoint, write_toy_dataset

    ckpt, data = os.path.join(work, "toy-resnet18.pt"), os.path.join(work, "toy-data")
    inp = {"color": "gray", "resize": [72, 72], "crop": [64, 64], "crop_mode": "ten"}
    if not os.path.exists(ckpt):
        train_toy_checkpoint(ckpt, arch="resnet18", inp=inp, steps=80, arch_kwargs={"input_size": [64, 64]})
    if not os.path.isdir(data):
        write_toy_dataset(data, load_card(ckpt).input, {"train": 300, "val": 300, "test": 600})
    return ckpt, data


def run_case(name: str, ckpt: str, data: str, args: argparse.Namespace, work: str) -> Dict[str, Any]:
    print(f"[{name}] preparing models ...", flush=True)
    _fp32, int8 = prepare_models(name, ckpt, data, work, args.threads, args.margin)
    print(f"[{name}] offline comparison on test ...", flush=True)
    off = offline(int8, data, args.threads, args.max_batch)
    print(f"[{name}] {json.dumps(off)}", flush=True)
    full = daemon_run(int8, data, "off", args.threads, args.max_batch, args.cameras, args.seconds, None)
    rate = 0.8 * full["saturation"]["inferred_fps"]
    full["load"] = None
    cas = daemon_run(int8, data, "on", args.threads, args.max_batch, args.cameras, args.seconds, rate)
    full2 = daemon_run(int8, data, "off", args.threads, args.max_batch, args.cameras, args.seconds, rate)
    print(f"[{name}] daemon full {full['saturation']['inferred_fps']} / {full2['saturation']['inferred_fps']} "
          f"img/s, cascade {cas['saturation']['inferred_fps']} img/s", flush=True)
    return {"name": name, "checkpoint": ckpt, "data": data, "model": int8, "offline": off,
            "daemon_full": [full, full2], "daemon_cascade": cas, "rate": rate}


def render(cases: List[Dict[str, Any]], args: argparse.Namespace, e: Dict[str, Any], command: str, load0: Any,
           markdown: bool) -> str:
    out = ["## Cascade TenCrop vs full TenCrop", ""] if markdown else []
    out += [f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: {benv.one_line(e)}; load average at start {load0}",
            f"- command: `{command}`",
            f"- plan: stage 1 = center crop of the same ONNX Runtime INT8 (U8S8) model (host-crop: a view of the "
            f"same session; in-graph: its INT8 center-crop graph), stage 2 = its TenCrop on frames whose "
            f"stage-1 score lies in the card's band (measured on val, margin "
            f"{args.margin if args.margin is not None else 1.0} log-odds); threshold = the card's TPR 100 % point; "
            f"daemon max_batch {args.max_batch}, {args.threads} ORT threads, {args.cameras} simulated cameras "
            f"sending the test split as PNG, {args.seconds:.0f} s per phase; full TenCrop measured before and "
            "after the cascade (mean used for ratios)", ""]
    rows, drows = [], []
    for c in cases:
        o = c["offline"]
        rows.append([c["name"], f"{o['n']} ({o['n_defects']} defect)", f"{o['threshold']:.4g}",
                     f"[{o['band'][0]:.3g}, {o['band'][1]:.3g}]", f"{100 * o['val_agreement']:.2f} % of {o['n_val']}",
                     f"{100 * o['val_stage2_fraction']:.1f} %", f"{100 * o['agreement']:.2f} % ({o['n_differ']} differ)",
                     f"{o['escapes_full']} / {o['escapes_cascade']}", f"{o['overkill_full']} / {o['overkill_cascade']}",
                     f"{100 * o['stage2_fraction']:.1f} %", f"{o['runtime_speedup']:.2f}x"])
        f1, f2 = c["daemon_full"]
        full_fps = (f1["saturation"]["inferred_fps"] + f2["saturation"]["inferred_fps"]) / 2
        cas = c["daemon_cascade"]
        cl, fl = (cas.get("load") or {}).get("latency_ms") or {}, (f2.get("load") or {}).get("latency_ms") or {}
        drows.append([c["name"], f"{f1['saturation']['inferred_fps']:.1f} / {f2['saturation']['inferred_fps']:.1f}",
                      f"{cas['saturation']['inferred_fps']:.1f}", f"{cas['saturation']['inferred_fps'] / full_fps:.2f}x",
                      f"{c['rate']:.1f}", f"{fl.get('p50')} / {fl.get('p99')}", f"{cl.get('p50')} / {cl.get('p99')}",
                      f"{f1['quality'].get('escapes')} / {cas['quality'].get('escapes')}",
                      json.dumps(cas["saturation"]["decisions"])])
    out.append("Decisions on the test split through the runtime (full TenCrop vs cascade, same INT8 model):")
    out.append("")
    out.append(report.table(["case", "test images", "threshold", "band", "val agreement", "val stage-2",
                             "test agreement", "escapes full / cascade", "overkill full / cascade", "test stage-2",
                             "runtime speed-up"], rows, markdown=markdown))
    out += ["", "Daemon end to end (inferred images/s at saturation; client latency ms at the common offered rate):", ""]
    out.append(report.table(["case", "full TenCrop img/s (before / after)", "cascade img/s", "throughput ratio",
                             "offered img/s", "full p50 / p99 ms", "cascade p50 / p99 ms",
                             "escapes at saturation full / cascade", "cascade verdicts"], drows, markdown=markdown))
    out += ["", "Findings:", ""]
    for c in cases:
        o, cas = c["offline"], c["daemon_cascade"]
        f1, f2 = c["daemon_full"]
        full_fps = (f1["saturation"]["inferred_fps"] + f2["saturation"]["inferred_fps"]) / 2
        ratio = cas["saturation"]["inferred_fps"] / full_fps if full_fps else float("nan")
        extra = o["escapes_cascade"] - o["escapes_full"]
        out.append(f"- {c['name']}: test decisions identical to full TenCrop on {100 * o['agreement']:.2f} % of "
                   f"{o['n']} images (target >= 99.9 %: {'met' if o['agreement'] >= 0.999 else 'not met'}), "
                   f"{extra:+d} escapes vs full TenCrop (target 0 extra: {'met' if extra <= 0 else 'not met'}); "
                   f"stage 2 ran on {100 * o['stage2_fraction']:.1f} % of test frames (val predicted "
                   f"{100 * o['val_stage2_fraction']:.1f} %); daemon throughput {ratio:.2f}x full TenCrop (target >= 3x: "
                   f"{'met' if ratio >= 3 else 'not met'}). Compute-bound bound from the stage-2 share s: "
                   f"10 / (1 + 10 s) = {10 / (1 + 10 * o['stage2_fraction']):.2f}x.")
    return "\n".join(out) + "\n"


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, List[Tuple[str, str, str]]]:
    p = common.parser(__doc__, RECIPE, threads=2, threads_help="ORT intra-op threads")
    p.add_argument("--case", action="append", default=[], metavar="NAME=CKPT:DATA",
                   help="a trained checkpoint and its labelled data root (repeatable; default: a toy ResNet18 "
                        "trained here on generated images, 600 test images)")
    args = common.parse(p, RECIPE, argv)
    specs = []
    for c in args.case:
        name, _, rest = c.partition("=")
        ckpt, _, data = rest.rpartition(":")
        if not (name and ckpt and data):
            p.error(f"--case {c!r}: expected NAME=CHECKPOINT:DATA_ROOT")
        specs.append((name, os.path.abspath(ckpt), os.path.abspath(data)))
    return args, specs


def main(argv: Optional[List[str]] = None) -> int:
    args, specs = parse_args(argv)
    command = "python benchmarks/bench_cascade.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load0 = benv.load_average()
    work = common.work_dir("cascade")
    if not specs:
        specs.append(("toy-resnet18",) + toy_case(work))
    cases = [run_case(n, k, d, args, work) for n, k, d in specs]
    e = benv.capture(args.threads)
    print(render(cases, args, e, command, load0, markdown=False))
    if args.markdown:
        report.write_markdown(args.markdown, render(cases, args, e, command, load0, markdown=True))
        with open(common.json_path(args.markdown), "w") as f:
            json.dump(cases, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
