"""Progressive-JPEG scan bombs against honest cameras (issue 30 item 1), side by side. Not a test.

A daemon process (tiny test model, default sockets and batching: 2 decode threads, max_queue 64,
deadline 2 s) serves ``--cameras`` honest cameras sending a 640 x 480 JPEG each at ``--fps``, while
one more camera sends ``--bombs`` scan bombs spread over ``--seconds``: a valid progressive JPEG of
``--side`` x ``--side`` whose last scan repeats until it has ``--scans`` scans (about 50 KB). Each
checkout in ``--code-roots`` runs the same traffic. Reported per checkout: honest frames answered,
their RECHECK share by reason, p50/p99 latency of the inferred ones, and what the bombs got.

    PYTHONPATH=$PWD python benchmarks/bench_decode_attack.py --code-roots .,/path/to/main \\
        --markdown benchmarks/results/decode_attack.md
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

import cv2
import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _common as common  # noqa: E402
from tests.support.daemon_proc import DaemonProc  # noqa: E402
from tests.support.hostile import jpeg_scan_bomb  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    cameras=(4, "honest cameras"),
    fps=(20.0, "frames per second of each honest camera"),
    seconds=(60.0, "seconds the cameras send"),
    bombs=(6, "scan bombs the attacking camera sends"),
    side=(3000, "side of a bomb image in px"),
    scans=(1500, "progressive scans per bomb"),
)


def _config(model: str) -> Dict[str, Any]:
    return {
        "model": {"path": model, "warmup": 1, "options": {"intra_threads": 1}},
        "sockets": {"frames": "tcp://127.0.0.1:*", "verdicts": "tcp://127.0.0.1:*"},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "logging": {"level": "WARNING"},
    }


def run(endpoint: str, args: argparse.Namespace, bomb: bytes) -> Dict[str, Any]:
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (480, 640), dtype=np.uint8), (5, 5), 2)
    frame = cv2.imencode(".jpg", img)[1].tobytes()
    replies: List[Dict[str, Any]] = []
    lock = threading.Lock()

    def camera(name: str, payload: bytes, times: List[float]) -> None:
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        sent = 0
        t0 = time.monotonic()
        for i, at in enumerate(times):
            while time.monotonic() < t0 + at:
                if s.poll(2):
                    v = json.loads(s.recv_multipart()[-1])
                    with lock:
                        replies.append(v)
            h = json.dumps({"v": 1, "camera": name, "frame_id": i, "encoding": "jpeg"}).encode()
            s.send_multipart([b"", h, payload])
            sent += 1
        end = time.monotonic() + 30
        got = sum(1 for v in replies if v["camera"] == name)
        while got < sent and time.monotonic() < end:
            if s.poll(100):
                v = json.loads(s.recv_multipart()[-1])
                with lock:
                    replies.append(v)
                got += 1
        s.close()
        ctx.term()

    period = 1.0 / args.fps
    honest_times = [i * period for i in range(int(args.seconds * args.fps))]
    bomb_times = [args.seconds * (k + 0.5) / args.bombs for k in range(args.bombs)]
    threads = [threading.Thread(target=camera, args=(f"cam{c}", frame, honest_times)) for c in range(args.cameras)]
    threads.append(threading.Thread(target=camera, args=("bomber", bomb, bomb_times)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + 120)
    honest = [v for v in replies if v["camera"] != "bomber"]
    bombs = [v for v in replies if v["camera"] == "bomber"]
    inferred = sorted(v["latency_ms"] for v in honest if v["decision"] != "RECHECK")
    reasons: Dict[str, int] = {}
    for v in honest:
        if v["decision"] == "RECHECK":
            reasons[v["reason"]] = reasons.get(v["reason"], 0) + 1
    sent = len(honest_times) * args.cameras
    return {
        "sent": sent, "answered": len(honest), "recheck": sum(reasons.values()), "reasons": reasons,
        "p50": inferred[len(inferred) // 2] if inferred else None,
        "p99": inferred[int(len(inferred) * 0.99)] if inferred else None,
        "bombs": [f"{v['decision']} {v['reason']} {v['latency_ms']:.0f} ms" for v in bombs],
    }


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = common.parser(__doc__, RECIPE)
    common.add_model(p, "ONNX model with its card (default: build the tiny test model)")
    common.add_code_roots(p)
    return common.parse(p, RECIPE, argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.model:
        model = os.path.abspath(args.model)
    else:
        from tests.support.daemon import build_tiny_onnx

        model = build_tiny_onnx(tempfile.mkdtemp(prefix="nexedge-bomb-"))
    bomb = jpeg_scan_bomb(args.side, args.scans)
    t0 = time.monotonic()
    cv2.imdecode(np.frombuffer(bomb, np.uint8), cv2.IMREAD_UNCHANGED)
    decode_s = time.monotonic() - t0
    print(f"bomb: {len(bomb)} bytes, {args.scans} scans, {args.side}x{args.side}: decodes in {decode_s:.1f} s here")
    load0 = os.getloadavg()[0]
    rows = []
    for root in [r.strip() for r in args.code_roots.split(",") if r.strip()]:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
        d = DaemonProc(_config(model), env=env).wait_ready()
        r = run(d.frames, args, bomb)
        d.stop()
        r["root"] = os.path.abspath(root)
        rows.append(r)
        print(f"{root}: honest {r['answered']}/{r['sent']} answered, RECHECK {r['recheck']} "
              f"({100 * r['recheck'] / max(r['sent'], 1):.1f} %) {r['reasons']}, p50/p99 {r['p50']}/{r['p99']} ms; "
              f"bombs: {r['bombs']}", flush=True)
    if args.markdown:
        md = ["## Scan bombs against honest cameras", "",
              f"`python benchmarks/bench_decode_attack.py --code-roots {args.code_roots}{common.sets(args)}` on "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {load0:.1f} at the start "
              f"(2-core AMD EPYC, shared). {args.cameras} honest cameras at {args.fps:g} fps (640 x 480 JPEG) for "
              f"{args.seconds:g} s; one camera sends {args.bombs} progressive JPEGs of {args.side} x {args.side} with "
              f"{args.scans} scans ({len(bomb)} bytes; {decode_s:.1f} s to decode one here). Daemon defaults: 2 decode "
              "threads, max_queue 64, deadline 2 s. Latency: inferred honest frames, daemon side.", "",
              "| code | honest answered | honest RECHECK | by reason | p50 / p99 ms | the bombs got |",
              "|---|---|---|---|---|---|"]
        for r in rows:
            md.append(f"| `{r['root']}` | {r['answered']}/{r['sent']} | {r['recheck']} "
                      f"({100 * r['recheck'] / max(r['sent'], 1):.1f} %) | "
                      f"{', '.join(f'{k} {v}' for k, v in sorted(r['reasons'].items())) or '-'} | "
                      f"{r['p50']:.0f} / {r['p99']:.0f} | {'; '.join(r['bombs'])} |" if r["p50"] is not None else
                      f"| `{r['root']}` | {r['answered']}/{r['sent']} | {r['recheck']} | {r['reasons']} | - | "
                      f"{'; '.join(r['bombs'])} |")
        with open(args.markdown, "w") as f:
            f.write("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
