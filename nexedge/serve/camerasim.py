"""Simulated cameras: stream a folder of images to the daemon from N cameras at a rate.

Modes: ``native`` (DEALER, image files sent as they are: JPEG/PNG/BMP/TIFF),
``native-raw`` (DEALER, decoded arrays), ``imagezmq-raw`` and ``imagezmq-jpg``
(the unmodified imagezmq ``ImageSender``, REQ: one frame in flight per camera).
Native cameras are open-loop: they send on schedule as long as fewer than
``window`` frames are unanswered. Python 3.8, no torch.
"""

import collections
import logging
import os
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nexedge.serve.decode import SUFFIXES

MODES = ("native", "native-raw", "imagezmq-raw", "imagezmq-jpg")
IMAGE_EXTS = tuple(SUFFIXES)  # the files whose bytes the daemon decodes
log = logging.getLogger(__name__)


class SimImage:
    __slots__ = ("name", "data", "array", "jpeg", "label")

    def __init__(self, name: str, data: bytes, array: np.ndarray, jpeg: bytes, label: Optional[str] = None) -> None:
        self.name, self.data, self.array, self.jpeg = name, data, array, jpeg
        self.label = label  # the class folder it came from (labelled folders), else None


def load_images(folder: str, limit: int = 0, skipped: Optional[List[str]] = None) -> List[SimImage]:
    """Images under ``folder`` (recursive, sorted): file bytes, decoded array and a JPEG copy.

    An image in a sub-folder is labelled with the sub-folder's name (``test/<class>/x.png`` ->
    ``<class>``). Files that do not decode are left out, logged and appended to ``skipped``.
    """
    import cv2

    if os.path.isfile(folder):
        raise ValueError(f"{folder} is a file; expected a folder of images (sub-folders are class labels)")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} not found")
    paths = []
    for root, _dirs, files in os.walk(folder):
        paths += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTS)]
    paths.sort()
    if limit:
        paths = paths[:limit]
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) under {folder}")
    out = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError as e:
            arr, why = None, str(e)
        else:
            from nexedge.serve.decode import sniff, tiff_problem

            why = tiff_problem(data) if sniff(data) == "tiff" else None  # what the daemon would refuse
            arr = None if why else cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if arr is not None and arr.dtype not in (np.uint8, np.uint16):
                arr, why = None, f"{arr.dtype} samples; the daemon takes 8 or 16-bit images"
            why = why or "does not decode as an image"
        if arr is None:
            log.warning("skipping %s: %s", p, why)
            if skipped is not None:
                skipped.append(p)
            continue
        jpeg = data if data[:3] == b"\xff\xd8\xff" else cv2.imencode(".jpg", arr)[1].tobytes()
        rel = os.path.relpath(p, folder)
        label = rel.split(os.sep)[0] if os.sep in rel else None
        out.append(SimImage(rel, data, arr, jpeg, label))
    if not out:
        raise ValueError(f"no readable images under {folder} ({len(skipped or [])} unreadable)")
    return out


