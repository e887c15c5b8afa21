"""CLI of the relabeling loop: ``nexedge pull``, ``nexedge import-labels``, ``nexedge keys``."""

import argparse
import datetime as _dt
import json
from typing import List, Optional

from nexedge.cliopts import Key, add_curve_key_options, add_kw_option, uses_globals

FORMAT_CHOICES = ("manifest", "labelstudio", "folders", "cleanlab")


def _time(text: Optional[str]) -> Optional[float]:
    """Epoch seconds or ISO 8601 (naive = UTC) -> epoch seconds."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"time {text!r}: expected epoch seconds or ISO 8601 like 2026-11-28T14:00:00Z") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.timestamp()


def _formats(values: Optional[List[str]]) -> List[str]:
    out = ["manifest"]
    for v in values or []:
        for f in v.split(","):
            f = f.strip()
            if f not in FORMAT_CHOICES:
                raise ValueError(f"--format {f!r}: expected some of {', '.join(FORMAT_CHOICES)}")
            if f not in out:
                out.append(f)
    return out


def configure_pull(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("source (exactly one)")
    src.add_argument("--store", metavar="PATH", help="a sample-store folder on this machine")
    src.add_argument("--connect", metavar="ENDPOINT", help="a daemon's pull endpoint, e.g. tcp://line3:5557")
    src.add_argument("--mislabels", metavar="CSV", help="a `nexedge mislabels` CSV to review (needs --dataset)")
    p.add_argument("--out", required=True, metavar="DIR", help="export folder (re-running resumes into it)")
    p.add_argument("--format", action="append", metavar="FMT",
                   help=f"extra formats besides manifest.jsonl: {', '.join(FORMAT_CHOICES[1:])} (repeat or comma-separate)")
    add_curve_key_options(p)
    f = p.add_argument_group("filters")
    f.add_argument("--camera", help="only this camera id")
    f.add_argument("--since", help="frames at or after this time (epoch s or ISO 8601, UTC)")
    f.add_argument("--until", help="frames before this time")
    f.add_argument("--decision", choices=("PASS", "REJECT", "RECHECK"), help="only this decision")
    f.add_argument("--reason", help="only this reason (e.g. band, audit, deadline)")
    f.add_argument("--kind", choices=("band", "audit", "recheck", "drift", "shadow"),
                   help="only this kind of sample; shadow: the frames where a shadow candidate disagreed with the "
                        "active model (see docs/lifecycle.md)")
    f.add_argument("--limit", type=int, help="pull at most this many samples")
    p.add_argument("--dataset", metavar="ROOT", help="data set root the --mislabels paths refer to")
    p.add_argument("--all-rows", action="store_true", help="with --mislabels: every row, not only flagged ones")
    p.add_argument("--top", type=int, help="with --mislabels: the N most suspicious rows")
    p.add_argument("--classes", help="class list for the exports (comma-separated; default: from the probabilities)")
    p.add_argument("--ls-url-prefix", help="prefix of image URLs in Label Studio tasks (default: local-files "
                                           "serving with document root /)")
    add_kw_option(p, "--transport-kw", {
        "page_size": Key("page_size", int, 64, "samples per request"),
        "timeout": Key("timeout", float, 10.0, "seconds to wait for each reply"),
        "retries": Key("retries", int, 3, "re-sends of a request that got no reply"),
    }, help="--connect: how pages are fetched")
    uses_globals(p, "--no-progress")


def run_pull(args: argparse.Namespace) -> int:
    import os

    from nexedge.relabel.formats import MANIFEST, export_formats
    from nexedge.relabel.pull import open_source, pull
    from nexedge.relabel.review import export_mislabels

    formats = _formats(args.format)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    if args.mislabels:
        if args.store or args.connect:
            raise ValueError("give exactly one of --store, --connect or --mislabels")
        if not args.dataset:
            raise ValueError("--mislabels needs --dataset ROOT (the data set its paths refer to)")
        counts = export_mislabels(args.mislabels, args.dataset, args.out, flagged_only=not args.all_rows, top=args.top)
        if classes is None:  # the data set's class folders, in the trainer's (sorted) order
            from nexedge.relabel.importer import Dataset

            classes = sorted(Dataset(args.dataset).classes)
    else:
        if "cleanlab" in formats:  # checked before anything is pulled and acknowledged
            raise ValueError("--format cleanlab needs a given label and class probabilities per image; samples "
                             "pulled from a line have no label. Pull with labelstudio or folders, label them, "
                             "`nexedge import-labels`; or use cleanlab with --mislabels CSV --dataset ROOT")
        filters = {"camera": args.camera, "since": _time(args.since), "until": _time(args.until),
                   "decision": args.decision, "reason": args.reason, "kind": args.kind}
        src = open_source(args.store, args.connect, args.client_key, args.server_key, args.timeout, args.retries)
        try:
            counts = pull(src, args.out, filters=filters, limit=args.limit, page_size=args.page_size,
                          progress=not args.no_progress)
        finally:
            src.close()
        if not os.path.exists(os.path.join(args.out, MANIFEST)):
            print(f"nothing pending in {args.store or args.connect}"
                  f"{' matching the filters' if any(v is not None for v in filters.values()) else ''}; "
                  f"nothing written to {args.out}")
            print(json.dumps({"counts": counts, "written": {}}))
            return 0
    try:
        written = export_formats(args.out, formats, classes=classes, ls_url_prefix=args.ls_url_prefix)
    except ValueError as e:
        raise ValueError(f"{e}. The pulled samples are safe in {os.path.join(args.out, MANIFEST)}: fix the "
                         f"option and run the same `nexedge pull --out {args.out}` again to write the formats") from None
    print(json.dumps({"counts": counts, "written": {k: len(v) for k, v in written.items()}}))
    return 0


def configure_import_labels(p: argparse.ArgumentParser) -> None:
    p.add_argument("labels", metavar="FILE", help="Label Studio export (JSON or JSON-MIN) or CSV (path|sha256, label)")
    p.add_argument("--dataset", required=True, metavar="ROOT", help="data set root (<root>/<split>/<class>/...)")
    p.add_argument("--split", default="train", choices=("train", "val", "test"),
                   help="split that new images go to (images already in the data set stay in theirs)")
    p.add_argument("--relabel", action="store_true",
                   help="an image already in the data set under another class is moved to the annotator's "
                        "class (with a provenance row); by default it is left as it is and reported")
    p.add_argument("--images", metavar="DIR", help="the `nexedge pull --out` folder the labelled images came from")
    p.add_argument("--source", help="provenance source name (default: the labels file name)")
    p.add_argument("--skip-bad", action="store_true", help="import the good rows and report the bad ones "
                                                           "(default: any bad row stops the import)")
    p.add_argument("--dry-run", action="store_true", help="validate and report, write nothing")


def run_import_labels(args: argparse.Namespace) -> int:
    import sys

    from nexedge.relabel.importer import import_labels

    res = import_labels(args.labels, args.dataset, split=args.split, images_dir=args.images, skip_bad=args.skip_bad,
                        dry_run=args.dry_run, source=args.source, relabel=args.relabel)
    for e in res["errors"]:
        print("skipped: " + e, file=sys.stderr)
    print(json.dumps(res["counts"]))
    return 0


def configure_keys(p: argparse.ArgumentParser) -> None:
    from nexedge.serve.auth import ROLE_DIRS

    p.description = ("Make a CurveZMQ key pair. The daemon's own pair needs no role; a client's key has one: "
                     + "; ".join(f"{r} keys go in ALLOWED/{d}/" for r, d in ROLE_DIRS.items())
                     + " (camera: the frames socket; puller: the pull endpoint; operator: the control endpoint "
                     "(nexedge line); every role may subscribe to verdicts). A camera key cannot load a model or "
                     "pull samples.")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the key files")
    p.add_argument("--name", required=True, help="key pair name, e.g. daemon-line3 or laptop-alice")
    p.add_argument("--role", choices=sorted(ROLE_DIRS), help="what this client may do (see above)")
    p.add_argument("--allow", metavar="ALLOWED", help="with --role: copy the public key into this allow-list "
                   "folder (the daemon's auth.allowed_clients_dir), in the role's sub-folder")


def run_keys(args: argparse.Namespace) -> int:
    from nexedge.relabel.keys import allow_key, make_keys, usage_note

    if args.allow and not args.role:
        raise ValueError("--allow needs --role camera|puller|operator: the folder says what the key may do")
    paths = make_keys(args.out, args.name)
    allowed = allow_key(paths["public"], args.allow, args.role) if args.allow else None
    print(usage_note(paths, args.name, args.role, allowed))
    return 0
