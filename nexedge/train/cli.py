"""``nexedge train``, ``nexedge eval`` and ``nexedge mislabels`` (light imports only;
torch and friends load inside ``run_*``)."""

import argparse
from typing import Any, Dict, List, Tuple

from nexedge.card import CROP_MODES
from nexedge.cliopts import STEP_GAMMA, STEP_SIZE, Key, add_kw_option, add_tpr_floor_option, uses_globals
from nexedge.models import add_arch_option
from nexedge.train.config import FLIPS, LOSSES, PHOTOMETRIC

DEFAULT_EPOCHS = 30  # budget.DEFAULT_EPOCHS, without importing torch here
DEFAULT_ARCH = "resnet18"


def _size(text: str) -> Tuple[int, int]:
    """``64`` -> (64, 64); ``64x80`` -> (64, 80) (height x width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected N or HxW (integers)") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected N or HxW with positive integers")
    return parts[0], parts[1]


def _kv(pairs: List[str], what: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise ValueError(f"{what} {p!r}: expected KEY=VALUE")
        for cast in (int, float):
            try:
                out[k] = cast(v)
                break
            except ValueError:
                continue
        else:
            out[k] = v
    return out


def configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data root with train/ and val/ (and test/) of <class>/<image>")
    p.add_argument("--out", required=True, help="run folder for checkpoints, cards, metrics and plots")
    g = p.add_argument_group("model")
    add_arch_option(g, default=DEFAULT_ARCH)
    g.add_argument("--arch-kw", action="append", default=[], metavar="KEY=VALUE",
                   help="extra architecture option, e.g. stn_params=3 or compat=add (repeatable)")
    g.add_argument("--pretrained", default="none",
                   help="none (default), the name of weights the architecture has (see --arch; checked before "
                        "training) or PATH to a state dict")
    g.add_argument("--freeze", type=int, default=0, metavar="N",
                   help="freeze the first N stages (stem = 1) with their BatchNorm in eval mode; saves their "
                        "backward pass (default 0)")
    g.add_argument("--channels-last", action="store_true",
                   help="NHWC memory layout for model and batches (faster convolutions on some CPUs/GPUs)")
    g.add_argument("--good-class", default=None,
                   help="the negative (pass) class; every other class is a defect. The model's defect score is "
                        "the sum of the defect classes' probabilities (what 1 - p(good class) would be without "
                        "rounding) and the card's thresholds come from it (default: the data set's "
                        "good_class from `nexedge split --good-class`, else 'good')")
    d = p.add_argument_group("input")
    d.add_argument("--color", choices=("gray", "rgb"), default="gray", help="model colour (default gray)")
    d.add_argument("--resize", type=_size, default=None,
                   help="resize to N or HxW (report: 255; default: the architecture's, 72 for every built-in one)")
    d.add_argument("--resize-mode", default="stretch", choices=("stretch", "short"),
                   help="stretch: scale each axis to --resize (aspect ratio changes; default); short: keep the "
                        "aspect ratio, fit the short side and center-crop (the report's Resize + crop); "
                        "the card carries it to export, calibration and the daemon")
    d.add_argument("--crop", type=_size, default=None,
                   help="crop N or HxW (report: 224; default: the architecture's, 64 for every built-in one)")
    d.add_argument("--crop-mode", choices=CROP_MODES, default="center", help="crop style at eval/val time (in the card)")
    d.add_argument("--train-crop", choices=("random",) + CROP_MODES, default="random",
                   help="train crop: random (default) or a crop style with logits averaged over crops")
    d.add_argument("--no-augment", action="store_true", help="no rotation/affine/colour jitter")
    d.add_argument("--flip", choices=FLIPS, default="none",
                   help="random mirrors at train time: h (left-right, the mirror TenCrop also scores), v "
                        "(top-bottom) or hv; only where a mirrored image keeps its label (default none)")
    d.add_argument("--photometric", choices=tuple(PHOTOMETRIC), default="report",
                   help="report: brightness/contrast jitter (default); shift: also random gamma, blur and "
                        "sensor noise, for production batches that differ from the training set in optics, "
                        "exposure and noise")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: 30); with --budget, the most it may choose")
    o.add_argument("--budget", metavar="DURATION",
                   help="finish within this wall time on this machine, e.g. 900s, 15m, 1.5h: a short warm-up "
                        "measures seconds per image and the run gets the most epochs that fit (up to --epochs), "
                        "validation, test curves and checkpoints included; prints the choice, writes budget.json")
    add_kw_option(o, "--budget-kw", {
        "resize": Key("budget_resize", str, None, "CROP[,CROP...]: also choose the input size from these candidate "
                      "crops (N or HxW), each measured; the largest that affords min_epochs wins, --resize scales "
                      "with it"),
        "min_epochs": Key("budget_min_epochs", int, 10, "with resize, the epochs a size must afford to be chosen"),
    }, help="with --budget: how it chooses")
    o.add_argument("--batch-size", type=int, default=32, help="images per batch, per process")
    o.add_argument("--lr", type=float, default=0.01, help="learning rate")
    o.add_argument("--schedule", action=_ScheduleAction, default="step", metavar="step[:N[:GAMMA]]|cosine",
                   help=f"step: lr x GAMMA every N epochs (default step:{STEP_SIZE}:{STEP_GAMMA:g}); cosine: "
                        "annealing over all epochs")
    p.set_defaults(step_size=STEP_SIZE, gamma=STEP_GAMMA)
    o.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="sgd (default, with momentum) or adamw (try --lr 1e-3 to 3e-3)")
    add_kw_option(o, "--optimizer-kw", {
        "momentum": Key("momentum", float, 0.9, "SGD momentum"),
        "weight_decay": Key("weight_decay", float, 1e-4, "weight decay"),
        "warmup_epochs": Key("warmup_epochs", int, 0, "linear lr warm-up epochs before the schedule"),
    }, help="optimiser settings")
    o.add_argument("--balanced", nargs="?", const="class", default="none", choices=("none", "class", "binary", "sqrt"),
                   help="class-balanced sampling with replacement: class (bare --balanced; every class equally), "
                        "binary (half good, half defects) or sqrt (by sqrt of class counts); default none")
    o.add_argument("--seed", type=int, default=0, help="random seed")
    o.add_argument("--resume", metavar="CKPT", help="continue from a run's last.pt (same --out)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (by default a non-empty --out is refused, so two runs "
                        "never mix)")
    lo = p.add_argument_group("loss")
    lo.add_argument("--loss", choices=tuple(LOSSES), default="ce",
                    help="; ".join(f"{name}: {text}" for name, text in LOSSES.items()))
    lo.add_argument("--boost", action="append", default=None, metavar="CLASS=FACTOR",
                    help="class weight (repeatable); sat_boost defaults to x5 for lead_defect, marking_defect, "
                         "pocket_damage and scratch where present")
    add_kw_option(lo, "--loss-kw", {
        "sat_alpha": Key("sat_alpha", float, 0.9, "SAT soft-label momentum"),
        "sat_es": Key("sat_es", int, None, "SAT starts after this epoch; default: half the epochs"),
        "wbce_lambda": Key("wbce_lambda", float, 0.5, "weight of CE in wbce"),
        "wbce_start.": Key("wbce_start", int, [], "first epoch of wbce's binary term for a class"),
        "wbce_start_default": Key("wbce_start_default", int, 1, "first epoch of the binary term otherwise"),
    }, help="loss settings, e.g. sat_alpha=0.8 or wbce_start.scratch=5")
    r = p.add_argument_group("run")
    r.add_argument("--keep", type=int, default=10, help="checkpoints kept, best first by --select (default 10)")
    from nexedge.train.cardbuild import BEST_RULES  # torch-free

    r.add_argument("--select", choices=tuple(BEST_RULES), default="val_auc",
                   help="which checkpoint becomes best.pt (and leads the kept ones that eval, export and "
                        "mislabels use): val_auc, the highest validation AUC (default); last, the final epoch. "
                        "With tens of validation defects, epoch-to-epoch AUC differences are mostly noise and "
                        "val_auc can pick a half-trained early epoch; after a cosine schedule the final weights "
                        "did better on held-out data in every such run measured (docs/training.md)")
    r.add_argument("--workers", type=int, default=0, help="data loader processes (default 0)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--no-test-curves", action="store_true", help="do not evaluate test/ every epoch (fig. 9)")
    r.add_argument("--no-cache", action="store_true", help="decode images every epoch instead of caching them")
    add_tpr_floor_option(r)
    r.add_argument("--cv", type=int, default=None, metavar="K",
                   help="cross-validate: pool train+val, train K fold models (each its last epoch) and score every "
                        "image out of fold, so the operating points rest on every labelled defect; `nexedge export "
                        "OUT` then builds the fold ensemble. Costs about K trainings (docs/training.md)")
    uses_globals(p, "--threads", "--no-progress", torch=True)


class _ScheduleAction(argparse.Action):
    """``--schedule step[:N[:GAMMA]]`` or ``cosine``: sets ``schedule``, ``step_size`` and ``gamma``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Any = None) -> None:
        name, _, rest = str(values).partition(":")
        parts = rest.split(":") if rest else []
        bad = f"--schedule {values!r}: expected step[:N[:GAMMA]] (N epochs, a whole number >= 1; GAMMA > 0) or cosine"
        if name not in ("step", "cosine") or len(parts) > 2 or (name == "cosine" and parts):
            raise argparse.ArgumentError(self, bad)
        try:
            step = int(parts[0]) if parts and parts[0] else STEP_SIZE
            gamma = float(parts[1]) if len(parts) > 1 and parts[1] else STEP_GAMMA
        except ValueError:
            raise argparse.ArgumentError(self, bad) from None
        if step < 1 or gamma <= 0:
            raise argparse.ArgumentError(self, bad)
        namespace.schedule = name
        namespace.step_size, namespace.gamma = step, gamma


