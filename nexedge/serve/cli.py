"""``nexedge camera-sim``: stream a folder of images to a running daemon from N simulated cameras."""

import argparse
import json
import os
from typing import List, Optional

from nexedge.serve.camerasim import MODES


def configure_camera_sim(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder of images (PNG/JPEG/BMP, searched recursively)")
    p.add_argument("--connect", default="tcp://127.0.0.1:5555", help="daemon frames endpoint (default %(default)s)")
    p.add_argument("--cameras", type=int, default=2, help="number of simulated cameras (default %(default)s)")
    p.add_argument("--rate", type=float, default=10.0,
                   help="frames per second per camera; 0 = as fast as --window allows (default %(default)s)")
    p.add_argument("--frames", type=int, default=0, help="frames per camera (default: run for --duration)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds to stream when --frames is 0 (default %(default)s)")
    p.add_argument("--mode", choices=MODES, default="native",
                   help="native: files as they are; native-raw: decoded arrays; imagezmq-raw / imagezmq-jpg: the "
                        "unmodified imagezmq ImageSender (default %(default)s)")
    p.add_argument("--window", type=int, default=64, help="native: max unanswered frames per camera (default %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for outstanding verdicts (default %(default)s)")
    p.add_argument("--limit", type=int, default=0, help="use at most this many images from the folder")
    p.add_argument("--prefix", default="cam", help="camera name prefix (default %(default)s)")
    p.add_argument("--good-class", default=None,
                   help="with a labelled folder (FOLDER/<class>/...): the negative class, for escapes (defects "
                        "PASSed) and overkill (good REJECTed) (default: good_class of the data set's "
                        "dataset.json in FOLDER or above it, else 'good' when there is such a folder)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _good_class(folder: str, labels: set) -> Optional[str]:
    for d in (folder, os.path.dirname(os.path.abspath(folder))):
        path = os.path.join(d, "dataset.json")
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    good = json.load(f).get("good_class")
            except ValueError:
                continue
            if good:
                return str(good)
    return "good" if "good" in labels else None


def run_camera_sim(args: argparse.Namespace) -> int:
    from nexedge.serve.camerasim import escapes_overkill, format_summary, load_images, run_sim

    skipped: List[str] = []
    images = load_images(args.folder, args.limit, skipped)
    res = run_sim(args.connect, images, cameras=args.cameras, rate=args.rate, frames=args.frames,
                  duration=0.0 if args.frames else args.duration, mode=args.mode, window=args.window,
                  timeout_s=args.timeout, prefix=args.prefix)
    s = res.summary()
    s["skipped"] = skipped
    good = args.good_class or (_good_class(args.folder, set(s["by_label"])) if s["by_label"] else None)
    if s["by_label"] and good:
        s["good_class"] = good
        s.update({k: v for k, v in escapes_overkill(s["by_label"], good).items() if k != "binary"})
    print(json.dumps(s, indent=2) if args.json else format_summary(s, good))
    # Lost verdicts or a camera error mean the line would have stopped: say so in the exit code.
    return 0 if not s["lost"] and not s["errors"] and s["received"] == s["sent"] else 3
