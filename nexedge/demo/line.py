"""The line part of ``nexedge demo``: start ``nexedge-daemon`` as its own process, stream the
test split from simulated cameras through the client library, and summarise the verdicts
against the ground truth (decisions, confusion, escapes and overkill, latency)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Sequence, Tuple

from nexedge.bench import stats
from nexedge.bench.report import table
from nexedge.demo.context import Demo
from nexedge.metrics import escape_text
from nexedge.serve.decode import SUFFIXES as DECODED

DECISIONS = ("PASS", "REJECT", "RECHECK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_command() -> List[str]:
    """The ``nexedge-daemon`` console script of this environment (beside this Python first)."""
    here = os.path.join(os.path.dirname(sys.executable), "nexedge-daemon")
    exe = here if os.path.exists(here) else shutil.which("nexedge-daemon")
    if not exe:
        raise RuntimeError("`nexedge-daemon` is not installed in this environment (pip install -e .)")
    return [exe]


#: The demo line rejects at the card's operating point for TPR 100 % on validation.
DECISION_TPR = 1.0


def card_operating_point(model: str, target_tpr: float) -> Optional[Dict[str, Any]]:
    """The card's operating point the daemon decides at (None when the card has none)."""
    from nexedge.card import CardError, load_card

    try:
        return load_card(model).operating_point(target_tpr)
    except CardError:
        return None


def daemon_config(demo: Demo, model: str, ports: Dict[str, int]) -> Dict[str, Any]:
    return {
        "model": {"path": model, "warmup": 3, "options": {"intra_threads": demo.settings["threads"]}},
        "sockets": {"frames": f"tcp://127.0.0.1:{ports['frames']}",
                    "verdicts": f"tcp://127.0.0.1:{ports['verdicts']}", "decode_workers": 1},
        "batching": {"max_batch": 8, "max_delay_ms": 5.0, "max_queue": 256, "deadline_ms": 20000.0},
        "decision": {"target_tpr": DECISION_TPR},
        "uncertain": {"band": 1.0, "audit_fraction": 0.01, "seed": demo.settings["seed"]},
        "store": {"path": demo.path("store"), "quota": "200MiB"},
        "metrics": {"host": "127.0.0.1", "port": ports["metrics"]},
        "logging": {"level": "INFO", "format": "json"},
        "shutdown": {"timeout_s": 20.0},
    }


def wait_ready(url: str, proc: "subprocess.Popen[bytes]", log_path: str, timeout: float = 180.0) -> float:
    """Poll ``url`` (the daemon's /ready) until 200; raise with the log tail if the process exits."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"nexedge-daemon exited with status {proc.returncode} before it was ready; "
                               f"log {log_path}:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nexedge-daemon not ready after {timeout:.0f} s; log {log_path}:\n{tail(log_path)}")


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def stop_daemon(demo: Demo, proc: "subprocess.Popen[bytes]", timeout: float = 30.0) -> int:
    """SIGTERM, wait for the drain; kill only if it overstays ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            demo.say(f"nexedge-daemon did not stop within {timeout:.0f} s of SIGTERM; killed")
    demo.say(f"nexedge-daemon (pid {proc.pid}) stopped, exit status {proc.returncode}")
    return int(proc.returncode)


def start_daemon(demo: Demo) -> None:
    import yaml

    model = demo.results["int8"]["onnx"]
    ports = {"frames": free_port(), "verdicts": free_port(), "metrics": free_port()}
    cfg = daemon_config(demo, model, ports)
    cfg_path = demo.path("line.yaml")
    with open(cfg_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    log_path = demo.path("daemon.log")
    cmd = daemon_command() + ["--config", cfg_path]
    demo.say("$ " + " ".join(cmd) + f"  (log: {log_path})")
    logf = open(log_path, "ab")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=demo.out)
    logf.close()

    def cleanup() -> None:
        if demo.settings.get("keep_daemon") and proc.poll() is None:
            demo.say(f"nexedge-daemon left running (pid {proc.pid}); stop it with: kill {proc.pid}")
            return
        demo.results.setdefault("daemon", {})["exit_status"] = stop_daemon(demo, proc)

    demo.cleanups.append(cleanup)
    ready_s = wait_ready(f"http://127.0.0.1:{ports['metrics']}/ready", proc, log_path)
    demo.results["daemon"] = {"pid": proc.pid, "config": cfg_path, "log": log_path, "model": model,
                              "frames": cfg["sockets"]["frames"], "store": cfg["store"]["path"],
                              "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics", "ready_s": round(ready_s, 2)}
    demo.say(f"daemon ready in {ready_s:.1f} s: frames {cfg['sockets']['frames']}, "
             f"metrics http://127.0.0.1:{ports['metrics']}/metrics, store {cfg['store']['path']}")