def run_train(args: argparse.Namespace) -> int:
    import time

    from nexedge.models import arch_spec, check_pretrained
    from nexedge.train.losses import parse_class_map
    from nexedge.train.trainer import TrainConfig, train

    t_start = time.time()
    spec = arch_spec(args.arch)
    check_pretrained(args.arch, args.pretrained)  # before the data is read
    args.resize = args.resize or spec.resize
    args.crop = args.crop or spec.crop
    budget_s = _budget_args(args)
    classes = _classes(args.data)
    if args.good_class is None:
        from nexedge.data.split import dataset_good_class

        args.good_class = dataset_good_class(args.data) or "good"
    if args.good_class not in classes:
        raise ValueError(f"--good-class {args.good_class!r} is not one of the class folders {classes}")
    _warn_aspect(args)
    cfg = TrainConfig(
        data=args.data, out=args.out, arch=args.arch, arch_kw=_kv(args.arch_kw, "--arch-kw"),
        pretrained=args.pretrained, freeze=args.freeze, channels_last=args.channels_last,
        good_class=args.good_class, color=args.color, resize=args.resize,
        crop=args.crop, crop_mode=args.crop_mode, resize_mode=args.resize_mode, tpr_floor=args.tpr_floor, train_crop=args.train_crop, augment=not args.no_augment,
        flip=args.flip, photometric=args.photometric,
        epochs=args.epochs or DEFAULT_EPOCHS, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, schedule=args.schedule, optimizer=args.optimizer,
        warmup_epochs=args.warmup_epochs, balanced=args.balanced, step_size=args.step_size, gamma=args.gamma,
        loss=args.loss, boost=None if args.boost is None else parse_class_map(args.boost, classes, "--boost"),
        sat_alpha=args.sat_alpha, sat_es=args.sat_es, wbce_lambda=args.wbce_lambda,
        wbce_start={k: int(v) for k, v in parse_class_map(args.wbce_start, classes, "--loss-kw wbce_start.CLASS", int).items()},
        wbce_start_default=args.wbce_start_default, keep=args.keep, select=args.select, seed=args.seed, resume=args.resume,
        workers=args.workers, device=args.device, test_curves=not args.no_test_curves, overwrite=args.overwrite,
        progress=not args.no_progress, cache=not args.no_cache,
    )
    if args.cv is not None:
        from nexedge.train.cv import run_cv

        run_cv(cfg, args.cv)
        return 0
    plan = None
    if budget_s is not None:
        import dataclasses

        from nexedge.train import budget
        from nexedge.train.trainer import prepare_run_folder

        cfg.check()
        if not cfg.overwrite:  # refuse a taken --out before the warm-up; --overwrite clears it when training starts
            prepare_run_folder(cfg.out, False)
        sizes = [_size(s.strip()) for s in args.budget_resize.split(",") if s.strip()] if args.budget_resize else None
        plan = budget.plan_budget(cfg, budget_s, t_start, sizes=sizes, max_epochs=cfg.epochs,
                                  min_epochs=args.budget_min_epochs)
        cfg = dataclasses.replace(cfg, epochs=plan.epochs, resize=plan.resize, crop=plan.crop, budget=plan.record())
    train(cfg)
    if plan is not None:
        budget.finish(cfg.out, plan, t_start)
    return 0


