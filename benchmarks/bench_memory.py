"""Daemon memory under the attacks of issue 30 and after floods. Not a test.

Attacks (each against a fresh daemon process with frames, control, store and pull endpoints, while an
honest camera sends a frame every 100 ms):

* ``parts60``: one complete message of 60 parts x 16 MiB on the frames socket;
* ``unfinished``: two connections sending 40 parts x 16 MiB and never the last part (hand-written ZMTP);
* ``control8000``: 8,000 parts x 60 KiB on the control socket, complete; ``control_unfinished``: the same
  never finished; ``pull_unfinished``: 500 parts x 1,000 KiB to the pull socket, never finished;
* ``tiny``: 1-byte parts (libzmq keeps 64 bytes per part), up to 40 MB on the wire, never finished.

Per attack: RSS before, the peak (sampled every 20 ms), RSS after the attacker has held on for
the recipe's ``hold_s``, whether the daemon cut the attacker off, and the honest camera's frames answered. The
ceiling is checked and printed: peak - base at most ``ceiling_mib`` (memory guard defaults:
2 x max_message_bytes + 1 MiB per peer, 256 MiB over all, RSS limit ready + 512 MiB).

The older floods (``multipart``, ``pipelined``, ``mixed``: answered messages of many large parts and
large valid frames) and the allocator probes are kept (recipe ``kinds``).

    PYTHONPATH=$PWD python benchmarks/bench_memory.py [--model MODEL.onnx] [--code-roots .,/work/main]

``--code-roots`` runs the daemon from each checkout in turn (e.g. this one and main) for a
side-by-side run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional

import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _common as common  # noqa: E402
from tests.support.daemon_proc import DaemonProc  # noqa: E402
from tests.support.zmtp import RawPeer  # noqa: E402

#: Environment variable that makes this script a probe child (on, off, cameras); set by main() only.
PROBE_ENV = "NEXEDGE_BENCH_MEMORY_PROBE"

ATTACKS = ("parts60", "unfinished", "control8000", "control_unfinished", "pull_unfinished", "tiny")

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    n=(4, "messages per flood"),
    parts=(40, "parts per multipart bomb"),
    part_mib=(16, "MiB per part of a multipart bomb"),
    kinds=(",".join(ATTACKS) + ",mixed",
           "attacks (" + ", ".join(ATTACKS) + ") and floods (multipart, pipelined, mixed, single)"),
    hold_s=(15.0, "how long an attacker holds on before RSS is read"),
    ceiling_mib=(600, "peak RSS over base the attacks must stay under"),
    max_message_mib=(32, "the daemon's sockets.max_message_bytes in MiB"),
    no_probes=(False, "skip the allocator and camera-id probes"),
)


def _config(model: str, max_msg: int, store: Optional[str] = None) -> dict:
    raw = {
        "model": {"path": model, "warmup": 1, "options": {"intra_threads": 1}},
        "sockets": {"frames": "tcp://127.0.0.1:*", "verdicts": "tcp://127.0.0.1:*", "decode_workers": 1,
                    "max_message_bytes": max_msg},
        "batching": {"max_batch": 4, "max_delay_ms": 5, "max_queue": 32, "deadline_ms": 5000},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "logging": {"level": "WARNING"},
    }
    if store:
        raw.update({"store": {"path": store}, "pull": {"bind": "tcp://127.0.0.1:*"},
                    "lifecycle": {"control": "tcp://127.0.0.1:*"}})
    return raw


def _endpoints(d: DaemonProc) -> dict:
    """frames, control and pull endpoints from the daemon's ready log line."""
    for rec in d.log_records():
        if rec.get("event") == "ready":
            return dict(rec["endpoints"])
    return {}


