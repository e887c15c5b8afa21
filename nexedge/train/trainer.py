"""``nexedge train``: one training run from a :class:`TrainConfig`.

Writes into ``out``: ``ckpt_eNNN.pt`` (top-k by validation AUC, each with its
ModelCard), ``last.pt`` (+ card, optimizer, scheduler and loss state for
``--resume``), ``topk.json``, ``metrics.jsonl`` / ``metrics.csv``, ``sat_state.npz``
(SAT losses), ``config.json`` and PNG plots. Under torchrun only rank 0 writes.
"""

import copy
import dataclasses
import io
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from nexedge import __version__, metrics
from nexedge.card import ModelCard, atomic_write_bytes
from nexedge.train import distributed
from nexedge.train.cardbuild import BEST_RULES, TopK, build_card, reference_image_stats
from nexedge.train.data import ImageFolderSet, class_counts, collate_skip_unreadable, data_hash, list_classes
from nexedge.train.history import History
from nexedge.train.loop import evaluate, train_one_epoch
from nexedge.train.losses import SATLoss, build_loss
from nexedge.train.sampling import BALANCE_MODES, BalancedSampler
from nexedge.train.transforms import EvalTransform, TrainTransform

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "resnet18"
    arch_kw: Dict[str, Any] = field(default_factory=dict)
    pretrained: str = "none"
    freeze: int = 0
    channels_last: bool = False
    good_class: str = "good"
    color: str = "gray"
    resize: Optional[Tuple[int, int]] = None  # None: the architecture's default (nexedge.models.ArchSpec)
    crop: Optional[Tuple[int, int]] = None
    crop_mode: str = "center"
    resize_mode: str = "stretch"
    tpr_floor: float = metrics.DEFAULT_TPR_FLOOR
    train_crop: str = "random"
    augment: bool = True
    flip: str = "none"
    photometric: str = "report"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    optimizer: str = "sgd"
    warmup_epochs: int = 0
    balanced: str = "none"
    step_size: int = 14
    gamma: float = 0.1
    loss: str = "ce"
    boost: Optional[Dict[str, float]] = None
    sat_alpha: float = 0.9
    sat_es: Optional[int] = None
    wbce_lambda: float = 0.5
    wbce_start: Dict[str, int] = field(default_factory=dict)
    wbce_start_default: int = 1
    keep: int = 10
    select: str = "val_auc"
    seed: int = 0
    resume: Optional[str] = None
    overwrite: bool = False
    workers: int = 0
    device: str = "auto"
    test_curves: bool = True
    progress: bool = True
    cache: bool = True
    plots: bool = True
    next_hint: bool = True
    budget: Optional[Dict[str, Any]] = None  # what --budget chose and why (nexedge.train.budget), for config.json

    def __post_init__(self) -> None:
        if self.resize is None or self.crop is None:
            from nexedge.models import ArchSpec, arch_specs

            spec = arch_specs().get(self.arch)  # an unknown arch fails in check(); until then, a spec's defaults
            defaults = spec._asdict() if spec else ArchSpec._field_defaults
            self.resize = self.resize or defaults["resize"]
            self.crop = self.crop or defaults["crop"]

    def check(self) -> None:
        from nexedge.models import check_pretrained, list_models

        if self.arch not in list_models():
            raise ValueError(f"unknown --arch {self.arch!r}; available: {', '.join(list_models())}")
        check_pretrained(self.arch, self.pretrained)
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"--schedule {self.schedule!r}: expected step or cosine")
        if self.crop[0] > self.resize[0] or self.crop[1] > self.resize[1]:
            raise ValueError(f"--crop {list(self.crop)} is larger than --resize {list(self.resize)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"--optimizer-kw warmup_epochs must be in [0, --epochs), got {self.warmup_epochs}")
        if self.select not in BEST_RULES:
            raise ValueError(f"--select {self.select!r}: expected one of {', '.join(BEST_RULES)}")
        if self.freeze < 0:
            raise ValueError(f"--freeze must be >= 0 stages, got {self.freeze}")
        if self.balanced not in BALANCE_MODES:
            raise ValueError(f"--balanced {self.balanced!r}: expected one of {', '.join(BALANCE_MODES)}")
        if self.resize_mode not in ("stretch", "short"):
            raise ValueError(f"--resize-mode {self.resize_mode!r}: expected stretch or short")
        if not 0.0 < self.tpr_floor < 1.0:
            raise ValueError(f"--tpr-floor must be in (0, 1), got {self.tpr_floor}")
        if not self.augment and (self.flip != "none" or self.photometric != "report"):
            raise ValueError(f"--no-augment turns training augmentation off, but --flip {self.flip} / --photometric "
                             f"{self.photometric} ask for some; drop --no-augment or use --flip none "
                             "--photometric report")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _make_model(cfg: TrainConfig, n_classes: int) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    from nexedge.models import accepts, create_model, list_models

    if cfg.arch not in list_models():
        raise ValueError(f"unknown --arch {cfg.arch!r}; available: {', '.join(list_models())}")
    kw = accepts(cfg.arch, {"input_size": list(cfg.crop)})
    kw.update(cfg.arch_kw)
    model = create_model(cfg.arch, n_classes, pretrained=cfg.pretrained, **kw)
    if cfg.freeze:
        from nexedge.models.freeze import freeze_stages

        freeze_stages(model, cfg.freeze)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        # NCHW batches become NHWC on the way in, so the loop and the loss stay as they are.
        model.register_forward_pre_hook(lambda m, args: (args[0].contiguous(memory_format=torch.channels_last),))
    return model, kw


def _loader(ds, ctx: distributed.DistContext, batch: int, shuffle: bool, seed: int, workers: int,
            balanced: str = "none", good_index: int = 0, own_generator: bool = False):
    """``own_generator``: the loader draws its worker base seed from a generator of its own, not from
    torch's global one (evaluation loaders: whether test curves are drawn must not change training)."""
    from torch.utils.data import DataLoader, DistributedSampler

    if balanced != "none":
        sampler = BalancedSampler(ds.labels, balanced, good_index, seed, ctx.world_size, ctx.rank)
    else:
        sampler = DistributedSampler(ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed)
    gen = torch.Generator().manual_seed(seed) if own_generator else None
    return DataLoader(
        ds, batch_size=batch, sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
        drop_last=False, collate_fn=collate_skip_unreadable, generator=gen,
    )


def _optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # frozen stages stay out
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _schedule(cfg: TrainConfig, opt: torch.optim.Optimizer):
    """Per-epoch schedule; ``warmup_epochs`` > 0 ramps the lr linearly up to --lr first."""
    if cfg.schedule == "step":
        main = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    else:
        main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs - cfg.warmup_epochs)
    if cfg.warmup_epochs == 0:
        return main
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / (cfg.warmup_epochs + 1), total_iters=cfg.warmup_epochs)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, main], milestones=[cfg.warmup_epochs])