# -- streaming ----------------------------------------------------------------

def test_images(root: str, good: str = "good") -> List[Tuple[str, str]]:
    """(path, class) of every test image, sorted."""
    test = os.path.join(root, "test")
    out = []
    for cls in sorted(os.listdir(test)):
        d = os.path.join(test, cls)
        if os.path.isdir(d):
            out += [(os.path.join(d, f), cls) for f in sorted(os.listdir(d)) if f.lower().endswith(tuple(DECODED))]
    if not out:
        raise RuntimeError(f"no test images under {test}")
    return out


def _camera(endpoint: str, name: str, items: Sequence[Tuple[int, bytes]], window: int,
            out: Dict[int, Dict[str, Any]], errors: List[str], timeout_ms: int = 60000) -> None:
    from nexedge.serve.client import CameraClient

    try:
        with CameraClient(endpoint, camera=name) as cam:
            it = iter(items)
            inflight = 0
            done = False
            while not done or inflight:
                while not done and inflight < window:
                    nxt = next(it, None)
                    if nxt is None:
                        done = True
                        break
                    cam.send(nxt[1], frame_id=nxt[0])
                    inflight += 1
                if inflight:
                    v = cam.recv(timeout_ms=timeout_ms)
                    if v is None:
                        raise TimeoutError(f"camera {name}: no verdict within {timeout_ms} ms "
                                           f"({inflight} frames in flight)")
                    out[int(v["frame_id"])] = v
                    inflight -= 1
    except Exception as e:  # reported by the stage; a thread must not die silently
        errors.append(f"{name}: {type(e).__name__}: {e}")


