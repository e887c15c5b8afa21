"""``nexedge camera-sim`` (stream a folder of images to a running daemon from N simulated cameras) and
``nexedge line`` (manage a running daemon's models: load, shadow report, promote, rollback)."""

import argparse
import json
import os
import sys
import time
from typing import List, Optional

from nexedge.cliopts import Key, add_curve_key_options, add_kw_option, uses_globals
from nexedge.serve.camerasim import MODES


def configure_camera_sim(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder of images (PNG/JPEG/BMP/TIFF, searched recursively)")
    p.add_argument("--connect", default="tcp://127.0.0.1:5555", help="daemon frames endpoint (default %(default)s)")
    p.add_argument("--cameras", type=int, default=2, help="number of simulated cameras (default %(default)s)")
    p.add_argument("--rate", type=float, default=10.0,
                   help="frames per second per camera; 0 = as fast as --sim-kw window allows (default %(default)s)")
    p.add_argument("--frames", type=int, default=0, help="frames per camera (default: run for --duration)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds to stream when --frames is 0 (default %(default)s)")
    p.add_argument("--mode", choices=MODES, default="native",
                   help="native: files as they are; native-raw: decoded arrays; imagezmq-raw / imagezmq-jpg: the "
                        "unmodified imagezmq ImageSender (default %(default)s)")
    add_kw_option(p, "--sim-kw", {
        "window": Key("window", int, 64, "native: max unanswered frames per camera"),
        "timeout": Key("timeout", float, 10.0, "seconds to wait for outstanding verdicts"),
        "limit": Key("limit", int, 0, "use at most this many images from the folder; 0 = all"),
        "prefix": Key("prefix", str, "cam", "camera name prefix"),
    }, help="simulator settings")
    p.add_argument("--good-class", default=None,
                   help="with a labelled folder (FOLDER/<class>/...): the negative class, for escapes (defects "
                        "PASSed) and overkill (good REJECTed) (default: good_class of the data set's "
                        "dataset.json in FOLDER or above it, else 'good' when there is such a folder)")
    uses_globals(p, "--json")


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


LINE_ACTIONS = {
    "status": "show the active, candidate and previous models",
    "load": "load ARTIFACT beside the active model (shadow) or in its place (--as active)",
    "promote": "make the candidate active; the old model stays loaded for rollback",
    "rollback": "make the previous model active again; the rolled-back one is unloaded",
    "unload": "unload the candidate (or --slot previous)",
    "report": "the candidate's shadow statistics per camera (agreement, correlation, skipped)",
}


def configure_line(p: argparse.ArgumentParser) -> None:
    p.description = ("Manage the models of a running nexedge-daemon through its control endpoint "
                     "(lifecycle.control in the daemon's config; see docs/lifecycle.md).")
    p.epilog = ("typical workflow: `nexedge line load new.onnx`, watch `nexedge line report` for a shift, "
                "`nexedge line promote`; if anything looks wrong, `nexedge line rollback`.")
    p.add_argument("--connect", default="tcp://127.0.0.1:5558",
                   help="the daemon's control endpoint (lifecycle.control; default %(default)s)")
    add_curve_key_options(p)
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the reply; a load includes opening and warming the model "
                        "(default %(default)s)")
    p.add_argument("--who", default=os.environ.get("USER", ""),
                   help="your name for the daemon's change log without CurveZMQ (with it, the key's name is "
                        "logged; default: $USER)")
    uses_globals(p, "--json")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in LINE_ACTIONS.items():
        a = sub.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".")
        if name == "load":
            from nexedge.runtime.registry import suffix_text

            a.add_argument("artifact", help=f"model artifact ({suffix_text(line=True)}) with its card, as a path on "
                                            "the line machine (relative paths are made absolute here)")
            a.add_argument("--as", dest="as_", choices=("candidate", "active"), default="candidate",
                           help="candidate: shadow it first (default); active: hot-swap to it at once")
        if name == "unload":
            a.add_argument("--slot", choices=("candidate", "previous"), default="candidate",
                           help="which model to unload (default %(default)s)")