def _save_sat(path: str, loss: SATLoss, ds: ImageFolderSet) -> None:
    buf = io.BytesIO()
    np.savez(
        buf,
        paths=np.asarray(ds.paths),
        labels=ds.labels,
        soft=loss.soft.numpy(),
        weights=loss.weights.numpy(),
        classes=np.asarray(ds.classes),
        loss=np.asarray(loss.name),
    )
    atomic_write_bytes(path, buf.getvalue())


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run training; returns a summary dict (best epoch, metrics, files, wall time)."""
    from nexedge.models.checkpoint import load_checkpoint, save_checkpoint

    cfg.check()
    t_start = time.time()
    ctx = distributed.init_distributed(cfg.device)
    try:
        if ctx.is_main and not cfg.resume:  # only the writer checks: other ranks would see its new files
            prepare_run_folder(cfg.out, cfg.overwrite)
        _seed_all(cfg.seed)
        classes = list_classes(cfg.data, "train")
        if cfg.good_class not in classes:
            raise ValueError(f"--good-class {cfg.good_class!r} is not one of the classes {classes}")
        g = classes.index(cfg.good_class)
        from nexedge.models import input_normalization

        mean, std = input_normalization(cfg.arch)
        inp = {
            "color": cfg.color, "resize": list(cfg.resize), "crop": list(cfg.crop), "crop_mode": cfg.crop_mode,
            "resize_mode": cfg.resize_mode, "mean": list(mean), "std": list(std),
        }
        if cfg.augment:
            ttf = TrainTransform(inp, crop=cfg.train_crop, flip=cfg.flip, photometric=cfg.photometric)
        else:
            ttf = EvalTransform(inp, cfg.crop_mode if cfg.train_crop == "random" else cfg.train_crop)
        train_ds = ImageFolderSet(cfg.data, "train", classes, inp, ttf, cfg.cache)
        val_ds = ImageFolderSet(cfg.data, "val", classes, inp, EvalTransform(inp, cfg.crop_mode), cfg.cache)
        test_ds = None
        if cfg.test_curves and os.path.isdir(os.path.join(cfg.data, "test")):
            test_ds = ImageFolderSet(cfg.data, "test", classes, inp, EvalTransform(inp, cfg.crop_mode), cfg.cache)
        sat_es = cfg.sat_es if cfg.sat_es is not None else max(1, cfg.epochs // 2)
        loss_fn = build_loss(
            cfg.loss, train_ds.labels, classes, cfg.good_class, boost=cfg.boost, sat_alpha=cfg.sat_alpha,
            sat_es=sat_es, wbce_lambda=cfg.wbce_lambda, wbce_start=cfg.wbce_start,
            wbce_start_default=cfg.wbce_start_default,
        )
        model, arch_kwargs = _make_model(cfg, len(classes))
        model.to(ctx.device)
        opt = _optimizer(cfg, model)
        sched = _schedule(cfg, opt)
        start_epoch = 1
        if cfg.resume:
            ck = load_checkpoint(cfg.resume)
            if ck["classes"] != classes or ck["arch"] != cfg.arch:
                raise ValueError(
                    f"--resume {cfg.resume}: checkpoint has arch {ck['arch']} and classes {ck['classes']}, "
                    f"this run has {cfg.arch} and {classes}"
                )
            model.load_state_dict(ck["state_dict"])
            if ck.get("optimizer"):
                opt.load_state_dict(ck["optimizer"])
            if ck.get("scheduler"):
                sched.load_state_dict(ck["scheduler"])
            if isinstance(loss_fn, SATLoss):
                loss_fn.load_state(ck["extra"].get("loss_state", {}))
            start_epoch = int(ck["epoch"]) + 1
        net = model
        if ctx.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None
            )
        train_ld = _loader(train_ds, ctx, cfg.batch_size, True, cfg.seed, cfg.workers, cfg.balanced, g)
        val_ld = _loader(val_ds, ctx, cfg.batch_size, False, cfg.seed, cfg.workers, own_generator=True)
        test_ld = (_loader(test_ds, ctx, cfg.batch_size, False, cfg.seed, cfg.workers, own_generator=True)
                   if test_ds is not None else None)

        hist = topk = None
        ref_stats = dhash = None
        if ctx.is_main:
            os.makedirs(cfg.out, exist_ok=True)
            hist, topk = History(cfg.out), TopK(cfg.out, cfg.keep, cfg.select)
            hist.truncate(start_epoch - 1)
            ref_stats = reference_image_stats(val_ds.readable_prepared())
            dhash = data_hash(cfg.data)
            conf = dataclasses.asdict(cfg)
            conf.update(classes=classes, sat_es_effective=sat_es, world_size=ctx.world_size)
            atomic_write_bytes(os.path.join(cfg.out, "config.json"), (json.dumps(conf, indent=2) + "\n").encode())
            _print_start(cfg, classes, train_ds, val_ds, test_ds, ctx)
        provenance = {
            "data_hash": dhash, "data_root": os.path.abspath(cfg.data), "arch": cfg.arch, "arch_kwargs": arch_kwargs,
            "pretrained": cfg.pretrained, "freeze": cfg.freeze, "loss": cfg.loss, "sat_es": sat_es if cfg.loss.startswith("sat") else None,
            "sat_alpha": cfg.sat_alpha if cfg.loss.startswith("sat") else None,
            "class_weights": loss_fn.class_weights.tolist(), "train_crop": cfg.train_crop,
            "flip": cfg.flip if cfg.augment else "none", "photometric": cfg.photometric if cfg.augment else None,
            "select": cfg.select,
            "epochs": cfg.epochs, "lr": cfg.lr, "schedule": cfg.schedule, "optimizer": cfg.optimizer,
            "warmup_epochs": cfg.warmup_epochs, "balanced": cfg.balanced, "batch_size": cfg.batch_size,
            "seed": cfg.seed, "world_size": ctx.world_size, "nexedge": __version__, "torch": torch.__version__,
            "train_counts": class_counts(train_ds.labels, classes), "val_counts": class_counts(val_ds.labels, classes),
        }
        reported: set = set()
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.time()
            lr = opt.param_groups[0]["lr"]
            train_ld.sampler.set_epoch(epoch)
            _, tr_logits, tr_labels, tr_loss = train_one_epoch(net, train_ld, loss_fn, opt, epoch, ctx, cfg.progress)
            _, va_logits, va_labels = evaluate(net, val_ld, ctx, f"epoch {epoch} val", cfg.progress)
            te = evaluate(net, test_ld, ctx, f"epoch {epoch} test", cfg.progress) if test_ld is not None else None
            sched.step()
            if ctx.is_main:
                row = {"epoch": epoch, "lr": lr, "time_s": round(time.time() - t0, 2), "train_objective": tr_loss,
                       "train": metrics.classification_report(tr_logits, tr_labels, classes, g),
                       "val": metrics.classification_report(va_logits, va_labels, classes, g)}
                if te is not None:
                    row["test"] = metrics.classification_report(te[1], te[2], classes, g)
                hist.append(row)
                val_scores = metrics.binary_terms(va_logits, g)["score"]
                card_metrics = {k: row["val"][k] for k in ("auc", "acc", "loss", "bin_acc", "bin_loss", "fpr_at_tpr")}
                card_metrics["train_loss"] = row["train"]["loss"]
                card0 = build_card(classes, cfg.good_class, inp, va_labels, val_scores, ref_stats,
                                   {"val": card_metrics}, dict(provenance, epoch=epoch))
                common = dict(arch=cfg.arch, classes=classes, good_class=cfg.good_class, arch_kwargs=arch_kwargs,
                              epoch=epoch)
                auc, vloss = row["val"]["auc"], row["val"]["loss"]
                if topk.wants(auc, vloss, epoch):
                    name = f"ckpt_e{epoch:03d}.pt"
                    save_checkpoint(os.path.join(cfg.out, name), model, card=ModelCard(copy.deepcopy(card0.data)), **common)
                    topk.add(name, epoch, auc, vloss)
                extra = {"loss_state": loss_fn.state(), "val_auc": float(auc) if auc == auc else -1.0}
                save_checkpoint(os.path.join(cfg.out, "last.pt"), model, optimizer=opt.state_dict(),
                                scheduler=sched.state_dict(), extra=extra, card=ModelCard(copy.deepcopy(card0.data)), **common)
                if isinstance(loss_fn, SATLoss):
                    _save_sat(os.path.join(cfg.out, "sat_state.npz"), loss_fn, train_ds)
                _print_epoch(row, cfg.epochs)
                for path in _unreadable(train_ds, val_ds, test_ds):
                    if path not in reported:
                        reported.add(path)
                        print(f"  skipped unreadable image {path} (it no longer decodes; left out of this run)",
                              flush=True)
            distributed.barrier(ctx)
        summary: Dict[str, Any] = {}
        if ctx.is_main:
            if cfg.plots and hist.rows:
                from nexedge.train.plots import plot_history

                plot_history(hist, classes, cfg.good_class, cfg.out)
            if topk.entries:
                write_best(cfg.out, topk.entries[0]["file"], BEST_RULES[cfg.select])
            summary = _summary(cfg, hist, topk, time.time() - t_start)
            summary["unreadable"] = _unreadable(train_ds, val_ds, test_ds)
            atomic_write_bytes(os.path.join(cfg.out, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
        return summary
    finally:
        distributed.cleanup(ctx)


#: Files and folders a training run writes; ``--overwrite`` removes only these.
RUN_FILES = ("config.json", "budget.json", "topk.json", "summary.json", "metrics.jsonl", "metrics.csv", "sat_state.npz",
             "curves_acc.png", "curves_loss.png", "curves_margin.png", "fpr_at_tpr100.png")


def _run_owned(name: str) -> bool:
    return (name in RUN_FILES or (name.startswith("ckpt_e") and name.endswith((".pt", ".card.json")))
            or name.split(".")[0] in ("last", "best") or name.startswith(("eval_", "mislabels_", ".tmp-")))


def prepare_run_folder(out: str, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder: ``out`` must be new or empty, or ``overwrite`` given.

    With ``overwrite`` the earlier run's files are removed first (only files a run writes;
    a folder holding anything else is refused, so a wrong ``--out`` never deletes data).
    """
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ValueError(f"--out {out!r} exists and is not a folder")
    names = [n for n in os.listdir(out) if n != ".DS_Store"]
    if not names:
        return
    if not overwrite:
        raise ValueError(
            f"--out {out!r} already holds a run ({', '.join(sorted(names)[:4])}{', ...' if len(names) > 4 else ''}); "
            f"a second run there would mix checkpoints of both. Use a new --out, --resume {os.path.join(out, 'last.pt')} "
            "to continue it, or --overwrite to replace it")
    foreign = [n for n in names if not _run_owned(n)]
    if foreign:
        raise ValueError(f"--overwrite: {out!r} holds files a training run does not write ({', '.join(sorted(foreign)[:5])}); "
                         "refusing to delete them, choose another --out")
    import shutil

    for n in names:
        p = os.path.join(out, n)
        shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)