def _budget_args(args: argparse.Namespace) -> Any:
    """Seconds of ``--budget`` (None without it); its companion flags need it."""
    if args.budget is None:
        if args.budget_resize:
            raise ValueError("--budget-kw resize chooses the input size within a --budget; give --budget too")
        return None
    from nexedge.train.budget import parse_duration

    if args.resume:
        raise ValueError("--budget chooses the epochs of a new run; --resume continues one with its own")
    if args.cv is not None:
        raise ValueError(f"--budget plans one training; --cv {args.cv} trains {args.cv} fold models: give --epochs "
                         "with --cv (a --budget run of the same recipe tells the epochs that fit)")
    if args.budget_min_epochs < 1:
        raise ValueError(f"--budget-kw min_epochs={args.budget_min_epochs}: expected 1 or more")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.budget_resize:
        for s in args.budget_resize.split(","):
            try:
                _size(s.strip())
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"--budget-kw resize={args.budget_resize!r}: {e}") from None
    return parse_duration(args.budget)


def _warn_aspect(args: argparse.Namespace) -> None:
    """WARN when the training images' aspect ratios make --resize-mode (at --resize) a bad fit."""
    import os

    from nexedge.data.aspect import fit_warning, split_aspects

    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 speaks
        return
    aspects, _ = split_aspects(args.data, "train", skip_unreadable=True)  # the trainer names what it skips
    if not aspects:
        return
    warning = fit_warning(aspects, args.resize_mode, args.resize)
    if warning:
        print("WARNING: " + warning, flush=True)