def _fmt_slot(name: str, s: Optional[dict]) -> str:
    if not s:
        return f"{name:<10} -"
    return (f"{name:<10} {s['model_id']}  threshold {s['threshold']:.6g} ({s['threshold_source']})  "
            f"~{s['memory_bytes'] / 1048576:.0f} MiB  {s['path']}")


def format_status(st: dict) -> str:
    lines = [_fmt_slot(k, st.get(k)) for k in ("active", "candidate", "previous")]
    lim = st.get("memory_limit_bytes")
    lines.append(f"memory     ~{st['resident_bytes'] / 1048576:.0f} MiB resident"
                 + (f" of {lim / 1048576:.0f} MiB allowed" if lim else "") + f", at most {st['max_models']} models")
    if st.get("auto_rollback"):
        a = st["auto_rollback"]
        low = (f"a low reject rate from frame {a['lower_fires_from']} on" if a.get("lower_fires_from") is not None
               else "NOT a low reject rate (baseline too short)")
        lines.append(f"watching   {a['model_id']}: automatic rollback armed for {a['watch']} frames against "
                     f"{a['baseline_rejects']} rejects in {a['baseline']} of the previous model's; catches {low}")
    if st.get("auto_promote"):
        lines.append(f"promotion  {st['auto_promote']}")
    for h in st.get("history", [])[-5:]:
        lines.append(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h['time']))} {h['event'][6:]:<9} by "
                     f"{h['who']}: {h.get('old_model_id')} -> {h.get('new_model_id')}")
    return "\n".join(lines)


def format_report(rep: dict) -> str:
    if not rep.get("candidate"):
        return "no shadow statistics yet (load a candidate with `nexedge line load ARTIFACT`)"
    agree = rep.get("agreement")
    lines = [f"candidate {rep['candidate']}: {rep['frames']} frames scored, {rep['disagree']} disagreements "
             f"({'-' if agree is None else f'{100 * agree:.2f} % agreement'}), {rep['skipped']} skipped"]
    lines.append(f"{'camera':<16} {'frames':>7} {'agree %':>8} {'P/P':>6} {'P/R':>6} {'R/P':>6} {'R/R':>6} "
                 f"{'corr':>7} {'skipped':>8}   (active/candidate)")
    for cam, s in rep.get("cameras", {}).items():
        m = s["matrix"]
        corr = "-" if s["correlation"] is None else f"{s['correlation']:.4f}"
        pct = "-" if s["agreement"] is None else f"{100 * s['agreement']:.2f}"
        lines.append(f"{cam:<16} {s['frames']:>7} {pct:>8} {m['PASS/PASS']:>6} {m['PASS/REJECT']:>6} "
                     f"{m['REJECT/PASS']:>6} {m['REJECT/REJECT']:>6} {corr:>7} {s['skipped_total']:>8}")
    return "\n".join(lines)


def run_line(args: argparse.Namespace) -> int:
    from nexedge.serve.control import ControlClient

    curve = None
    if args.client_key or args.server_key:
        if not (args.client_key and args.server_key):
            raise ValueError("CurveZMQ needs both --client-key (yours, *.key_secret) and --server-key (the daemon's "
                             "*.key)")
        from nexedge.serve.auth import CurveClient

        curve = CurveClient(args.client_key, args.server_key)
    fields: dict = {"who": args.who} if args.who else {}
    if args.action == "load":
        fields.update(path=os.path.abspath(args.artifact), **{"as": args.as_})
        print(f"loading {fields['path']} as {args.as_} (the line keeps inspecting meanwhile) ...", file=sys.stderr)
    if args.action == "unload":
        fields["slot"] = args.slot
    with ControlClient(args.connect, args.timeout, curve) as c:
        reply = c.call(args.action, **fields)
    if args.json:
        print(json.dumps(reply, indent=2))
    elif not reply.get("ok"):
        pass
    elif args.action == "report":
        print(format_report(reply.get("report") or {}))
    else:
        print(format_status(reply["status"]))
    if not reply.get("ok"):
        print(f"nexedge line {args.action}: refused: {reply.get('error')}", file=sys.stderr)
        return 1
    return 0