def attack(d: DaemonProc, kind: str, hold_s: float) -> dict:
    """Run one attack against ``d``; RSS before / peak / after holding, cut off, honest replies."""
    eps = _endpoints(d)
    base = d.status()["rss"]
    peak = [base]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], d.status()["rss"])

    honest = {"sent": 0, "got": 0}

    def camera() -> None:
        import cv2

        png = cv2.imencode(".png", np.random.default_rng(1).integers(0, 256, (48, 48), np.uint8))[1].tobytes()
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(eps["frames"])
        while not stop.is_set():
            h = json.dumps({"v": 1, "camera": "line", "frame_id": honest["sent"], "encoding": "png"}).encode()
            s.send_multipart([b"", h, png])
            honest["sent"] += 1
            if s.poll(100):
                s.recv_multipart()
                honest["got"] += 1
            time.sleep(0.1)
        end = time.monotonic() + 3
        while honest["got"] < honest["sent"] and time.monotonic() < end:
            if s.poll(100):
                s.recv_multipart()
                honest["got"] += 1
        s.close()
        ctx.term()

    threads = [threading.Thread(target=watch, daemon=True), threading.Thread(target=camera, daemon=True)]
    for t in threads:
        t.start()
    peers: List[RawPeer] = []
    ctx = zmq.Context()
    try:
        if kind == "parts60":
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(eps["frames"])
            s.send_multipart([b""] + [bytes(16 << 20)] * 60)
            s.poll(int(hold_s * 1000))
            s.close()
        elif kind == "control8000":
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(eps["control"])
            s.send_multipart([b""] + [bytes(60 << 10)] * 8000)
            s.poll(int(hold_s * 1000))
            s.close()
        else:
            target, n, size, count = {"unfinished": ("frames", 2, 16 << 20, 40),
                                      "control_unfinished": ("control", 1, 60 << 10, 8000),
                                      "pull_unfinished": ("pull", 1, 1000 << 10, 500),
                                      "tiny": ("frames", 1, 1, 0)}[kind]
            peers = [RawPeer(eps[target], timeout=5.0) for _ in range(n)]
            if kind == "tiny":
                chunk = b"\x01\x01x" * 100_000
                sent = 0
                while sent < (40 << 20) and peers[0].send_raw(chunk):
                    sent += len(chunk)
            else:
                senders = [threading.Thread(target=p.send_parts, args=(bytes(size), count), daemon=True) for p in peers]
                for t in senders:
                    t.start()
                for t in senders:
                    t.join(120)
            time.sleep(hold_s)
        rss_hold = d.status()["rss"]
        cut = sum(p.closed_by_server(0.5) for p in peers) if peers else None
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for p in peers:
            p.close()
        ctx.term()
    return {"base": base, "peak": peak[0], "hwm": d.status()["hwm"], "hold": rss_hold, "cut": cut,
            "peers": len(peers), "honest": f"{honest['got']}/{honest['sent']}"}


def flood(endpoint: str, kind: str, n: int, part_mib: int, parts: int) -> int:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    big = bytes(part_mib << 20)
    rng = np.random.default_rng(0)
    got = 0
    for i in range(n):
        h = json.dumps({"v": 1, "camera": "bomb", "frame_id": i, "encoding": "raw", "dtype": "uint8",
                        "shape": [part_mib << 10, 1024]}).encode()
        if kind == "multipart":
            s.send_multipart([b"", h] + [big] * parts)
        elif kind == "mixed":  # a bomb, then valid raw frames of assorted sizes (decoded, inferred)
            s.send_multipart([b"", h] + [big] * parts)
            if s.poll(30000):
                s.recv_multipart()
                got += 1
            for j in range(8):
                side = int(rng.integers(300, 2500))
                hh = json.dumps({"v": 1, "camera": "cam", "frame_id": f"{i}-{j}", "encoding": "raw",
                                 "dtype": "uint8", "shape": [side, side]}).encode()
                s.send_multipart([b"", hh, bytes(side * side)])
                if s.poll(30000):
                    s.recv_multipart()
                    got += 1
            continue
        elif kind == "pipelined":  # all bombs at once, replies collected afterwards
            s.send_multipart([b"", h] + [big] * parts)
            continue
        else:
            s.send_multipart([b"", h, big])
        if s.poll(30000):
            s.recv_multipart()
            got += 1
    while kind == "pipelined" and got < n and s.poll(30000):
        s.recv_multipart()
        got += 1
    s.close()
    ctx.term()
    return got


