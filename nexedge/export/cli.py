"""``nexedge export``, ``nexedge calibrate``, ``nexedge build-engine``, ``nexedge check-onnx``.

Light at import (argparse only); torch, onnx, onnxruntime and tensorrt are
imported inside the ``run_*`` functions.
"""

import argparse
import json
from typing import Any

from nexedge.card import GRAPH_CROPS
from nexedge.cliopts import Key, add_kw_option, add_tpr_floor_option, boolean, choice, uses_globals
from nexedge.threads import given


def configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR",
                   help="trained checkpoint (.pt) with its .card.json beside it, or a run folder (its best.pt)")
    p.add_argument("--crops", default="host", choices=GRAPH_CROPS + ("auto",),
                   help="host: float crops in, logits out (host does the crops); center|five|ten: uint8 "
                        "prepared images in, crops+softmax in the graph, probs/defect_score out; auto: measure "
                        "center, five and ten (ten only for a model trained with --flip h) on the validation split "
                        "through ONNX Runtime and export the one with the lowest FPR at --auto-kw tpr (then the "
                        "highest AUC, then the fewest crops) in the graph (default: host)")
    p.add_argument("--aggregate", default=None,
                   help="how an image's crops become its score: mean (of the logits, the report's way; default) or "
                        "max (the crop with the highest defect score). With --crops auto a comma list of the "
                        "aggregates to try (default mean)")
    add_kw_option(p, "--auto-kw", {
        "tpr": Key("auto_tpr", float, 1.0, "--crops auto compares the candidates' FPR at this TPR (fraction; 1.0 is "
                   "the daemon's default operating point)"),
        "allow_unseen_mirrors": Key("allow_unseen_mirrors", boolean, False,
                                    "true: export TenCrop (five mirrored crops) for a model trained without "
                                    "horizontal mirrors; refused by default: on magnetic tiles it cost 55 points "
                                    "of FPR at TPR 100 %"),
    }, help="how --crops chooses and what it allows")
    p.add_argument("--ensemble-rule", default="median", choices=("median", "mean", "max"),
                   help="a CV run folder (train --cv K) only: how the fold models' aligned scores combine. median "
                        "(default): REJECT when at least half of them reach their thresholds; mean: their mean "
                        "log-odds; max: when any does (the tightest escape guarantee, the most overkill). The card "
                        "states what each guarantees (docs/training.md)")
    p.add_argument("-o", "--out", help="output .onnx (default: <checkpoint stem>.<crops>.onnx)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="largest batch in images the runtime may send (card graph.max_batch; default 64)")
    add_kw_option(p, "--parity-kw", {
        "data": Key("parity_data", str, None, "folder of images or data-set root (val/ preferred); without it "
                    "parity runs on generated images and the card says so"),
        "images": Key("parity_images", int, 16, "images used"),
        "tolerance": Key("tolerance", float, 1e-4, "max abs probability difference ONNX vs torch"),
    }, help="the ONNX-vs-torch parity check")
    p.add_argument("--data", help="labelled data-set root on which the ONNX model's own operating points are "
                                  "measured (default: the trainer's data root, if still there)")
    p.add_argument("--split", default="val", help="split the operating points are measured on (default val)")
    add_tpr_floor_option(p)
    add_cascade_args(p, stage1=False)
    uses_globals(p, "--threads", torch=True)


def add_cascade_args(p: argparse.ArgumentParser, stage1: bool = True) -> None:
    p.add_argument("--cascade", action="store_true",
                   help="also measure the cascade band (center crop first, full crops only near the threshold) on "
                        "the same split and write it into the card; in-graph models get their center-crop stage-1 "
                        "graph exported beside them" if not stage1 else
                        "also measure the cascade band (center-crop stage 1, full crops only near the threshold); "
                        "re-measured anyway when the card already has one")
    p.add_argument("--cascade-margin", type=float, metavar="LOGODDS",
                   help="widen the narrowest band that agrees 100%% with full crops by this much on each side, in "
                        "log-odds of the defect score (default 1.0, or the card's)")
    if stage1:
        p.add_argument("--stage1", metavar="ONNX",
                       help="stage-1 model (center crops, same weights) of an in-graph artifact whose card does not "
                            "name one")


def run_export(args: argparse.Namespace) -> int:
    from nexedge.export.onnx_export import export_onnx
    from nexedge.runs import resolve_artifact
    from nexedge.train.cv import is_cv_run

    if is_cv_run(args.checkpoint):
        from nexedge.export.ensemble import export_cv, format_ensemble

        aggs = [a.strip() for a in (args.aggregate or "mean").split(",") if a.strip()]
        crops = "auto" if args.crops == "host" else args.crops
        ens = export_cv(args.checkpoint, out=args.out, crops=crops, aggregates=aggs, target_tpr=args.auto_tpr,
                        max_batch=args.max_batch, parity_data=args.parity_data, parity_images=args.parity_images,
                        tolerance=args.tolerance, threads=args.threads, allow_unseen_mirrors=args.allow_unseen_mirrors,
                        rule=args.ensemble_rule)
        from nexedge.export.auto import format_selection

        print(format_selection(ens.selection))
        print(f"wrote {ens.path} and {ens.card_path}")
        print("parity: " + json.dumps(ens.parity))
        print(format_ensemble(ens.card))
        return 0
    common = dict(max_batch=args.max_batch, parity_data=args.parity_data, parity_images=args.parity_images,
                  tolerance=args.tolerance, threads=args.threads, data=args.data, split=args.split,
                  cascade=args.cascade, cascade_margin=args.cascade_margin,
                  allow_unseen_mirrors=args.allow_unseen_mirrors)
    if args.crops == "auto":
        from nexedge.export.auto import auto_export, format_selection

        aggs = [a.strip() for a in (args.aggregate or "mean").split(",") if a.strip()]
        res, selection = auto_export(resolve_artifact(args.checkpoint), out=args.out, target_tpr=args.auto_tpr,
                                     aggregates=aggs, **common)
        print(format_selection(selection))
    else:
        if args.aggregate is not None and args.aggregate not in ("mean", "max"):
            raise ValueError(f"--aggregate {args.aggregate!r}: expected mean or max (a comma list only with "
                             "--crops auto)")
        res = export_onnx(resolve_artifact(args.checkpoint), out=args.out, crops=args.crops,
                          aggregate=args.aggregate, **common)
    from nexedge.export.thresholds import format_points

    print(f"wrote {res.path} and {res.card_path}")
    print("parity: " + json.dumps(res.parity))
    print(format_points(res.card, args.tpr_floor))
    if res.card.data.get("cascade"):
        print(format_cascade(res.card))
    return 0


def format_cascade(card: Any) -> str:
    """Console lines of a card's cascade bands ('' when it has none)."""
    sec = card.data.get("cascade")
    if not sec:
        return ""
    lines = [f"cascade ({sec.get('status')}, split {sec.get('split')!r}, stage 1 {sec['stage1'].get('crops')} "
             f"{sec['stage1'].get('file') or '(same model)'}, margin {sec.get('margin_logit')} log-odds):",
             f"{'target TPR':>10}  {'threshold':>11}  {'band lo':>11}  {'band hi':>11}  {'held-out agree':>14}  "
             f"{'disagree <=':>11}  {'at margin 0':>11}  stage-2 share"]

    def held(ho: Any) -> str:
        return "-" if not ho else f"{100 * ho['agreement']:.2f}%"

    for b in sec.get("bands") or []:
        ho, h0 = b.get("held_out"), b.get("held_out_margin0")
        upper = "-" if not ho else f"{100 * ho['disagreement_upper']:.2f}%"
        lines.append(f"{100 * b['target_tpr']:>9.1f}%  {b['threshold']:>11.4g}  {b['lo']:>11.4g}  {b['hi']:>11.4g}  "
                     f"{held(ho):>14}  {upper:>11}  {held(h0):>11}  {100 * b['stage2_fraction']:.1f} %")
    lines.append("(held-out: leave-one-out over the split, each image decided by the band fitted without it; "
                 "'disagree <=' its 95 % upper bound; in-sample agreement is 100 % by construction)")
    return "\n".join(lines)


def configure_thresholds(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="checkpoint (.pt), ONNX (any flavour, INT8 too) or engine, with its card; "
                                    "or a run folder (its best.pt)")
    p.add_argument("--data", required=True, help="labelled data-set root with <split>/<class>/<image> folders")
    p.add_argument("--split", default="val", help="split to measure on (default val; keep test for reporting)")
    add_tpr_floor_option(p)
    p.add_argument("--batch", type=int, default=16, help="images per inference call (default 16)")
    add_cascade_args(p)
    uses_globals(p, "--threads")


def run_thresholds(args: argparse.Namespace) -> int:
    from nexedge.export.thresholds import format_points, measure_artifact
    from nexedge.runs import resolve_artifact
    from nexedge.runtime import registry

    args.artifact = resolve_artifact(args.artifact)
    opts = registry.from_flags(registry.backend_for(args.artifact).name, threads=given(args))
    m = measure_artifact(args.artifact, args.data, args.split, floor=args.tpr_floor, batch=args.batch,
                         backend_options=opts, progress=True, cascade=args.cascade or None,
                         margin=args.cascade_margin, stage1=args.stage1)
    print(f"wrote {m.card_path}")
    print(format_points(m.card, args.tpr_floor))
    if m.card.data.get("cascade"):
        print(format_cascade(m.card))
    return 0


def configure_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx", help="fp32 ONNX model (from `nexedge export`) with its card")
    p.add_argument("--data", required=True, help="data-set root with <split>/<class>/<image> folders")
    p.add_argument("--name", help="calibration set name: calibrate/<name>/ (default: the model file stem)")
    p.add_argument("--images", type=int, default=512, help="calibration images, class stratified (default 512)")
    p.add_argument("--split", default="train", help="split the calibration images come from (default train)")
    add_kw_option(p, "--report-kw", {
        "thresholds_split": Key("thresholds_split", str, "val", "labelled split on which each INT8 model's own "
                                "operating points are measured"),
        "eval_split": Key("eval_split", str, "test", "labelled split for the INT8-vs-FP32 report at the deployed "
                          "thresholds (escapes and overkill per class); must differ from thresholds_split; empty "
                          "to skip"),
        "eval_images": Key("eval_images", int, 0, "cap on report images, 0 = all"),
        "deploy_tpr": Key("deploy_tpr", float, 1.0, "target TPR of the operating point the console report shows; "
                          "1.0 is the daemon's"),
    }, help="what the INT8 models are measured and reported on")
    p.add_argument("--targets", default="tensorrt,ort",
                   help="tensorrt: symmetric int8 Q/DQ for TensorRT; ort: U8S8 Q/DQ for ONNX Runtime CPU "
                        "(default both)")
    p.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"),
                   help="range calibration method for the Q/DQ models (default minmax)")
    add_kw_option(p, "--quant-kw", {
        "ort_activations": Key("ort_activations", choice("u8", "s8"), None, "ORT target: activation type u8 "
                               "(default) or s8"),
        "ort_weights": Key("ort_weights", choice("s8", "u8"), None, "ORT target: weight type s8 (default) or u8 "
                           "(U8U8, slower on AVX2)"),
        "per_tensor": Key("per_tensor", boolean, False, "ORT target: true = one weight scale per tensor instead of "
                          "per channel"),
        "reduce_range": Key("reduce_range", boolean, False, "ORT target: true = 7-bit weights, ORT's remedy for "
                            "vpmaddubsw saturation on x86 without VNNI"),
        "quantize_stem": Key("quantize_stem", boolean, False, "true = quantize the stem convolutions too; by default "
                             "they stay float: quantizing them cost EfficientNet-Lite0 most of its INT8 ranking, "
                             "float costs 15-22 % of the INT8 speed on x86 (benchmarks/results/int8_stem.md)"),
    }, help="quantizer settings; U8S8 per-channel (the defaults) is the fastest on x86, the others trade speed "
            "for accuracy")
    p.add_argument("--calib-root", default="calibrate", help="folder of calibration sets (default calibrate)")
    p.add_argument("--out-dir", help="where INT8 models go (default: beside the fp32 model)")
    p.add_argument("--rebuild", action="store_true", help="make a new manifest even if calibrate/<name>/ has one")
    p.add_argument("--trt-cache", action="store_true",
                   help="also run TensorRT entropy calibration (needs TensorRT) and keep its cache")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the calibration set")
    p.add_argument("--force", action="store_true", help="replace INT8 models that already exist")
    uses_globals(p, "--threads")


