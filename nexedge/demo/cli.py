"""``nexedge demo``: its options and its entry point (see ``nexedge/demo/__init__.py``)."""

import argparse
import datetime as _dt
import json
import os
import time
from typing import Any, Dict, List, Optional

from nexedge.cliopts import uses_globals
from nexedge.demo.context import Demo
from nexedge.demo.profiles import PROFILES, resolve_settings
from nexedge.demo.run import cpu_seconds, print_recap, print_timings, run_stages, stages
from nexedge.models import add_arch_option


def configure_demo(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run the whole product on synthetic data: generate images, train on the CPU, print the "
        "evaluation table, export to ONNX, quantize to INT8, start the line daemon, stream the test "
        "images from simulated cameras, print the verdicts and latency, and pull the uncertain samples. "
        "No arguments needed; about 410-490 CPU seconds (4-5 minutes on 2 free cores)."
    )
    p.add_argument("--out", help="run folder (default runs/demo-<UTC timestamp>)")
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test size: tiny model, ~100 images, 1 epoch (seconds; accuracy meaningless)")
    p.add_argument("--images", type=int, help="synthetic images to generate (default {})".format(
        PROFILES["default"]["images"]))
    p.add_argument("--epochs", type=int, help="training epochs (default {})".format(PROFILES["default"]["epochs"]))
    add_arch_option(p, what="architecture (default {}, ImageNet-pretrained; small_max: the earlier from-scratch "
                            "recipe on a reduced class mix; tiny for speed); one of".format(PROFILES["default"]["arch"]))
    uses_globals(p, "--threads", torch=True)
    p.add_argument("--seed", type=int, default=0, help="seed for data and training (default 0)")
    p.add_argument("--keep-daemon", action="store_true",
                   help="leave the daemon running at the end (prints its PID; default: stop it)")


def run_demo(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join("runs", f"demo-{stamp}")
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"run folder {out} exists and is not empty; give a new --out")
    os.makedirs(out, exist_ok=True)
    demo = Demo(out, settings)
    try:
        import torch
    except ImportError:
        raise RuntimeError("the demo trains a model and needs the train extra: pip install '.[train]' in the nexedge checkout") from None
    torch.set_num_threads(settings["threads"])
    from nexedge.bench.env import capture, one_line

    demo.say(f"nexedge demo ({settings['profile']}): run folder {demo.out}")
    demo.say("machine: " + one_line(capture(settings["threads"])))
    t0, c0 = time.perf_counter(), cpu_seconds()
    records: List[Dict[str, Any]] = []
    error: Optional[BaseException] = None
    try:
        run_stages(demo, stages(), records)
    except Exception as e:
        error = e
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    summary = {"settings": settings, "out": demo.out, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
               "load_average_end": list(os.getloadavg()), "stages": records,
               "results": demo.results,
               "error": None if error is None else f"{type(error).__name__}: {error}"}
    with open(demo.path("demo-summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
    print_recap(demo)
    print_timings(demo, records, wall, cpu)
    if error is not None:
        demo.say(f"\ndemo FAILED: {summary['error']}")
        demo.say(f"artifacts so far: {demo.out}")
        if isinstance(error, (ValueError, FileNotFoundError, RuntimeError)):
            raise error
        return 1
    demo.say(f"\nall artifacts under {demo.out} (summary: demo-summary.json)")
    return 0