def in_process(model: str, allocator: bool) -> None:
    """Daemon in this process; mixed flood of large raw frames; RSS after 2 s idle, then after an
    explicit malloc_trim(0): what malloc_trim releases was held by the allocator, the rest is held."""
    import ctypes
    import gc
    import threading

    import nexedge.serve.memory as memory
    from nexedge.serve import config as serve_config
    from nexedge.serve.daemon import Daemon
    from tests.support.daemon import base_config

    if not allocator:
        memory.AllocatorTrim.__init__.__defaults__ = (0, 1.0, False)
    d = Daemon(serve_config.from_dict(base_config(model, logging={"level": "ERROR"})))
    d._memory.libc = None  # no automatic trim after the burst: we trim by hand below
    d.setup()
    t = threading.Thread(target=d.serve)
    t.start()
    base = memory.rss_bytes()
    flood(d.endpoints["frames"], "mixed", 4, 1, 1)
    time.sleep(2)
    gc.collect()
    after = memory.rss_bytes()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = memory.rss_bytes()
    d.request_stop()
    t.join()
    print(f"in-process mixed flood, fixed mmap threshold {'on ' if allocator else 'off'}: base {base >> 20} MB, "
          f"after {after >> 20} MB, after malloc_trim {trimmed >> 20} MB")


def camera_probe(model: str) -> str:
    """RSS cost of new camera ids (monitor window 200, store on): 256 new ids (= max_cameras), then 500
    more past the bound, each one frame; in this process."""
    import gc
    import tempfile
    import threading

    import cv2

    from nexedge.serve import config as serve_config
    from nexedge.serve.daemon import Daemon
    from nexedge.serve.memory import rss_bytes
    from tests.support.daemon import base_config

    d = Daemon(serve_config.from_dict(base_config(model, logging={"level": "ERROR"}, monitor={"window": 200, "min_frames": 50},
                                       store={"path": tempfile.mkdtemp(prefix="nexedge-cam-")})))
    d.setup()
    t = threading.Thread(target=d.serve)
    t.start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(d.endpoints["frames"])
    png = cv2.imencode(".png", np.zeros((40, 40), np.uint8))[1].tobytes()

    def burst(prefix: str, n: int) -> int:
        for i in range(n):
            h = json.dumps({"v": 1, "camera": f"{prefix}{i}", "frame_id": i, "encoding": "png"}).encode()
            s.send_multipart([b"", h, png])
            s.poll(10000)
            s.recv_multipart()
        time.sleep(1.5)
        gc.collect()
        return rss_bytes()

    r0 = burst("warm", 20)
    r1 = burst("new", 256)
    r2 = burst("more", 500)
    d.request_stop()
    t.join()
    s.close(0)
    ctx.term()
    return (f"new camera ids (sockets.max_cameras 256, monitor window 200, store on): the first 256 cost "
            f"{(r1 - r0) / 2**20:+.1f} MB ({(r1 - r0) / 256 / 1024:.1f} KB each), 500 more past the bound "
            f"{(r2 - r1) / 2**20:+.1f} MB")


