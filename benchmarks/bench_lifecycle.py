#!/usr/bin/env python3
"""Model lifecycle on a running daemon: throughput with shadow mode on vs off, and the active
model's latency during hot swaps vs steady, side by side in one run.

One real ``nexedge-daemon`` process (lifecycle.control on loopback), simulated cameras
(native protocol, PNG frames) in this process:

1. saturated throughput (inferred images/s) with no candidate, with a candidate in shadow
   mode (``shadow_fraction`` 1.0, the same architecture as the active model), and without
   again; ratio shadow on / the mean of the two off phases; frames the shadow scored and
   skipped;
2. open-loop load at the recipe's ``load`` share of the measured capacity: client round-trip p50/p95/p99
   steady, with the shadow on, and while the control endpoint swaps the active model back and
   forth (``load --as active`` then ``rollback``, each load opening and warming a model on the
   same CPU); lost frames and RECHECKs in each phase.

Without ``--model`` it builds the toy model of bench_daemon.py (fp32). The candidate is a copy
of the model with another doc string: the same compute, other bytes and model id. The toy card's operating
points are not measured on the artifact, so the daemon runs with ``decision.allow_unmeasured``.

    python benchmarks/bench_lifecycle.py --markdown benchmarks/results/lifecycle.md
"""

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

from benchmarks import _common as common  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    arch=("resnet18", "toy model arch when --model is not given"),
    size=(72, "toy model resize"),
    max_batch=(8, "daemon max_batch"),
    cameras=(2, "simulated cameras"),
    seconds=(12.0, "seconds per measured phase"),
    deadline_ms=(5000.0, "daemon batching.deadline_ms; raise it on a busy machine where a batch can take seconds"),
    load=(0.5, "open-loop load as a share of capacity"),
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE, threads=1, threads_help="ONNX Runtime intra-op threads per model")
    common.add_model(p, ".onnx model with its card (default: build the toy model of bench_daemon.py)")
    p.add_argument("--model-note", default="", help="with --model: what the model is, for the Markdown section")
    return common.parse(p, RECIPE, argv)


def build_model(args: argparse.Namespace, work: str) -> Tuple[str, str]:
    """A toy ``--arch`` checkpoint (a few steps: the weights do not matter for timing) -> host-crop
    TenCrop ONNX fp32."""
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.toy import train_toy_checkpoint

    inp = {"color": "gray", "resize": [args.size, args.size], "crop": [args.size - 8, args.size - 8],
           "crop_mode": "ten"}
    print(f"building a toy {args.arch} ({args.size} px, ten crops) ...", flush=True)
    ck = train_toy_checkpoint(os.path.join(work, "toy.pt"), arch=args.arch, inp=inp, steps=2, n_val=20)
    onnx = export_onnx(ck, os.path.join(work, "toy.onnx"), crops="host", max_batch=64).path
    return onnx, f"toy {args.arch} (2 training steps), {args.size} px gray, ten crops on the host, ONNX Runtime fp32"


def _copy_model(src: str, dst_dir: str, name: str) -> str:
    import onnx

    from nexedge.card import card_path_for, read_card

    dst = os.path.join(dst_dir, name + ".onnx")
    m = onnx.load(src)
    m.doc_string = (m.doc_string or "") + f" [{name}: same graph and weights, other bytes]"
    onnx.save(m, dst)  # other bytes (sha256) than the active model: a load --as active of the same bytes is refused
    read_card(card_path_for(src)).save_for(dst)  # stamps the new name and sha256
    return dst