def run_calibrate(args: argparse.Namespace) -> int:
    from nexedge.export.int8 import run_calibration

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    res = run_calibration(
        args.onnx, args.data, name=args.name, n_images=args.images, split=args.split,
        eval_split=args.eval_split or None, thresholds_split=args.thresholds_split, eval_images=args.eval_images, targets=targets, method=args.method,
        out_root=args.calib_root, out_dir=args.out_dir, rebuild=args.rebuild, trt_cache=args.trt_cache,
        seed=args.seed, threads=args.threads, force=args.force,
        ort={"activations": args.ort_activations, "weights": args.ort_weights,
             "per_channel": False if args.per_tensor else None, "reduce_range": True if args.reduce_range else None},
        float_stem=not args.quantize_stem,
    )
    print(f"calibration set: {res.manifest}")
    for target, path in res.outputs.items():
        rep = res.reports.get(target) or {}
        print(format_int8_line(target, path, rep))
        dep = next((d for d in (rep or {}).get("deployed", []) if abs(d["target_tpr"] - args.deploy_tpr) < 1e-9),
                   None)
        if dep:
            print(format_deployed(dep, rep))
    if res.trt_cache:
        print(f"TensorRT calibration cache: {res.trt_cache}")
    return 0


def format_int8_line(target: str, path: str, rep: dict) -> str:
    """``<target>: <path>  AUC fp32 .. int8 .. (delta with its 95 % interval) on <split>``."""
    line = f"{target}: {path}"
    if rep:
        ci = rep.get("auc_delta_ci95_points") or [float("nan")] * 2
        line += (f"  AUC fp32 {rep['auc_fp32']:.4f} int8 {rep['auc_int8']:.4f} ({rep['auc_delta_points']:+.2f} points, "
                 f"95 % CI {ci[0]:+.2f} to {ci[1]:+.2f}, DeLong paired, {rep['n_images']} images) on {rep['split']}")
    return line