def stream_test_images(demo: Demo) -> None:
    from nexedge.progress import progress

    images = test_images(demo.results["data"]["root"])
    n_cam = int(demo.settings["cameras"])
    payloads = []
    for i, (path, _cls) in enumerate(images):
        with open(path, "rb") as f:
            payloads.append((i, f.read()))
    verdicts: Dict[int, Dict[str, Any]] = {}
    errors: List[str] = []
    endpoint = demo.results["daemon"]["frames"]
    demo.say(f"streaming {len(images)} test images (PNG, as a camera would send) from {n_cam} simulated "
             f"cameras to {endpoint}, 4 frames in flight per camera")
    threads = [threading.Thread(target=_camera, args=(endpoint, f"cam{c + 1}", payloads[c::n_cam], 4, verdicts,
                                                      errors), daemon=True) for c in range(n_cam)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    bar = progress(total=len(images), desc="verdicts", unit="frame", leave=True)
    while any(t.is_alive() for t in threads):
        time.sleep(0.2)
        bar.update(len(verdicts) - bar.n)
    bar.update(len(verdicts) - bar.n)
    bar.close()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError("streaming failed: " + "; ".join(errors))
    if len(verdicts) != len(images):
        raise RuntimeError(f"{len(images)} frames sent but {len(verdicts)} verdicts received")
    summary = summarize_verdicts(images, verdicts, wall)
    summary["operating_point"] = card_operating_point(demo.results["daemon"]["model"], DECISION_TPR)
    demo.results["stream"] = summary
    for line in format_verdicts(summary):
        demo.say(line)


def summarize_verdicts(images: Sequence[Tuple[str, str]], verdicts: Dict[int, Dict[str, Any]], wall: float,
                       good: str = "good") -> Dict[str, Any]:
    """Decision counts, confusion vs ground truth (per class and good/defect), latency percentiles."""
    per_class: Dict[str, Dict[str, int]] = {}
    counts = {d: 0 for d in DECISIONS}
    reasons: Dict[str, int] = {}
    lat, rtt = [], []
    uncertain = 0
    for i, (_path, cls) in enumerate(images):
        v = verdicts[i]
        d = v["decision"]
        if d not in DECISIONS:
            raise RuntimeError(f"unknown decision {d!r} in verdict {v}")
        counts[d] += 1
        row = per_class.setdefault(cls, {k: 0 for k in DECISIONS})
        row[d] += 1
        if d == "RECHECK":
            reasons[v.get("reason") or "?"] = reasons.get(v.get("reason") or "?", 0) + 1
        uncertain += bool(v.get("uncertain"))
        lat.append(float(v.get("latency_ms") or 0.0))
        if "rtt_ms" in v:
            rtt.append(float(v["rtt_ms"]))
    binary = {"good": {k: 0 for k in DECISIONS}, "defect": {k: 0 for k in DECISIONS}}
    for cls, row in per_class.items():
        for k, n in row.items():
            binary["good" if cls == good else "defect"][k] += n
    n_def = sum(binary["defect"].values())
    n_good = sum(binary["good"].values())
    return {
        "frames": len(images), "wall_s": round(wall, 2), "frames_per_s": len(images) / wall if wall > 0 else None,
        "decisions": counts, "recheck_reasons": reasons, "uncertain": uncertain,
        "per_class": per_class, "binary": binary,
        "escapes": binary["defect"]["PASS"], "escape_rate": binary["defect"]["PASS"] / n_def if n_def else None,
        "overkill": binary["good"]["REJECT"], "overkill_rate": binary["good"]["REJECT"] / n_good if n_good else None,
        "daemon_latency_ms": stats.summarize(lat) if lat else None,
        "client_rtt_ms": stats.summarize(rtt) if rtt else None,
        "threshold": next(iter(verdicts.values())).get("threshold") if verdicts else None,
        "model_id": next(iter(verdicts.values())).get("model_id") if verdicts else None,
    }


def format_verdicts(s: Dict[str, Any], good: str = "good") -> List[str]:
    c = s["decisions"]
    out = ["", "verdict summary: {} frames in {:.1f} s ({:.1f} frames/s), model {}, threshold {}".format(
        s["frames"], s["wall_s"], s["frames_per_s"] or 0.0, s["model_id"], s["threshold"]),
        "  PASS {}  REJECT {}  RECHECK {}{}   uncertain (saved for relabeling): {}".format(
        c["PASS"], c["REJECT"], c["RECHECK"],
        " (" + ", ".join(f"{k} {n}" for k, n in s["recheck_reasons"].items()) + ")" if s["recheck_reasons"] else "",
        s["uncertain"]), "", "confusion vs ground truth (rows: true class):"]
    rows = [[cls, sum(r.values()), r["PASS"], r["REJECT"], r["RECHECK"]] for cls, r in sorted(s["per_class"].items())]
    rows += [["= good", sum(s["binary"]["good"].values())] + [s["binary"]["good"][k] for k in DECISIONS],
             ["= defect", sum(s["binary"]["defect"].values())] + [s["binary"]["defect"][k] for k in DECISIONS]]
    out += ["  " + ln for ln in table(["class", "n", "PASS", "REJECT", "RECHECK"], rows).splitlines()]

    def pct(x: Any) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    out.append("  escapes (defect PASSed): {} ({})   overkill (good REJECTed): {} ({})".format(
        s["escapes"], pct(s["escape_rate"]), s["overkill"], pct(s["overkill_rate"])))
    esc = {cls: r["PASS"] for cls, r in sorted(s["per_class"].items()) if cls != good}
    out.append("  escapes per class: " + ", ".join(f"{c} {n}/{sum(s['per_class'][c].values())}" for c, n in esc.items()))
    if good in s["per_class"]:
        g = s["per_class"][good]
        out.append(f"  overkill per class: {good} {g['REJECT']}/{sum(g.values())} REJECTed "
                   f"({g['RECHECK']} RECHECK); good PASSed {g['PASS']}/{sum(g.values())}")
    op = s.get("operating_point")
    if op:
        out.append("  operating point (card, validation): target TPR {:.1f} %, threshold {:.4f}, TPR {:.1f} % "
                   "(95 % lower bound {:.1f} %, {} defects), FPR {:.1f} % ({} good)".format(
                       100 * op["target_tpr"], op["threshold"], 100 * op["tpr"], 100 * op["tpr_lower95"],
                       op["n_defects"], 100 * op["fpr"], op["n_good"]))
        n_def = sum(s["binary"]["defect"].values())
        if n_def:
            out.append("  a new defect drawn like the validation ones: " + escape_text(op, n_def))
    for key, title in (("daemon_latency_ms", "daemon latency (receive -> verdict)"),
                       ("client_rtt_ms", "camera round trip")):
        st = s.get(key)
        if st:
            out.append("  {}: p50 {:.1f} ms  p95 {:.1f} ms  p99 {:.1f} ms  max {:.1f} ms".format(
                title, st["median"], st["p95"], st["p99"], st["max"]))
    return out
