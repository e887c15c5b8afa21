"""Soak benchmark of nexedge-daemon under hostile traffic (issue 13). Not a test, not CI.

1. Starts a real ``nexedge-daemon`` process (tiny ONNX model, store, shift monitor, metrics).
2. Measures capacity: 8 cameras send flat out for ``capacity_s`` seconds; capacity =
   inferred verdicts per second.
3. Soaks for ``minutes`` at ``load`` x capacity from 8 cameras (real device images from
   /work/shared/reference/nexperia when present, else synthetic PNGs), plus ``hostile``
   (1 %) hostile messages of every shape in tests/support/hostile.py.
4. Every ``sample_s`` seconds: RSS, threads, fds of the daemon, store rows and bytes,
   /metrics and /ready status.

(``minutes`` and the others are the recipe's values: ``--set minutes=10`` for a shorter run.)

Reports frames sent, replies, lost (no reply), duplicates, late (reply after the frame's
deadline, client-side), PASS without a score (must be 0), p50/p99 latency of well-formed
frames, RSS slope (MB/hour, least squares after the first ``warmup_s`` seconds), threads,
fds, store rows/bytes. With ``--markdown PATH`` the run's JSON goes beside PATH (PATH's
``.json``, or ``2.json``, ``3.json``, ... after earlier runs) and PATH is rendered from every
run there, one column per run.

    PYTHONPATH=$PWD nice python benchmarks/bench_soak.py [--model M.onnx] --markdown benchmarks/results/soak.md
    python benchmarks/bench_soak.py --set render_only=1 --markdown benchmarks/results/soak.md

Without ``--model`` the tiny test model (tests/support/daemon.py) is built first.
"""

import argparse
import glob
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _common as common  # noqa: E402
from tests.support.daemon_proc import DaemonProc, proc_status  # noqa: E402
from tests.support.hostile import Hostile  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    minutes=(30.0, "soak duration"),
    load=(0.8, "offered load as a fraction of the measured capacity"),
    hostile=(0.01, "hostile messages as a fraction of frames"),
    capacity_s=(30.0, "seconds of the capacity measurement"),
    sample_s=(30.0, "seconds between samples of the daemon's RSS, threads, fds, store"),
    warmup_s=(120.0, "seconds left out of the RSS slope"),
    deadline_ms=(2000.0, "daemon batching.deadline_ms"),
    render_only=(False, "measure nothing: only render --markdown from the runs' JSON files beside it"),
)


def run_files(markdown_path: str) -> List[str]:
    """The JSON files of the runs beside a soak section (``soak.json``, ``soak2.json``, ...), in run order."""
    stem = os.path.splitext(markdown_path)[0]
    out = []
    while os.path.exists(stem + (str(len(out) + 1) if out else "") + ".json"):
        out.append(stem + (str(len(out) + 1) if out else "") + ".json")
    return out


def render_runs(markdown_path: str) -> str:
    """Write the section at ``markdown_path`` from every run beside it (one column per run)."""
    results = []
    for path in run_files(markdown_path):
        with open(path) as f:
            res = json.load(f)
        res["rss_slope_last_half_mb_per_hour"] = _tail_slope(res)
        results.append(res)
    if not results:
        raise SystemExit(f"no soak runs beside {markdown_path} ({common.json_path(markdown_path)} missing)")
    text = markdown(results)
    with open(markdown_path, "w") as f:
        f.write(text)
    return text

REFERENCE = "/work/shared/reference/nexperia"


def load_images(n: int = 16) -> List[bytes]:
    import cv2

    paths = sorted(glob.glob(os.path.join(REFERENCE, "*.png")))[:n]
    out = [open(p, "rb").read() for p in paths]
    rng = np.random.default_rng(0)
    while len(out) < n:
        img = rng.integers(0, 256, (96, 96), dtype=np.uint8)
        out.append(cv2.imencode(".png", img)[1].tobytes())
    return out