def _unreadable(*sets: Optional[ImageFolderSet]) -> Dict[str, str]:
    return {p: e for ds in sets if ds is not None for p, e in ds.unreadable.items()}


def write_best(out: str, ckpt_file: str, rule: str = BEST_RULES["val_auc"]) -> str:
    """Copy the best checkpoint to ``best.pt`` with its own card (artifact name and sha256 stamped)."""
    from nexedge.card import load_card

    src = os.path.join(out, ckpt_file)
    dst = os.path.join(out, "best.pt")
    with open(src, "rb") as f:
        atomic_write_bytes(dst, f.read())
    card = load_card(src)
    card.update_provenance(best_of_run=ckpt_file, best_rule=rule)
    card.save_for(dst)
    return dst


def _print_weak(ckpt: str, floor: float) -> List[Dict[str, Any]]:
    """Print each operating point of ``ckpt``'s card beside its 95 % TPR lower bound, and a WARNING
    for each bound below ``floor``; returns the weak points."""
    from nexedge.card import card_path_for, read_card

    path = card_path_for(ckpt)
    if not os.path.exists(path):
        return []
    ops = read_card(path).operating_points
    if ops:
        print("  val TPR 95% lower bound at TPR >= " + ", ".join(
            f"{metrics.tpr_key(op['target_tpr'])}: {op['tpr_lower95']:.3f}" for op in ops)
            + f" ({ops[0]['n_defects']} val defects)")
    weak = metrics.weak_points(ops, floor)
    for w in weak:
        print("WARNING: " + w["message"])
    return [{k: w[k] for k in ("target_tpr", "tpr_lower95", "n_defects", "defects_needed")} for w in weak]