def _classes(root: str) -> List[str]:
    from nexedge.train.data import list_classes

    return list_classes(root, "train")


def configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="MODEL_OR_RUN_DIR",
                   help="a checkpoint (best.pt: the deployed one), an exported artifact (.onnx, engine: scored "
                        "through its runtime), or run folder(s) (their top-k checkpoints); several are compared")
    p.add_argument("--data", required=True, help="data root")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--crops", default=None,
                   help="comma list of crop styles, e.g. center,five,ten (default: the one the first model's card "
                        "runs)")
    p.add_argument("--top", type=int, default=None, help="use only the best N checkpoints of each run")
    p.add_argument("--out", default=None, help="folder for eval.json, eval.csv, roc_*.png (default: <first run>/eval_<split>)")
    p.add_argument("--batch-size", type=int, default=64)
    add_tpr_floor_option(p)
    uses_globals(p, "--threads", "--no-progress", torch=True)


def run_eval(args: argparse.Namespace) -> int:
    from nexedge.train.evaluate import run_evaluation

    crops = None
    if args.crops is not None:
        crops = [c.strip() for c in args.crops.split(",") if c.strip()]
        bad = [c for c in crops if c not in CROP_MODES]
        if bad or not crops:
            raise ValueError(f"--crops {args.crops!r}: expected a comma list of {', '.join(CROP_MODES)}")
    run_evaluation(args.runs, args.data, args.split, crops, out=args.out, top=args.top,
                   batch_size=args.batch_size, progress=not args.no_progress, tpr_floor=args.tpr_floor)
    return 0


def configure_mislabels(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="CKPT_OR_RUN_DIR", help="a checkpoint or a run folder (its best checkpoint)")
    p.add_argument("--data", required=True, help="data root (manifest.jsonl with true_label enables precision/recall)")
    p.add_argument("--split", default="train", help="split to rank (default train; SAT weights exist for train)")
    p.add_argument("--by", choices=("auto", "model", "sat"), default="auto",
                   help="suspicion from SAT soft labels where present (auto), the model score, or SAT only")
    p.add_argument("--top", type=int, default=None, help="rows flagged (default: 2 %% of the split, at least 10)")
    p.add_argument("--crop-mode", choices=CROP_MODES, default=None, help="crop style (default: the card's)")
    p.add_argument("--out", default=None, help="CSV path (default <run>/mislabels_<split>.csv)")
    p.add_argument("--batch-size", type=int, default=64)
    uses_globals(p, "--threads", "--no-progress", torch=True)


def run_mislabels(args: argparse.Namespace) -> int:
    from nexedge.train.mislabels import run_mislabels as run

    run(args.run, args.data, args.split, by=args.by, top=args.top, crop_mode=args.crop_mode, out=args.out,
        batch_size=args.batch_size, progress=not args.no_progress)
    return 0