def _model(path: Optional[str]) -> str:
    if path:
        return os.path.abspath(path)
    import tempfile

    from tests.support.daemon import build_tiny_onnx

    return build_tiny_onnx(tempfile.mkdtemp(prefix="nexedge-mem-"))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE)
    common.add_model(p, "ONNX model with its card (default: build the tiny test model)")
    common.add_code_roots(p)
    return common.parse(p, RECIPE, argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    model = _model(args.model)
    probe = os.environ.get(PROBE_ENV)
    if probe == "cameras":
        print(camera_probe(model))
        return 0
    if probe:
        in_process(model, probe == "on")
        return 0
    rows, arows = [], []
    load0 = os.getloadavg()
    for root in [r.strip() for r in args.code_roots.split(",") if r.strip()]:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
        for kind in args.kinds.split(","):
            if kind in ATTACKS:
                store = tempfile.mkdtemp(prefix="nexedge-mem-store-")
                d = DaemonProc(_config(model, args.max_message_mib << 20, store), env=env).wait_ready()
                r = attack(d, kind, args.hold_s)
                d.stop()
                over = (r["peak"] - r["base"]) >> 20
                r.update(root=os.path.abspath(root), kind=kind, ok=over <= args.ceiling_mib)
                arows.append(r)
                print(f"{root:<20} {kind:<18} base {r['base'] >> 20} MB, peak {r['peak'] >> 20} MB (+{over}), after "
                      f"{args.hold_s:g} s {r['hold'] >> 20} MB, attacker cut off {r['cut']}/{r['peers']}, honest "
                      f"{r['honest']}, {'within' if r['ok'] else 'OVER'} the {args.ceiling_mib} MiB ceiling",
                      flush=True)
                continue
            d = DaemonProc(_config(model, args.max_message_mib << 20), env=env).wait_ready()
            base = d.status()["rss"]
            got = flood(d.frames, kind, args.n, args.part_mib, args.parts)
            time.sleep(3.0)
            st = d.status()
            d.stop()
            rows.append((os.path.abspath(root), kind, base >> 20, st["hwm"] >> 20, st["rss"] >> 20, got))
            print(f"{root:<20} {kind:<10} base {base >> 20} MB, peak {st['hwm'] >> 20} MB, after 3 s idle "
                  f"{st['rss'] >> 20} MB, replies {got}", flush=True)
    probes = []
    for mode in () if args.no_probes else ("off", "on", "cameras"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--model", model], capture_output=True,
                             text=True, env=dict(os.environ, PYTHONPATH=os.getcwd(), **{PROBE_ENV: mode}))
        line = [ln for ln in out.stdout.splitlines() if ln.startswith(("in-process", "new camera"))]
        probes.append(line[0] if line else f"probe {mode} failed: {out.stderr[-500:]}")
        print(probes[-1], flush=True)
    if args.markdown:
        md = ["## Daemon memory under attack and after floods", "",
              f"`python benchmarks/bench_memory.py --code-roots {args.code_roots}{common.sets(args)}` on "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {load0[0]:.1f} at the start "
              "(2-core AMD EPYC, shared). RSS in MB of the daemon process.", ""]
        if arows:
            md += [f"Attacks of issue 30, each on a fresh daemon (frames, control, store, pull; defaults but "
                   f"`max_message_bytes` {args.max_message_mib} MiB) while an honest camera sends a frame every "
                   f"100 ms. Peak: sampled every 20 ms. Held: after the attacker held on for {args.hold_s:g} s. "
                   f"Ceiling: peak at most {args.ceiling_mib} MiB over base.", "",
                   "| code | attack | base | peak | held | attacker cut off | honest frames answered | ceiling |",
                   "|---|---|---|---|---|---|---|---|"]
            md += [f"| `{r['root']}` | {r['kind']} | {r['base'] >> 20} | {r['peak'] >> 20} | {r['hold'] >> 20} | "
                   f"{'-' if r['cut'] is None else str(r['cut']) + '/' + str(r['peers'])} | {r['honest']} | "
                   f"{'within' if r['ok'] else 'over'} |" for r in arows]
            md.append("")
        if rows:
            md += [f"Floods: `multipart` = {args.n} messages of {args.parts} parts x {args.part_mib} MiB sent one "
                   "after the other, `pipelined` = the same sent at once, `mixed` = a bomb then 8 valid raw frames "
                   "of 0.1-6 Mpx, four times (VmHWM for the peak).", "",
                   "| code | flood | base | peak | after 3 s idle | replies |", "|---|---|---|---|---|---|"]
            md += [f"| `{r[0]}` | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} |" for r in rows]
        if probes:
            md += ["", "Allocator slack vs held memory (daemon in the probing process, mixed flood, then "
                   "`malloc_trim(0)` by hand: what it gives back was allocator slack, the rest is held; the flood "
                   "client runs in that process too, so its buffers count as well):", ""]
            md += [f"- {p}" for p in probes]
        with open(args.markdown, "w") as f:
            f.write("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