class Camera(threading.Thread):
    """One DEALER camera sending at ``fps`` (or flat out with ``window`` frames in flight when fps=0)."""

    def __init__(self, endpoint: str, name: str, images: List[bytes], fps: float, stop: threading.Event,
                 deadline_ms: float, window: int = 8) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.name, self.images, self.fps = endpoint, name, images, fps
        self.stop_ev, self.deadline_ms, self.window = stop, deadline_ms, window
        self.sent: Dict[int, float] = {}
        self.replies: Dict[int, int] = {}
        self.late = 0
        self.pass_no_score = 0
        self.decisions: Dict[str, int] = {}
        self.lat: List[float] = []
        self.server_lat: List[float] = []
        self.server_late = 0
        self.inferred = 0

    def run(self) -> None:
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.endpoint)
        seq = 0
        next_t = time.monotonic()
        period = 1.0 / self.fps if self.fps > 0 else 0.0
        drain_until: Optional[float] = None
        while True:
            now = time.monotonic()
            if self.stop_ev.is_set() and drain_until is None:
                drain_until = now + 10.0
            if drain_until is not None and (now > drain_until or len(self.replies) >= len(self.sent)):
                break
            can_send = drain_until is None and (
                (period and now >= next_t) or (not period and len(self.sent) - len(self.replies) < self.window))
            if can_send:
                h = json.dumps({"v": 1, "camera": self.name, "frame_id": seq, "encoding": "png",
                                "deadline_ms": self.deadline_ms}).encode()
                s.send_multipart([b"", h, self.images[seq % len(self.images)]])
                self.sent[seq] = time.monotonic()
                seq += 1
                next_t += period
                if period and next_t < now - 1.0:  # fell behind by a second: do not burst to catch up
                    next_t = now
                continue
            wait = max(min(next_t - now, 0.05), 0.0) if period else 0.05
            if s.poll(int(wait * 1000) + 1):
                while True:
                    try:
                        parts = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_reply(json.loads(parts[-1]), time.monotonic())
        s.close()
        ctx.term()

    def _on_reply(self, v: Dict[str, Any], t: float) -> None:
        fid = v.get("frame_id")
        if fid not in self.sent:
            return
        self.replies[fid] = self.replies.get(fid, 0) + 1
        rtt = (t - self.sent[fid]) * 1000.0
        if rtt > self.deadline_ms + 50:  # 50 ms of client-side scheduling slack on a shared box
            self.late += 1
        d = v.get("decision")
        self.decisions[d] = self.decisions.get(d, 0) + 1
        if d == "PASS" and v.get("score") is None:
            self.pass_no_score += 1
        server = float(v.get("latency_ms") or 0.0)  # receive to reply, measured by the daemon
        if server > self.deadline_ms:
            self.server_late += 1
        if d in ("PASS", "REJECT"):
            self.inferred += 1
            self.lat.append(rtt)
            self.server_lat.append(server)


class Attacker(threading.Thread):
    def __init__(self, endpoint: str, rate: float, stop: threading.Event, png: bytes, max_msg: int) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.rate, self.stop_ev = endpoint, rate, stop
        self.gen = Hostile(7, png, max_msg)
        self.sent = 0
        self.replies = 0

    def run(self) -> None:
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.endpoint)
        period = 1.0 / self.rate
        next_t = time.monotonic()
        while not self.stop_ev.is_set() or (self.replies < self.sent and time.monotonic() < next_t + 10):
            now = time.monotonic()
            if not self.stop_ev.is_set() and now >= next_t:
                parts, _ = self.gen.next(self.sent)
                s.send_multipart([b""] + parts)
                self.sent += 1
                next_t += period
            if s.poll(int(max(min(next_t - now, 0.05), 0.001) * 1000)):
                while True:
                    try:
                        s.recv_multipart(zmq.NOBLOCK)
                        self.replies += 1
                    except zmq.Again:
                        break
        s.close()
        ctx.term()