def format_deployed(dep: dict, rep: dict) -> str:
    """Escapes and overkill per class at the deployed operating point, FP32 beside INT8."""
    lines = [f"  at the deployed point TPR {100 * dep['target_tpr']:g} % on {rep['split']} "
             f"({rep['n_defects']} defect, {rep['n_good']} good; thresholds fp32 {dep['threshold_fp32']:.4g} "
             f"int8 {dep['threshold_int8']:.4g} from {rep['thresholds_from']['int8']}):",
             ""]
    w = max([5] + [len(c) for c in dep["per_class"]])
    lines[-1] = f"    {'class':<{w}}  {'counted':<8}  {'images':>6}  {'fp32':>5}  {'int8':>5}"
    for cls, row in dep["per_class"].items():
        what = "overkill" if "overkill" in row["fp32"] else "escapes"
        lines.append(f"    {cls:<{w}}  {what:<8}  {row['fp32']['n']:>6}  {row['fp32'][what]:>5}  {row['int8'][what]:>5}")
    lines.append(f"    total escapes fp32 {dep['escapes_fp32']} int8 {dep['escapes_int8']}, overkill fp32 "
                 f"{dep['overkill_fp32']} int8 {dep['overkill_int8']}; decisions that differ from fp32: "
                 f"{100 * dep['flip_fraction_defect']:.1f} % of defects, {100 * dep['flip_fraction_good']:.1f} % of good")
    return "\n".join(lines)