def _print_start(cfg: TrainConfig, classes: List[str], tr, va, te, ctx: distributed.DistContext) -> None:
    counts = class_counts(tr.labels, classes)
    frozen = f", first {cfg.freeze} stage(s) frozen" if cfg.freeze else ""
    print(f"nexedge train: {cfg.arch} ({cfg.pretrained}{frozen}) loss={cfg.loss} on {cfg.data}")
    print(f"  classes ({len(classes)}, negative={cfg.good_class!r}): " + ", ".join(f"{c}={n}" for c, n in counts.items()))
    print(f"  images: train {len(tr)}, val {len(va)}, test {len(te) if te else '-'}; input resize {list(cfg.resize)} "
          f"crop {list(cfg.crop)} ({cfg.train_crop} at train, {cfg.crop_mode} at eval), {cfg.color}")
    print(f"  {cfg.epochs} epochs, batch {cfg.batch_size} x {ctx.world_size} process(es) on {ctx.device}, "
          f"{cfg.optimizer} lr {cfg.lr} ({cfg.schedule}, warmup {cfg.warmup_epochs}), "
          f"sampling {cfg.balanced}, out {cfg.out}")


def _pct(x: Optional[float]) -> str:
    return "   -  " if x is None or x != x else f"{100 * x:6.2f}"


