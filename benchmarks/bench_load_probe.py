#!/usr/bin/env python3
"""What the load probe (``lifecycle.memory_limit``) costs and what it prevents, side by side in one run.

Two real ``nexedge-daemon`` processes on the same model, one without and one with
``lifecycle.memory_limit`` (every load then opened, checked and warmed in a child process first):

1. wall time of ``nexedge line load CANDIDATE`` (the recipe's ``loads`` times, the candidate unloaded in
   between): median without the probe, with it, and the ratio;
2. the candidate's peak while it is opened: in the probe, and in the daemon (VmHWM reset before
   each load);
3. the daemon's peak RSS (VmHWM) while a small ONNX that builds a ``bomb_mib`` MiB constant
   at load time is loaded: accepted or refused, and how far the daemon's peak moved.

Without ``--model`` it builds the toy model of bench_lifecycle.py (fp32); the candidate and the
bomb are copies of it (other bytes, same card).

    python benchmarks/bench_load_probe.py --markdown benchmarks/results/load_probe.md
"""

import argparse
import datetime as _dt
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from benchmarks import _common as common  # noqa: E402
from nexedge.bench import env, report  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    arch=("resnet18", "toy model arch without --model"),
    size=(72, "toy model resize"),
    loads=(5, "timed loads per daemon"),
    bomb_mib=(600, "MiB the bomb model builds"),
    headroom=("300MiB", "memory_limit above the first model's resident estimate"),
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE)
    common.add_model(p, ".onnx model with its card (default: the toy model of bench_lifecycle.py)")
    return common.parse(p, RECIPE, argv)


def _bomb(src: str, dst: str, mib: int) -> str:
    """``src`` plus ConstantOfShape(mib MiB) -> ReduceSum -> * 0 added to its logits, with a valid card."""
    import onnx
    from onnx import TensorProto, helper

    from nexedge.card import card_path_for, read_card

    m = onnx.load(src)
    g = m.graph
    out = g.output[0].name
    for node in g.node:
        node.output[:] = [o + "_raw" if o == out else o for o in node.output]
    n = mib * (1 << 20) // 4
    g.node.extend([
        helper.make_node("Constant", [], ["bomb_shape"], value=helper.make_tensor("s", TensorProto.INT64, [1], [n])),
        helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceSum", ["bomb"], ["bomb_sum"], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("Mul", ["bomb_sum", "zero"], ["bomb_zero"]),
        helper.make_node("Add", [out + "_raw", "bomb_zero"], [out]),
    ])
    onnx.save(m, dst)
    read_card(card_path_for(src)).save_for(dst)
    return dst


def _free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def run_daemon(model: str, cand: str, bomb: str, loads: int, limit: Optional[str]) -> Dict[str, Any]:
    from nexedge.serve.control import ControlClient
    from tests.support.daemon_proc import DaemonProc

    ctl = _free_endpoint()
    lc: Dict[str, Any] = {"control": ctl}
    if limit:
        lc["memory_limit"] = limit
    cfg = {"model": {"path": model, "warmup": 1, "options": {"intra_threads": 1}},
           "sockets": {"frames": "tcp://127.0.0.1:*", "verdicts": "tcp://127.0.0.1:*", "decode_workers": 1},
           "batching": {"max_batch": 8}, "decision": {"allow_unmeasured": True},
           "metrics": {"host": "127.0.0.1", "port": 0}, "lifecycle": lc}
    d = DaemonProc(cfg).wait_ready(180)
    out: Dict[str, Any] = {"limit": limit}
    try:
        with ControlClient(ctl, timeout_s=600) as c:
            times, peaks = [], []
            for _ in range(loads):
                with open(f"/proc/{d.proc.pid}/clear_refs", "w") as f:  # reset the daemon's VmHWM
                    f.write("5")
                rss0 = d.status()["rss"]
                t = time.monotonic()
                r = c.call("load", path=cand, who="bench")
                if not r.get("ok"):
                    raise RuntimeError(f"load refused: {r.get('error')}")
                times.append(time.monotonic() - t)
                peaks.append(d.status()["hwm"] - rss0)
                out["candidate_estimate"] = r["status"]["candidate"]["memory_bytes"]
                out["candidate_peak"] = r["status"]["candidate"].get("load_peak_bytes")
                c.call("unload", who="bench")
            out["load_s"], out["daemon_load_peak"] = times, peaks
            before = d.status()
            t = time.monotonic()
            r = c.call("load", path=bomb, who="bench")
            out["bomb_s"] = time.monotonic() - t
            after = d.status()
            out["bomb_ok"] = bool(r.get("ok"))
            out["bomb_error"] = r.get("error")
            out["rss_before"], out["hwm_before"], out["hwm_after"] = before["rss"], before["hwm"], after["hwm"]
    finally:
        d.stop()
    return out