def configure_build_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx", help="ONNX model with its card: fp32, or the Q/DQ *.int8-trt.onnx from calibrate")
    p.add_argument("--recipe", help="per-target settings (trt_engines/recipes/*.yaml); flags given here win")
    p.add_argument("--precision", help="fp16 (default), int8 or fp32")
    p.add_argument("--max-batch", type=int,
                   help="largest batch in images (default: the card's graph.max_batch); host-crop models "
                        "multiply it by the crops per image")
    p.add_argument("--opt-batch", type=int, help="batch in images TensorRT tunes for (default min(8, max))")
    p.add_argument("--dla-core", type=int, help="build for this DLA core (Jetson), GPU fallback on")
    add_kw_option(p, "--build-kw", {
        "workspace_mib": Key("workspace_mib", int, None, "builder workspace limit in MiB; default 1024"),
        "version_compatible": Key("version_compatible", boolean, None, "true: the engine runs on later TensorRT "
                                  "versions too (8.6+; slower to load)"),
        "calib_cache": Key("calib_cache", str, None, "entropy-calibration cache for INT8 from an fp32 ONNX "
                           "(implicit INT8)"),
        "timing_cache": Key("timing_cache", str, None, "timing cache file to reuse and update; default "
                            "trt_engines/<device>.trt<version>.timing.cache"),
    }, help="builder settings a recipe usually carries; given here they win over it")
    p.add_argument("--out-dir", default="trt_engines", help="where engines go (default trt_engines)")
    p.add_argument("--name", help="engine name prefix (default: the ONNX file stem)")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching engine exists")
    p.add_argument("--no-check", action="store_true",
                   help="skip the static TensorRT lint (`nexedge check-onnx`) before parsing")
    p.add_argument("--data", help="labelled data-set root to re-measure the engine's operating points on "
                                  "(default: where the ONNX model's were measured)")