def _print_epoch(row: Dict[str, Any], epochs: int) -> None:
    v, t = row["val"], row["train"]
    fpr = v.get("fpr_at_tpr", {})
    print(f"epoch {row['epoch']:3d}/{epochs} {row['time_s']:6.1f}s lr {row['lr']:.2e} | train loss {t['loss']:.4f} "
          f"acc {_pct(t['acc'])} | val loss {v['loss']:.4f} acc {_pct(v['acc'])} AUC {_pct(v['auc'])} "
          f"FPR@TPR99.1 {_pct(fpr.get('99.1'))} @100 {_pct(fpr.get('100'))}" + _eta(row, epochs), flush=True)


def _eta(row: Dict[str, Any], epochs: int) -> str:
    from nexedge.progress import format_seconds

    left = epochs - row["epoch"]
    return f" | ETA {format_seconds(left * row['time_s'])}" if left > 0 else ""


def _summary(cfg: TrainConfig, hist: History, topk: TopK, wall: float) -> Dict[str, Any]:
    best = topk.entries[0] if topk.entries else None
    row = next((r for r in hist.rows if best and r["epoch"] == best["epoch"]), None)
    summary = {
        "out": cfg.out, "wall_s": round(wall, 1), "epochs": len(hist.rows),
        "best": None if best is None else {
            "file": best["file"], "epoch": best["epoch"], "val_auc": best["auc"],
            "val_fpr_at_tpr": row["val"]["fpr_at_tpr"] if row else None,
        },
        "best_rule": BEST_RULES[cfg.select],
        "best_file": "best.pt" if best else None,
        "topk": topk.entries,
    }
    kept = "top checkpoint(s) by val AUC" if cfg.select == "val_auc" else "checkpoint(s) of the last epochs"
    print(f"\ndone in {wall / 60:.1f} min; {len(topk.entries)} {kept} in {cfg.out}")
    if best and row:
        print(f"best: {best['file']} (epoch {best['epoch']}) val AUC {_pct(best['auc'])} %, val loss "
              f"{row['val']['loss']:.4f}; copied to best.pt ({BEST_RULES[cfg.select]})")
        print("  val FPR % at TPR >= " + ", ".join(f"{k}: {_pct(v).strip()}" for k, v in row["val"]["fpr_at_tpr"].items()))
        summary["weak_operating_points"] = _print_weak(os.path.join(cfg.out, best["file"]), cfg.tpr_floor)
    if cfg.next_hint:
        from nexedge.train.evaluate import next_hint

        print(next_hint(cfg.out, cfg.data))
    return summary