class SimResult:
    """What the cameras saw: counts, decisions, reasons and client round-trip latencies."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.duplicates = 0
        self.lost = 0
        self.decisions: Dict[str, int] = collections.Counter()
        self.by_label: Dict[str, Dict[str, int]] = {}
        self.reasons: Dict[str, int] = collections.Counter()
        self.latencies_ms: List[float] = []
        self.elapsed_s = 0.0
        self.errors: List[str] = []
        self._lock = threading.Lock()

    def add(self, v: Dict[str, Any], label: Optional[str] = None) -> None:
        with self._lock:
            self.received += 1
            self.decisions[v.get("decision", "?")] += 1
            if label is not None:
                row = self.by_label.setdefault(label, {})
                row[v.get("decision", "?")] = row.get(v.get("decision", "?"), 0) + 1
            if v.get("decision") == "RECHECK":
                self.reasons[v.get("reason") or "?"] += 1
            if "rtt_ms" in v:
                self.latencies_ms.append(float(v["rtt_ms"]))

    def percentile(self, q: float) -> Optional[float]:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def summary(self) -> Dict[str, Any]:
        inferred = self.decisions.get("PASS", 0) + self.decisions.get("REJECT", 0)
        return {
            "sent": self.sent, "received": self.received, "lost": self.lost, "duplicates": self.duplicates,
            "elapsed_s": round(self.elapsed_s, 3),
            "throughput_fps": round(self.received / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "inferred_fps": round(inferred / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "decisions": dict(self.decisions), "by_label": self.by_label, "recheck_reasons": dict(self.reasons),
            "latency_ms": {k: (None if self.percentile(q) is None else round(self.percentile(q), 3))
                           for k, q in (("p50", 50), ("p95", 95), ("p99", 99))},
            "errors": self.errors[:10],
        }


def _native_camera(endpoint: str, name: str, images: Sequence[SimImage], raw: bool, rate: float, total: int,
                   duration: float, window: int, timeout_s: float, res: SimResult, start: float, offset: int) -> None:
    from nexedge.serve.client import CameraClient

    seen: set = set()
    labels: Dict[Any, Optional[str]] = {}
    with CameraClient(endpoint, name) as cam:
        i = 0
        while True:
            now = time.monotonic()
            done_sending = (total and i >= total) or (duration and now - start >= duration)
            if done_sending:
                break
            due = start + i / rate if rate > 0 else now
            if now >= due and len(cam.pending) < window:
                img = images[(offset + i) % len(images)]
                labels[cam.send(img.array if raw else img.data)] = img.label
                i += 1
                continue
            wait_ms = max(0, int((due - now) * 1000)) if len(cam.pending) < window else 50
            v = cam.recv(timeout_ms=min(wait_ms, 50))
            if v is not None:
                _count(v, seen, res, labels)
        with res._lock:
            res.sent += i
        end = time.monotonic() + timeout_s
        while cam.pending and time.monotonic() < end:
            v = cam.recv(timeout_ms=max(1, int((end - time.monotonic()) * 1000)))
            if v is not None:
                _count(v, seen, res, labels)
        with res._lock:
            res.lost += len(cam.pending)


def _count(v: Dict[str, Any], seen: set, res: SimResult, labels: Dict[Any, Optional[str]]) -> None:
    fid = v.get("frame_id")
    if fid in seen:
        with res._lock:
            res.duplicates += 1
        return
    seen.add(fid)
    res.add(v, labels.pop(fid, None))


def _imagezmq_camera(endpoint: str, name: str, images: Sequence[SimImage], jpg: bool, rate: float, total: int,
                     duration: float, timeout_s: float, res: SimResult, start: float, offset: int) -> None:
    import json

    import imagezmq
    import zmq

    sender = imagezmq.ImageSender(connect_to=endpoint)
    sender.zmq_socket.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sender.zmq_socket.setsockopt(zmq.LINGER, 0)
    try:
        i = 0
        while True:
            now = time.monotonic()
            if (total and i >= total) or (duration and now - start >= duration):
                break
            due = start + i / rate if rate > 0 else now
            if due > now:
                time.sleep(due - now)
            img = images[(offset + i) % len(images)]
            msg = f"{name}|{i + 1}"
            t0 = time.monotonic()
            with res._lock:
                res.sent += 1
            i += 1
            try:
                reply = sender.send_jpg(msg, img.jpeg) if jpg else sender.send_image(msg, img.array)
            except zmq.Again:
                with res._lock:
                    res.lost += 1
                    res.errors.append(f"{name}: no reply within {timeout_s} s; camera stopped")
                return
            v = json.loads(reply.decode("utf-8"))
            v["rtt_ms"] = (time.monotonic() - t0) * 1000.0
            res.add(v, img.label)
    finally:
        sender.close()


def run_sim(endpoint: str, images: Sequence[SimImage], cameras: int = 2, rate: float = 10.0, frames: int = 0,
            duration: float = 0.0, mode: str = "native", window: int = 64, timeout_s: float = 10.0,
            prefix: str = "cam") -> SimResult:
    """Stream ``images`` from ``cameras`` threads, ``rate`` frames/s each (0 = as fast as allowed),
    ``frames`` per camera or for ``duration`` seconds. Returns a :class:`SimResult`."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {list(MODES)}")
    if cameras < 1 or rate < 0 or window < 1:
        raise ValueError(f"cameras ({cameras}) and window ({window}) must be >= 1 and rate ({rate}) >= 0")
    if not frames and not duration:
        raise ValueError("give frames (per camera) or duration (seconds)")
    if not images:
        raise ValueError("no images to send")
    res = SimResult()
    threads = []
    start = time.monotonic() + 0.05
    for c in range(cameras):
        name = f"{prefix}{c + 1}"
        if mode.startswith("native"):
            args: Tuple[Any, ...] = (endpoint, name, images, mode == "native-raw", rate, frames, duration, window,
                                     timeout_s, res, start, c)
            target: Any = _native_camera
        else:
            args = (endpoint, name, images, mode == "imagezmq-jpg", rate, frames, duration, timeout_s, res, start, c)
            target = _imagezmq_camera
        threads.append(threading.Thread(target=_guard, args=(target, args, res, name), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res.elapsed_s = time.monotonic() - start
    return res


def _guard(target: Any, args: Tuple[Any, ...], res: SimResult, name: str) -> None:
    try:
        target(*args)
    except Exception as e:  # report, do not hang the other cameras
        with res._lock:
            res.errors.append(f"{name}: {type(e).__name__}: {e}")


def escapes_overkill(by_label: Dict[str, Dict[str, int]], good: str) -> Dict[str, Any]:
    """Decisions by true class folded to good/defect: escapes = defect images PASSed, overkill =
    good images REJECTed (RECHECK is neither: the line re-inspects those)."""
    binary: Dict[str, Dict[str, int]] = {"good": {}, "defect": {}}
    for cls, row in by_label.items():
        side = binary["good" if cls == good else "defect"]
        for k, n in row.items():
            side[k] = side.get(k, 0) + n
    n_def, n_good = sum(binary["defect"].values()), sum(binary["good"].values())
    esc, over = binary["defect"].get("PASS", 0), binary["good"].get("REJECT", 0)
    return {"binary": binary, "escapes": esc, "escape_rate": esc / n_def if n_def else None,
            "overkill": over, "overkill_rate": over / n_good if n_good else None}


def format_by_label(by_label: Dict[str, Dict[str, int]], good: Optional[str]) -> List[str]:
    """Table of decisions per folder label, with escapes and overkill when the good class is known."""
    decisions = ("PASS", "REJECT", "RECHECK")
    w = max([len(c) for c in by_label] + [10])
    lines = ["decisions by folder label:", f"  {'label':<{w}}  {'n':>5}  " + "  ".join(f"{d:>7}" for d in decisions)]
    for cls in sorted(by_label):
        row = by_label[cls]
        tag = "  (good)" if cls == good else ""
        lines.append(f"  {cls:<{w}}  {sum(row.values()):>5}  " + "  ".join(f"{row.get(d, 0):>7}" for d in decisions) + tag)
    if good is None:
        lines.append("  (give --good-class to count escapes and overkill)")
        return lines
    if good not in by_label:
        lines.append(f"  (no images labelled {good!r}: overkill not measured)")
    e = escapes_overkill(by_label, good)

    def pct(x: Optional[float]) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    lines.append(f"  escapes (defects PASSed): {e['escapes']} ({pct(e['escape_rate'])})   "
                 f"overkill ({good} REJECTed): {e['overkill']} ({pct(e['overkill_rate'])})")
    return lines


def format_summary(s: Dict[str, Any], good: Optional[str] = None) -> str:
    lat = s["latency_ms"]
    lines = [
        f"sent {s['sent']}  received {s['received']}  lost {s['lost']}  duplicates {s['duplicates']}  "
        f"in {s['elapsed_s']:.2f} s ({s['throughput_fps']:.1f} verdicts/s, {s['inferred_fps']:.1f} inferred/s)",
        "decisions: " + ", ".join(f"{k} {v}" for k, v in sorted(s["decisions"].items())),
    ]
    if s["recheck_reasons"]:
        lines.append("RECHECK reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(s["recheck_reasons"].items())))
    if lat["p50"] is not None:
        lines.append(f"latency ms: p50 {lat['p50']:.2f}  p95 {lat['p95']:.2f}  p99 {lat['p99']:.2f}")
    if s.get("by_label"):
        lines += format_by_label(s["by_label"], good)
    if s.get("skipped"):
        lines.append(f"skipped {len(s['skipped'])} unreadable file(s): " + ", ".join(s["skipped"][:5])
                     + (" ..." if len(s["skipped"]) > 5 else ""))
    for e in s["errors"]:
        lines.append("error: " + e)
    return "\n".join(lines)
