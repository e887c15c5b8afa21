"""Daemon memory after floods: RSS before, at peak and after idle, for a flood of many-part
large messages (the multipart bomb) and of large valid frames, with and without the allocator
settings (nexedge.serve.memory). Prints one table; writes nothing else. Not a test.

    PYTHONPATH=$PWD python benchmarks/bench_memory_flood.py --model MODEL.onnx [--code-root DIR]

``--code-root`` runs the daemon from another checkout (e.g. /work/main) for a side-by-side run.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _daemon_proc import DaemonProc  # noqa: E402


def _config(model: str, max_msg: int) -> dict:
    return {
        "model": {"path": model, "warmup": 1, "options": {"intra_threads": 1}},
        "sockets": {"frames": "tcp://127.0.0.1:*", "verdicts": "tcp://127.0.0.1:*", "decode_workers": 1,
                    "max_message_bytes": max_msg},
        "batching": {"max_batch": 4, "max_delay_ms": 5, "max_queue": 32, "deadline_ms": 5000},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "logging": {"level": "WARNING"},
    }


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
            for j in range(8):
                side = int(rng.integers(300, 2500))
                hh = json.dumps({"v": 1, "camera": "cam", "frame_id": f"{i}-{j}", "encoding": "raw",
                                 "dtype": "uint8", "shape": [side, side]}).encode()
                s.send_multipart([b"", hh, bytes(side * side)])
                if s.poll(30000):
                    s.recv_multipart()
            continue
        elif kind == "pipelined":  # all bombs at once, replies collected afterwards
            s.send_multipart([b"", h] + [big] * parts)
            continue
        else:
            s.send_multipart([b"", h, big])
        if s.poll(30000):
            s.recv_multipart()
            got += 1
    while got < n and s.poll(30000):
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

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from _daemon_util import base_config

    import nexedge.serve.memory as M
    from nexedge.serve import config as C
    from nexedge.serve.daemon import Daemon

    if not allocator:
        M.AllocatorTrim.__init__.__defaults__ = (0, 1.0, False)
    d = Daemon(C.from_dict(base_config(model, logging={"level": "ERROR"})))
    d._memory.libc = None  # no automatic trim after the burst: we trim by hand below
    d.setup()
    t = threading.Thread(target=d.serve)
    t.start()
    base = M.rss_bytes()
    flood(d.endpoints["frames"], "mixed", 4, 1, 1)
    time.sleep(2)
    gc.collect()
    after = M.rss_bytes()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = M.rss_bytes()
    d.request_stop()
    t.join()
    print(f"in-process mixed flood, fixed mmap threshold {'on ' if allocator else 'off'}: base {base >> 20} MB, "
          f"after {after >> 20} MB, after malloc_trim {trimmed >> 20} MB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--code-root", default=os.getcwd(), help="checkout whose nexedge the daemon runs")
    ap.add_argument("--n", type=int, default=6, help="messages per flood")
    ap.add_argument("--parts", type=int, default=20, help="parts per multipart bomb")
    ap.add_argument("--part-mib", type=int, default=8)
    ap.add_argument("--kinds", default="multipart,mixed", help="floods to run: multipart, mixed, single")
    ap.add_argument("--max-message-mib", type=int, default=32)
    ap.add_argument("--in-process", action="store_true", help="allocator vs held: in-process probe, both settings")
    args = ap.parse_args()
    if args.in_process:
        for allocator in (False, True):
            pid = os.fork()
            if pid == 0:
                in_process(args.model, allocator)
                os._exit(0)
            os.waitpid(pid, 0)
        return 0
    env = dict(os.environ, PYTHONPATH=os.path.abspath(args.code_root))
    print(f"code: {args.code_root}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'flood':<12} {'base MB':>8} {'peak MB':>8} {'after 3 s MB':>12} {'replies':>8}")
    for kind in args.kinds.split(","):
        d = DaemonProc(_config(args.model, args.max_message_mib << 20), env=env).wait_ready()
        base = d.status()["rss"]
        got = flood(d.frames, kind, args.n, args.part_mib, args.parts)
        time.sleep(3.0)
        st = d.status()
        d.stop()
        print(f"{kind:<12} {base / 2**20:8.0f} {st['hwm'] / 2**20:8.0f} {st['rss'] / 2**20:12.0f} {got:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