def _frames(side: int) -> List[Any]:
    import cv2

    from nexedge.serve.camerasim import SimImage

    rng = np.random.default_rng(0)
    out = []
    for i in range(16):
        img = cv2.GaussianBlur(rng.integers(0, 256, (side, side), dtype=np.uint8), (5, 5), 0)
        if i % 3 == 0:
            cv2.circle(img, (side // 3, side // 2), side // 8, 255, -1)
        out.append(SimImage(f"f{i}.png", cv2.imencode(".png", img)[1].tobytes(), img, b""))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from nexedge.bench.env import capture
    from nexedge.card import load_card
    from nexedge.serve.camerasim import run_sim
    from nexedge.serve.control import ControlClient
    from tests.support.daemon_proc import DaemonProc

    env = capture()
    work = tempfile.mkdtemp(prefix="bench-lifecycle-")
    if args.model:
        model, desc = os.path.abspath(args.model), f"given model {os.path.basename(args.model)} {args.model_note}"
    else:
        model, desc = build_model(args, work)
    cand = _copy_model(model, work, "candidate")
    sims = _frames(int(round(1.5 * load_card(model).input["resize"][0])))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ctl = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    cfg = {
        "model": {"path": model, "warmup": 2, "options": {"intra_threads": args.threads}},
        "sockets": {"frames": "tcp://127.0.0.1:*", "verdicts": "tcp://127.0.0.1:*", "decode_workers": 1},
        "batching": {"max_batch": args.max_batch, "max_delay_ms": 5, "max_queue": max(64, 8 * args.max_batch),
                     "deadline_ms": args.deadline_ms},
        "decision": {"allow_unmeasured": True},
        "uncertain": {"band": 1.0, "audit_fraction": 0.0},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "lifecycle": {"control": ctl, "shadow_fraction": 1.0, "shadow_queue": 2},
    }
    d = DaemonProc(cfg).wait_ready(180)
    r: Dict[str, Any] = {"model": desc}
    window = max(1, -(-2 * args.max_batch // args.cameras))
    try:
        with ControlClient(ctl, timeout_s=300) as c:
            def sat(name: str) -> float:
                s = run_sim(d.frames, sims, cameras=args.cameras, rate=0, duration=args.seconds, window=window).summary()
                r[name] = s
                print(f"{name}: {s['inferred_fps']:.1f} inferred/s {s['decisions']}", flush=True)
                return float(s["inferred_fps"])

            def ok(reply: Dict[str, Any]) -> Dict[str, Any]:
                if not reply.get("ok"):
                    raise RuntimeError(f"control request refused: {reply.get('error')}")
                return reply

            run_sim(d.frames, sims, cameras=args.cameras, rate=0, duration=2.0, window=window)  # warm the path
            off1 = sat("saturated_off_1")
            r["status_with_candidate"] = ok(c.call("load", path=cand, who="bench"))["status"]
            r["rss_two_models"] = d.status()["rss"]
            on = sat("saturated_shadow_on")
            r["shadow_report_saturated"] = ok(c.call("report"))["report"]
            ok(c.call("unload", who="bench"))
            off2 = sat("saturated_off_2")
            cap = (off1 + off2) / 2
            if not cap or not on:
                raise RuntimeError("the daemon inferred no frames in a saturated phase (every verdict RECHECK: the "
                                   "CPU is too busy for this benchmark); run it on a quieter machine")
            r["ratio_shadow"] = on / cap
            rate = args.load * cap / args.cameras
            r["offered_fps"] = args.load * cap

            def open_loop(name: str) -> Dict[str, Any]:
                s = run_sim(d.frames, sims, cameras=args.cameras, rate=rate, duration=args.seconds,
                            window=100000).summary()
                r[name] = s
                print(f"{name}: p50/p95/p99 {s['latency_ms']} {s['decisions']} lost {s['lost']}", flush=True)
                return s

            open_loop("load_steady")
            ok(c.call("load", path=cand, who="bench"))
            open_loop("load_shadow_on")
            r["shadow_report_load"] = ok(c.call("report"))["report"]
            ok(c.call("unload", who="bench"))
            swaps: List[float] = []
            stop = threading.Event()

            def swapper() -> None:
                while not stop.is_set():
                    t = time.monotonic()
                    ok(c.call("load", path=cand, **{"as": "active", "who": "bench"}))
                    swaps.append(time.monotonic() - t)
                    time.sleep(0.5)
                    if stop.is_set():
                        ok(c.call("rollback", who="bench"))
                        break
                    t = time.monotonic()
                    ok(c.call("rollback", who="bench"))
                    swaps.append(time.monotonic() - t)
                    time.sleep(0.5)

            th = threading.Thread(target=swapper)
            th.start()
            try:
                open_loop("load_during_swaps")
            finally:
                stop.set()
                th.join(300)
            r["swaps"] = len(swaps)
            r["swap_call_s"] = {"max": max(swaps) if swaps else None,
                                "median": float(np.median(swaps)) if swaps else None}
            r["status"] = ok(c.call("status"))["status"]
    finally:
        r["daemon_exit"] = d.stop()
    r["load_average_end"] = list(os.getloadavg())
    print(f"shadow on / off throughput = {r['ratio_shadow']:.3f}; p99 steady {r['load_steady']['latency_ms']['p99']} "
          f"ms, during swaps {r['load_during_swaps']['latency_ms']['p99']} ms ({r['swaps']} swaps)", flush=True)
    if args.markdown:
        write_markdown(args, r, env, argv)
        with open(common.json_path(args.markdown), "w") as f:
            json.dump(r, f, indent=2, default=str)
    return 0


def write_markdown(args: argparse.Namespace, r: Dict[str, Any], env: Dict[str, Any], argv: Optional[List[str]]) -> None:
    cmd = "python benchmarks/bench_lifecycle.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    rep = r["shadow_report_saturated"]
    lines = [
        "## lifecycle",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {env.get('cpu')} ({env.get('machine')}), {env.get('cores_usable')} cores usable, no GPU; "
        f"load average at start {' '.join(str(x) for x in env.get('load_average') or [])}, at the end "
        f"{' '.join(f'{x:.2f}' for x in r['load_average_end'])} (a shared dev box)",
        f"- command: `{cmd}`",
        f"- model: {r['model']}; candidate: the same graph and weights with another doc string (same compute, other "
        f"bytes and model id); daemon max_batch "
        f"{args.max_batch}, deadline {args.deadline_ms:g} ms, {args.threads} ORT thread(s) per model, 1 decode worker; {args.cameras} simulated "
        "cameras (native protocol, PNG frames) in the benchmark process, the daemon in its own process, same CPU",
        "",
        "Throughput, saturated (cameras send as fast as verdicts come back):",
        "",
        "| phase | inferred images/s | RECHECK |",
        "|---|---:|---:|",
    ]
    for key, name in (("saturated_off_1", "no candidate"), ("saturated_shadow_on", "candidate in shadow mode"),
                      ("saturated_off_2", "no candidate again")):
        s = r[key]
        lines.append(f"| {name} | {s['inferred_fps']:.1f} | {s['decisions'].get('RECHECK', 0)} |")
    lines += [
        f"| **ratio shadow on / off (mean of both off phases)** | **{r['ratio_shadow']:.3f}** | |",
        "",
        f"At saturation the shadow scored {rep['frames']} frames and skipped {rep['skipped']} "
        f"(by reason, summed over cameras: {_skips(rep)}); agreement {_pct(rep['agreement'])}.",
        "",
        f"Latency of the active model at {100 * args.load:.0f} % of capacity ({r['offered_fps']:.1f} frames/s offered, "
        "open loop), client round trip:",
        "",
        "| phase | p50 ms | p95 ms | p99 ms | verdicts | lost | RECHECK |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, name in (("load_steady", "steady, no candidate"), ("load_shadow_on", "candidate in shadow mode"),
                      ("load_during_swaps", f"during {r['swaps']} hot swaps (load --as active / rollback)")):
        s = r[key]
        lat = s["latency_ms"]
        lines.append(f"| {name} | {lat['p50']:.1f} | {lat['p95']:.1f} | {lat['p99']:.1f} | {s['received']} | "
                     f"{s['lost']} | {s['decisions'].get('RECHECK', 0)} |")
    sw = r["swap_call_s"]
    took = "no swap call completed" if sw["median"] is None else f"{sw['median']:.2f} s median, {sw['max']:.2f} s at most"
    lines += ["", f"A swap call (open + warm + check + swap for a load, the swap alone for a rollback): {took}; "
              "the line kept inspecting meanwhile.", "",
              f"At {100 * args.load:.0f} % load the shadow scored {r['shadow_report_load']['frames']} frames and skipped "
              f"{r['shadow_report_load']['skipped']} ({_skips(r['shadow_report_load'])}); agreement "
              f"{_pct(r['shadow_report_load']['agreement'])}. The shadow yields to the line (`line_busy`: a full batch "
              "is waiting for the active model), so at saturation it scores little and costs little throughput; "
              "below saturation it scores most frames and its CPU shows in the active model's latency on a 2-core "
              "box.", ""]
    st = r["status_with_candidate"]
    lines += [f"Memory: the candidate added {st['candidate']['memory_bytes'] / 1048576:.1f} MiB to the daemon's RSS "
              f"when it was loaded and warmed (the file is {os.path.getsize(st['candidate']['path']) / 1048576:.1f} "
              f"MiB); the daemon's VmRSS with two models resident: {r['rss_two_models'] / 1048576:.0f} MiB.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
    with open(args.markdown, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.markdown}")


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _skips(rep: Dict[str, Any]) -> str:
    total: Dict[str, int] = {}
    for cam in rep.get("cameras", {}).values():
        for k, v in cam["skipped"].items():
            total[k] = total.get(k, 0) + v
    return ", ".join(f"{k} {v}" for k, v in sorted(total.items())) or "none"


if __name__ == "__main__":
    sys.exit(main())