def build_settings(args: argparse.Namespace) -> dict:
    """Defaults < recipe < command-line flags."""
    from nexedge.export import trt_recipe, trt_rules

    settings = {"precision": "fp16", "max_batch": 0, "opt_batch": 0, "workspace_mib": 1024, "dla_core": None,
                "version_compatible": False}
    if args.recipe:
        recipe = trt_recipe.load_recipe(args.recipe)
        settings.update({k: v for k, v in recipe.items() if k in settings and v is not None})
        settings["_recipe"] = recipe
        if recipe.get("precision") is not None:
            settings["_precision_from"] = args.recipe
    for key in ("precision", "max_batch", "opt_batch", "workspace_mib", "dla_core", "version_compatible"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
            if key == "precision":
                settings.pop("_precision_from", None)
    trt_rules.check_precision(settings["precision"])
    return settings


def run_build_engine(args: argparse.Namespace) -> int:
    import os

    from nexedge.card import load_card
    from nexedge.export import cuda_device, trt_build, trt_names, trt_recipe, trt_rules

    s = build_settings(args)
    # Precision rules before anything slow, naming the recipe when the precision came from it.
    src = f" (precision int8 from {s['_precision_from']})" if "_precision_from" in s else ""
    trt_rules.int8_mode(load_card(args.onnx).precision, s["precision"], bool(args.calib_cache), source=src)
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeError("build-engine needs TensorRT (import tensorrt failed); run it on the target "
                           "device, see trt_engines/README.md") from None
    if "_recipe" in s:
        trt_recipe.check_recipe_version(s["_recipe"], trt.__version__, args.recipe)
    dev = cuda_device.device_info(0)
    timing = args.timing_cache or os.path.join(
        args.out_dir, f"{trt_names.device_tag(dev)}.trt{trt.__version__}.timing.cache")
    opts = trt_rules.BuildOptions(
        precision=s["precision"], max_batch=s["max_batch"], opt_batch=s["opt_batch"],
        workspace=s["workspace_mib"] << 20, dla_core=s["dla_core"], version_compatible=s["version_compatible"],
        calib_cache=args.calib_cache, timing_cache=timing,
    )
    path, reused = trt_build.build_engine(args.onnx, opts, out_dir=args.out_dir, name=args.name, trt=trt, device=dev,
                                          force=args.force, data=args.data, check=not args.no_check)
    print(("reused " if reused else "built ") + trt_build.describe(path))
    return report_unmeasured(path, bool(args.data))


#: ``build-engine --data`` exit status when the engine was written but its operating points could not be
#: measured on it (the card says so and why; `nexedge thresholds` measures them later).
EXIT_NOT_MEASURED = 3


def report_unmeasured(path: str, data_given: bool) -> int:
    """After a build: say what on the engine's card is not measured on it and what that means on the
    line; :data:`EXIT_NOT_MEASURED` when the operating points were asked for (``--data``) but not measured."""
    import sys

    from nexedge.card import OPS_MEASURED, load_card

    card = load_card(path)
    src = card.ops_source
    cascade = card.data.get("cascade") or {}
    if cascade and cascade.get("status") != OPS_MEASURED:
        why = cascade.get("not_measured_reason") or "no stage-1 engine or no data"
        print(f"WARNING: {path}: cascade band not measured on the engine ({why}); the daemon runs full "
              f"{card.runtime_crop_mode} crops on every frame", file=sys.stderr)
    if not card.operating_points or src.get("status") == OPS_MEASURED:
        return 0
    print(f"WARNING: {path}: operating points are the ONNX model's, NOT measured on this engine "
          f"({src.get('not_measured_reason') or 'no data'}). `nexedge line load` refuses it until "
          f"`nexedge thresholds {path} --data ROOT` measures them (the daemon starts on them and logs that).",
          file=sys.stderr)
    return EXIT_NOT_MEASURED if data_given else 0


def configure_check_onnx(p: argparse.ArgumentParser) -> None:
    from nexedge.export.onnx_check import TARGETS

    p.add_argument("onnx", nargs="+", help="ONNX model(s) to check")
    p.add_argument("--target", default="all", help=f"{'|'.join(TARGETS)} or all (default all); comma list allowed")
    p.add_argument("--dla", action="store_true", help="also check the DLA rules (static shapes, no Q/DQ before 10)")
    p.add_argument("--strict", action="store_true", help="warnings fail too")


def run_check_onnx(args: argparse.Namespace) -> int:
    """Exit 0 when every model passes every target, 1 otherwise; prints each finding."""
    from nexedge.export import onnx_check as oc

    targets = list(oc.TARGETS) if args.target == "all" else [t.strip() for t in args.target.split(",") if t.strip()]
    bad = 0
    for path in args.onnx:
        for t in targets:
            found = oc.check_onnx(path, t, dla=args.dla)
            print(oc.format_findings(path, t, found))
            bad += len(oc.errors(found)) + (len(found) if args.strict else 0)
    return 1 if bad else 0