def run_phase(d: DaemonProc, images: List[bytes], fps_each: float, seconds: float, hostile_rate: float,
              deadline_ms: float, max_msg: int, sample_s: float, store: Optional[str],
              samples: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    stop = threading.Event()
    cams = [Camera(d.frames, f"cam{i}", images, fps_each, stop, deadline_ms) for i in range(8)]
    att = Attacker(d.frames, hostile_rate, stop, images[0], max_msg) if hostile_rate > 0 else None
    t0 = time.monotonic()
    for c in cams + ([att] if att else []):
        c.start()
    next_sample = t0
    while time.monotonic() - t0 < seconds:
        if samples is not None and time.monotonic() >= next_sample:
            samples.append(sample(d, store, time.monotonic() - t0))
            s = samples[-1]
            print(f"  t={s['t']:6.0f} s  rss {s['rss'] / 2**20:6.1f} MB (anon {s['anon'] / 2**20:6.1f})  threads {s['threads']}  fds {s['fds']}  "
                  f"rows {s.get('rows')}  /metrics {s['metrics']} /ready {s['ready']}  load {s['load']:.2f}",
                  flush=True)
            next_sample += sample_s
        time.sleep(0.2)
    stop.set()
    for c in cams + ([att] if att else []):
        c.join(30)
    elapsed = time.monotonic() - t0
    sent = sum(len(c.sent) for c in cams)
    replied = sum(len(c.replies) for c in cams)
    lat = np.array([x for c in cams for x in c.lat]) if any(c.lat for c in cams) else np.zeros(1)
    slat = np.array([x for c in cams for x in c.server_lat]) if any(c.server_lat for c in cams) else np.zeros(1)
    dec: Dict[str, int] = {}
    for c in cams:
        for k, v in c.decisions.items():
            dec[k] = dec.get(k, 0) + v
    return {
        "seconds": elapsed, "sent": sent, "replied": replied, "lost": sent - replied,
        "duplicates": sum(n - 1 for c in cams for n in c.replies.values() if n > 1),
        "late": sum(c.late for c in cams), "pass_without_score": sum(c.pass_no_score for c in cams),
        "inferred": sum(c.inferred for c in cams), "decisions": dec,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
        "server_p50_ms": float(np.percentile(slat, 50)), "server_p99_ms": float(np.percentile(slat, 99)),
        "server_max_ms": float(slat.max()), "server_late": sum(c.server_late for c in cams),
        "hostile_sent": att.sent if att else 0, "hostile_replied": att.replies if att else 0,
    }


def sample(d: DaemonProc, store: Optional[str], t: float) -> Dict[str, Any]:
    st = proc_status(d.proc.pid)
    out: Dict[str, Any] = {"t": t, "rss": st["rss"], "anon": st["anon"], "threads": st["threads"], "fds": st["fds"],
                           "metrics": d.http("/metrics"), "ready": d.http("/ready"), "load": os.getloadavg()[0]}
    if store and os.path.exists(os.path.join(store, "samples.db")):
        from nexedge.store import SampleStore

        try:
            with SampleStore(store, writer=False) as s:
                stats = s.stats()
            out["rows"], out["store_bytes"] = stats["rows"], stats["bytes"]
        except Exception as e:  # busy store: try again next time
            out["rows_error"] = str(e)
    return out


def slope_mb_per_hour(samples: List[Dict[str, Any]], warmup_s: float, key: str = "rss") -> float:
    pts = [(s["t"], s.get(key, 0) / 2**20) for s in samples if s["t"] >= warmup_s]
    if len(pts) < 3:
        return float("nan")
    t, r = np.array(pts).T
    return float(np.polyfit(t / 3600.0, r, 1)[0])


def _rows(res: Dict[str, Any]) -> List[Any]:
    s = res["soak"]
    tail = res.get("rss_slope_last_half_mb_per_hour")
    return [
        ("finished, command", f"{res.get('date', '')}: `{res.get('command', '')}`"),
        ("duration", f"{res['minutes']:.1f} min" + ("" if res["minutes"] >= 29.5 else " (shorter than 30 min)")),
        ("measured capacity (8 cameras flat out)", f"{res['capacity_fps']:.1f} inferred frames/s"),
        ("offered load", f"{res['rate_fps']:.1f} frames/s (80 %) from 8 cameras + {s['hostile_sent']} hostile "
                         f"messages ({s['hostile_sent'] / max(s['sent'], 1):.2%})"),
        ("frames sent / replies", f"{s['sent']} / {s['replied']}"),
        ("lost (no reply)", str(s["lost"])),
        ("duplicate replies", str(s["duplicates"])),
        ("late (reply after deadline + 50 ms, client side)", f"{s['late']} ({s['late'] / max(s['sent'], 1):.3%})"),
        ("PASS without a score", str(s["pass_without_score"])),
        ("decisions", ", ".join(f"{k} {v}" for k, v in sorted(s["decisions"].items()))),
        ("latency of inferred frames p50 / p99 / max, client side", f"{s['p50_ms']:.0f} / {s['p99_ms']:.0f} / "
         f"{s['max_ms']:.0f} ms (deadline {res.get('deadline_ms', 2000):.0f} ms)"),
        ("same, daemon side (verdict latency_ms)", "not recorded" if "server_p99_ms" not in s else
         f"{s['server_p50_ms']:.0f} / {s['server_p99_ms']:.0f} / {s['server_max_ms']:.0f} ms"),
        ("replies with daemon-side latency_ms over the deadline (any decision; deadline_passed RECHECKs are "
         "answered within one 10 ms I/O loop after it)", "not recorded" if "server_late" not in s
         else str(s["server_late"])),
        ("hostile messages answered", f"{s['hostile_replied']} of {s['hostile_sent']}"),
        ("RSS first / last / max", f"{res['rss_mb_first']:.1f} / {res['rss_mb_last']:.1f} / {res['rss_mb_max']:.1f} MB"),
        ("RSS slope after warm-up (least squares)", f"{res['rss_slope_mb_per_hour']:.2f} MB/hour"),
        ("RSS slope over the last half", "n/a" if tail is None else f"{tail:.2f} MB/hour"),
        ("anonymous RSS (RssAnon) first / last, slope after warm-up", "not recorded" if "anon_slope_mb_per_hour"
         not in res else "{:.1f} / {:.1f} MB, {:.2f} MB/hour".format(*res["anon_mb_first_last"],
                                                                   res["anon_slope_mb_per_hour"])),
        ("threads min / max", "{} / {}".format(*res["threads_min_max"])),
        ("open fds min / max", "{} / {}".format(*res["fds_min_max"])),
        ("store rows / image bytes at the end", f"{res['store_rows_last']} / {res['store_bytes_last']}"),
        ("/metrics and /ready at every sample", "200" if res["metrics_ok"] and res["ready_ok"] else "NOT always 200"),
        ("daemon exit code after SIGTERM", str(res["daemon_exit"])),
        ("load average start / end", " / ".join(f"{x[0]:.1f} {x[1]:.1f} {x[2]:.1f}"
                                                for x in (res["load_avg_start"], res["load_avg_end"]))),
    ]


def markdown(results: List[Dict[str, Any]]) -> str:
    """One table, a column per run."""
    out = ["## Soak: 8 cameras at 80 % of capacity with 1 % hostile traffic", "",
           f"{results[0]['machine']}, nice'd while other engineers' jobs ran (see the load average). Model: the "
           "tiny test model (32x32 TenCrop, random weights, so every frame scores alike); images: the real "
           "Nexperia reference PNGs; hostile messages: every shape in tests/support/hostile.py.", "",
           "| | " + " | ".join(f"run {i + 1}" for i in range(len(results))) + " |",
           "|---|" + "---|" * len(results)]
    cols = [_rows(r) for r in results]
    for i, (name, _) in enumerate(cols[0]):
        out.append(f"| {name} | " + " | ".join(c[i][1] for c in cols) + " |")
    out += ["", "Reading: RSS counts file-backed pages of the shared libraries too, which the OS may drop under "
            "memory pressure from other jobs, so RSS can fall; anonymous RSS (RssAnon, recorded from run 3 on) "
            "is the daemon's own memory. New camera ids from the hostile traffic add state up to "
            "`sockets.max_cameras` (see the memory section for its cost), so a slope over a short run "
            "overstates the long-run trend. RECHECK answers to the well-formed cameras are not broken down by "
            "reason by the client (for a well-formed frame they can only be `queue_full` or "
            "`deadline_passed`; the daemon counts them in `nexedge_recheck_total`)."]
    return "\n".join(out) + "\n"


def _tail_slope(res: Dict[str, Any]) -> Optional[float]:
    pts = [(x["t"], x["rss"] / 2**20) for x in res.get("samples", [])]
    if len(pts) < 6:
        return None
    half = pts[-1][0] / 2.0
    t, r = np.array([p for p in pts if p[0] >= half]).T
    return float(np.polyfit(t / 3600.0, r, 1)[0])


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = common.parser(__doc__, RECIPE)
    common.add_model(ap, "ONNX model with its card (default: build the tiny test model)")
    gone = "each run's JSON is written beside --markdown PATH (PATH's .json, then 2.json, 3.json, ...)"
    args = common.parse(ap, RECIPE, argv, removed={"--out": gone, "--from-json": "--set render_only=1 renders --markdown "
                                                   "PATH from the runs' JSON files beside it"})
    if args.render_only and not args.markdown:
        ap.error("render_only needs --markdown PATH (the runs' JSON files are beside it)")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        print(render_runs(args.markdown))
        return 0
    if not args.model:
        from tests.support.daemon import build_tiny_onnx

        args.model = build_tiny_onnx(tempfile.mkdtemp(prefix="nexedge-soak-model-"))
    work = tempfile.mkdtemp(prefix="nexedge-soak-")
    store = os.path.join(work, "store")
    max_msg = 4 << 20
    raw = {
        "model": {"path": os.path.abspath(args.model), "warmup": 2, "options": {"intra_threads": 1}},
        "sockets": {"frames": "tcp://127.0.0.1:*", "verdicts": "tcp://127.0.0.1:*", "decode_workers": 1,
                    "max_message_bytes": max_msg},
        "batching": {"max_batch": 8, "max_delay_ms": 5, "max_queue": 64, "deadline_ms": args.deadline_ms},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "store": {"path": store, "quota": "200MB"},
        "monitor": {"window": 200, "min_frames": 50},
        "logging": {"level": "WARNING"},
    }
    images = load_images()
    d = DaemonProc(raw).wait_ready()
    print(f"daemon pid {d.proc.pid}; frames {d.frames}; load average {os.getloadavg()}", flush=True)
    try:
        cap = run_phase(d, images, 0.0, args.capacity_s, 0.0, args.deadline_ms, max_msg, 1e9, None)
        capacity = cap["inferred"] / cap["seconds"]
        rate = args.load * capacity
        print(f"capacity {capacity:.1f} inferred frames/s (p99 {cap['p99_ms']:.0f} ms flat out); soaking "
              f"{args.minutes:.1f} min at {rate:.1f} fps ({args.load:.0%}) + {args.hostile:.1%} hostile", flush=True)
        samples: List[Dict[str, Any]] = []
        load_start = os.getloadavg()
        soak = run_phase(d, images, rate / 8.0, args.minutes * 60.0, max(rate * args.hostile, 0.01),
                         args.deadline_ms, max_msg, args.sample_s, store, samples)
        samples.append(sample(d, store, soak["seconds"]))
        load_end = os.getloadavg()
    finally:
        code = d.stop()
    res = {
        "machine": "2-core AMD EPYC (shared)", "minutes": soak["seconds"] / 60.0, "capacity_fps": capacity,
        "rate_fps": rate, "load_avg_start": load_start, "load_avg_end": load_end, "soak": soak,
        "rss_slope_mb_per_hour": slope_mb_per_hour(samples, args.warmup_s),
        "anon_slope_mb_per_hour": slope_mb_per_hour(samples, args.warmup_s, "anon"),
        "anon_mb_first_last": [samples[0].get("anon", 0) / 2**20, samples[-1].get("anon", 0) / 2**20],
        "rss_mb_first": samples[0]["rss"] / 2**20, "rss_mb_last": samples[-1]["rss"] / 2**20,
        "rss_mb_max": max(s["rss"] for s in samples) / 2**20,
        "threads_min_max": [min(s["threads"] for s in samples), max(s["threads"] for s in samples)],
        "fds_min_max": [min(s["fds"] for s in samples), max(s["fds"] for s in samples)],
        "store_rows_last": samples[-1].get("rows"), "store_bytes_last": samples[-1].get("store_bytes"),
        "metrics_ok": all(s["metrics"] == 200 for s in samples), "ready_ok": all(s["ready"] == 200 for s in samples),
        "daemon_exit": code, "deadline_ms": args.deadline_ms,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/bench_soak.py " + " ".join(args.argv), "samples": samples,
    }
    res["rss_slope_last_half_mb_per_hour"] = _tail_slope(res)
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=2))
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        runs = run_files(args.markdown)
        out = os.path.splitext(args.markdown)[0] + (str(len(runs) + 1) if runs else "") + ".json"
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {out}")
        render_runs(args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