def render(doc: Dict[str, Any], markdown: bool) -> str:
    parts = []
    if markdown:
        parts += ["## load_probe", "", f"Machine: {doc['machine']}  ", f"Date: {doc['date']}  ",
                  f"Command: `{doc['command']}`  ", f"Model: {doc['model']}", ""]
    a, b = doc["without"], doc["with"]
    ma, mb = statistics.median(a["load_s"]), statistics.median(b["load_s"])
    parts.append(f"Load of a candidate, median of {len(a['load_s'])}: without the probe {ma:.2f} s, with it "
                 f"({b['limit']}) {mb:.2f} s, ratio {mb / ma:.2f}. The candidate's resident estimate (the daemon's RSS "
                 f"growth): {a['candidate_estimate'] / 2**20:.0f} / {b['candidate_estimate'] / 2**20:.0f} MiB; its "
                 f"peak while it was opened and warmed, measured by the probe: {b['candidate_peak'] / 2**20:.0f} MiB; "
                 f"the daemon's own peak RSS growth during the load (median): "
                 f"{statistics.median(a['daemon_load_peak']) / 2**20:.0f} / "
                 f"{statistics.median(b['daemon_load_peak']) / 2**20:.0f} MiB (without / with the probe).")
    parts.append("")
    rows = []
    for name, r in (("no memory_limit", a), (f"memory_limit {b['limit']}", b)):
        rows.append([name, "accepted" if r["bomb_ok"] else "refused", f"{r['bomb_s']:.2f}",
                     f"{r['rss_before'] / 2**20:.0f}", f"{r['hwm_before'] / 2**20:.0f}", f"{r['hwm_after'] / 2**20:.0f}",
                     f"{(r['hwm_after'] - r['hwm_before']) / 2**20:+.0f}"])
    parts.append(report.table([f"daemon, {doc['bomb_mib']} MiB bomb", "load", "s", "RSS before MiB",
                               "peak before MiB", "peak after MiB", "peak moved MiB"], rows, markdown))
    if b.get("bomb_error"):
        parts += ["", f"Refusal: {b['bomb_error']}"]
    return "\n".join(parts) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-load-probe-")
    try:
        from bench_lifecycle import _copy_model, build_model

        from nexedge.serve.config import parse_size

        if a.model:
            model, desc = os.path.abspath(a.model), os.path.basename(a.model)
        else:
            model, desc = build_model(argparse.Namespace(arch=a.arch, size=a.size), work)
        cand = _copy_model(model, work, "candidate")
        bomb = _bomb(model, os.path.join(work, "bomb.onnx"), a.bomb_mib)
        without = run_daemon(model, cand, bomb, a.loads, None)
        limit_bytes = int(without["rss_before"]) + parse_size(a.headroom, "headroom")
        with_ = run_daemon(model, cand, bomb, a.loads, f"{limit_bytes // 2**20}MiB")
        doc = {"machine": env.one_line(env.capture()),
               "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "command": " ".join(["python", "benchmarks/bench_load_probe.py"] + (argv or sys.argv[1:])),
               "model": desc, "bomb_mib": a.bomb_mib, "without": without, "with": with_}
        report.emit(lambda md: render(doc, md), a.markdown)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
