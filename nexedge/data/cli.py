"""``nexedge synth`` and ``nexedge split`` (light imports: numpy and OpenCV only)."""

import argparse
import json
import os
from typing import Optional, Tuple

from nexedge.cliopts import Key, add_kw_option, boolean, uses_globals
from nexedge.data.spec import BATCHES, DEFAULT_LOOK, LOOKS, parse_class_counts


def parse_size(text: str) -> Tuple[int, int]:
    """``"275x267"`` (width x height) or ``"96"`` (square) -> (width, height)."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"bad --size {text!r}; expected WIDTHxHEIGHT like 275x267, or one number") from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2:
        raise ValueError(f"bad --size {text!r}; expected WIDTHxHEIGHT like 275x267, or one number")
    from nexedge.data.synth import check_size

    return check_size(nums)


def configure_synth(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Render a synthetic Nexperia-like data set: OUT/{train,val,test}/<class>/*.png split like the "
        "report (10% test, 10% of the rest val, at least one of each class in both), manifest.jsonl "
        "(path, split, label, true_label, bbox, severity, batch, noisy, ...) and dataset.json."
    )
    p.add_argument("out", nargs="?", help="output folder (must not hold a data set yet)")
    p.add_argument("--n", type=int, default=None, help="number of images (default 2000; class mix of the batch)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data set (default 0)")
    p.add_argument("--batch", type=int, default=2,
                   help="production batch 1|2|3: optics, camera and package differ; 3 adds tin_particle "
                        "and camera_glitch classes (default 2)")
    p.add_argument("--noise", type=float, default=0.01,
                   help="fraction of defect images written with label good (default 0.01)")
    p.add_argument("--size", default="275x267", help="image WIDTHxHEIGHT or one number (default 275x267, native)")
    p.add_argument("--workers", type=int, default=0, help="render processes (default 0 = one per core)")
    p.add_argument("--class-counts", default=None, metavar="CLS=N,...",
                   help="exact images per class, e.g. good=900,scratch=50 (0 or >= 3 each; others 0)")
    p.add_argument("--good-fraction", type=float, default=None,
                   help="fraction of good images; defects keep the batch's relative mix")
    p.add_argument("--contact-sheet", default=None, metavar="PNG",
                   help="also (or only, without OUT) write a contact sheet: one labelled row per class")
    add_kw_option(p, "--sheet-kw", {
        "per_class": Key("sheet_per_class", int, 5, "images per row"),
        "scale": Key("sheet_scale", float, 0.45, "tile scale"),
        "boxes": Key("sheet_boxes", boolean, False, "true: draw defect bounding boxes"),
    }, help="contact sheet layout")
    p.add_argument("--look", choices=LOOKS, default=DEFAULT_LOOK,
                   help="renderer look: legacy (default; every published demo and benchmark number uses it) or "
                        "real (calibrated against real line images; opt-in until the demo is re-measured on it)")
    g = p.add_argument_group("realism report (compares synthetic images with real ones; needs torch)")
    g.add_argument("--realism", default=None, metavar="REFERENCE_DIR",
                   help="measure how far the synthetic images are from the real images in REFERENCE_DIR "
                        "(index.csv with file,label columns, class sub-folders, or LABEL__name files): "
                        "per-region intensity stats, noise spectra, KID on ImageNet EfficientNet-Lite0 "
                        "features and a leave-one-out real-vs-synthetic classifier")
    add_kw_option(g, "--realism-kw", {
        "looks": Key("realism_looks", str, None, "LOOK,...: looks to measure side by side; default: --look; e.g. "
                     "legacy,real for before/after"),
        "n": Key("realism_n", int, 90, "synthetic images per look"),
        "json": Key("realism_json", str, None, "PATH: also write the figures as JSON"),
        "figure": Key("realism_figure", str, None, "PNG: also write real references and synthetic images of the "
                      "same classes side by side"),
        "stretch": Key("realism_stretch", boolean, True, "false: compare without the min-max stretch; by default "
                       "both sides are stretched, as the public Nexperia references were by matplotlib"),
    }, help="realism report settings")
    uses_globals(p, "--no-progress")


def run_synth(args: argparse.Namespace) -> int:
    if args.batch not in BATCHES:
        raise ValueError(f"--batch {args.batch} is not a known production batch; expected one of {list(BATCHES)}")
    if not args.out and not args.contact_sheet and not args.realism:
        raise ValueError("nothing to do: give an output folder OUT, --contact-sheet PNG and/or --realism DIR")
    size = parse_size(args.size)
    counts = parse_class_counts(args.class_counts, args.batch) if args.class_counts else None
    if args.out:
        from nexedge.data.generate import generate

        n: Optional[int] = args.n
        if n is None and counts is None:
            n = 2000
        summary = generate(args.out, n=n, seed=args.seed, batch=args.batch, noise=args.noise, size=size,
                           workers=args.workers, progress=not args.no_progress, class_counts=counts,
                           good_fraction=args.good_fraction, look=args.look)
        tot = {s: sum(c.values()) for s, c in summary["counts"].items()}
        print(f"wrote {summary['n']} images to {args.out} (train {tot['train']}, val {tot['val']}, "
              f"test {tot['test']}; {summary['n_noisy']} noisy labels) in {summary['seconds']:.1f} s, "
              f"{summary['images_per_s']} images/s with {summary['workers']} worker(s)")
    if args.contact_sheet:
        from nexedge.data.contact import contact_sheet

        path = contact_sheet(args.contact_sheet, batch=args.batch, per_class=args.sheet_per_class, seed=args.seed,
                             size=size, scale=args.sheet_scale, boxes=args.sheet_boxes, look=args.look)
        print(f"wrote contact sheet {path}")
    if args.realism:
        from nexedge.data.realism import run_realism

        looks = [x.strip() for x in (args.realism_looks or args.look).split(",") if x.strip()]
        bad = [x for x in looks if x not in LOOKS]
        if bad or not looks:
            raise ValueError(f"bad --realism-kw looks={args.realism_looks!r}; expected a comma list of {list(LOOKS)}")
        run_realism(args.realism, looks, n=args.realism_n, batch=args.batch, seed=args.seed,
                    stretch=args.realism_stretch, out_json=args.realism_json, figure=args.realism_figure)
    return 0


def configure_split(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Split SRC/<class>/<image> into OUT/{train,val,test}/<class>/ like the report: per class 10% to "
        "test, 10% of the rest to val (exactly one each for classes under 10 images); writes "
        "manifest.jsonl and dataset.json. Deterministic for a seed."
    )
    p.add_argument("src", help="folder with one sub-folder of images per class")
    p.add_argument("out", help="output folder (must not hold a data set yet)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--link", nargs="?", const="hard", default=None, choices=["hard", "sym"],
                   help="link instead of copying: hard (default for bare --link) or sym")
    p.add_argument("--good-class", default=None,
                   help="the negative (pass) class, recorded in dataset.json; `nexedge train` uses it as its "
                        "default --good-class (default: 'good' when there is such a folder)")
    uses_globals(p, "--json", "--no-progress")


def run_split(args: argparse.Namespace) -> int:
    from nexedge.data.split import SPLITS, split_folder

    s = split_folder(args.src, args.out, seed=args.seed, link=args.link, progress=not args.no_progress,
                     good_class=args.good_class)
    if args.json:
        print(json.dumps({k: s[k] for k in ("out", "n", "counts", "good_class", "aspect", "unreadable", "skipped")},
                         indent=1))
        return 0
    classes = sorted({c for split in s["counts"].values() for c in split})
    w = max(len(c) for c in classes + ["class"])
    print(f"split {s['n']} images into {s['out']} (negative class: {s['good_class'] or 'not set, use --good-class'})")
    print(f"  {'class':<{w}}  " + "  ".join(f"{x:>5}" for x in SPLITS))
    for c in classes:
        print(f"  {c:<{w}}  " + "  ".join(f"{s['counts'][x].get(c, 0):>5}" for x in SPLITS))
    from nexedge.data.aspect import describe

    shape = s["aspect"]
    print(f"  {describe(shape)}")
    print(f"  resize mode for `nexedge train` at a square --resize: --resize-mode {shape['advice']['mode']}: {shape['advice']['reason']}")
    if shape.get("class_note"):
        print(f"  note: {shape['class_note']}")
    for r in s["unreadable"]:
        print(f"  left out (unreadable): {r['path']}: {r['reason']}")
    for r in s["skipped"]:
        print(f"  skipped: {r['path']}: {r['reason']}")
    if s["unreadable"] or s["skipped"]:
        print(f"  listed in {os.path.join(s['out'], 'split_report.json')}")
    return 0
