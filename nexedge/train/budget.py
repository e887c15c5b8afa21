"""``nexedge train --budget 15m``: choose the epochs (and, if asked, the input size) that finish in time.

A short warm-up on this machine, as it is loaded now, measures seconds per training image
(forward, backward and step, with the data pipeline), per evaluated image (validation and test
curves at the eval crop mode), per decoded image (the first epoch decodes and caches every image)
and per epoch (checkpoints). The run then gets the most epochs, up to ``--epochs``, whose predicted
time, warm-up and a safety margin included, fits the budget. ``choose_plan`` is plain arithmetic
on those timings, so it is tested with timings given to it.
"""

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

#: Epochs when neither --epochs nor a budget says otherwise (train's --epochs default).
DEFAULT_EPOCHS = 30
#: Share of the budget kept free for timing noise: on the shared 2-core dev box, epochs of Lite0 on
#: the tiles ran 8 % and 23 % slower than their warm-ups predicted (benchmarks/results/resize_mode.md).
MARGIN = 0.15
#: Seconds for the work outside the epochs that the warm-up does not measure (data hash, plots, summary).
END_S = 5.0
#: Batches timed in the warm-up after one untimed batch (training; evaluation times one fewer).
WARMUP_BATCHES = 5

_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([hms])")


def parse_duration(text: str) -> float:
    """``900s``, ``15m``, ``1.5h``, ``1h30m`` -> seconds (> 0); a bare number is refused (unit unclear)."""
    s = str(text).strip().lower()
    pos, total, parts = 0, 0.0, 0
    for m in _PART.finditer(s):
        if s[pos:m.start()].strip():
            break
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos, parts = m.end(), parts + 1
    if not parts or s[pos:].strip() or total <= 0:
        raise ValueError(f"--budget {text!r}: expected a positive duration with a unit: s, m or h, e.g. 900s, 15m, "
                         "1.5h or 1h30m")
    return total


@dataclass
class Timings:
    """Measured costs, in seconds: per training image, per evaluated image, per decoded image, per
    epoch beyond the images (checkpoints), and once (building the model)."""

    train_s: float
    eval_s: float
    decode_s: float
    epoch_s: float
    setup_s: float = 0.0


@dataclass
class Counts:
    """Images per pass: train, val and test (0 without test curves)."""

    train: int
    val: int
    test: int = 0


@dataclass
class Candidate:
    """One input size and what it would cost."""

    resize: Tuple[int, int]
    crop: Tuple[int, int]
    timings: Timings
    epochs: int = 0
    epoch_s: float = 0.0
    predicted_s: float = 0.0


@dataclass
class Plan:
    """The choice and why; ``record()`` goes into the run folder."""

    budget_s: float
    spent_s: float
    epochs: int
    resize: Tuple[int, int]
    crop: Tuple[int, int]
    epoch_s: float
    predicted_s: float
    reason: str
    max_epochs: int
    margin: float = MARGIN
    candidates: List[Candidate] = field(default_factory=list)

    def record(self) -> Dict[str, Any]:
        d = asdict(self)
        for c in d["candidates"]:
            c["resize"], c["crop"] = list(c["resize"]), list(c["crop"])
        d["resize"], d["crop"] = list(self.resize), list(self.crop)
        return d


def epoch_seconds(t: Timings, c: Counts) -> float:
    """Predicted seconds of one epoch: training, validation, test curves and checkpoints."""
    return c.train * t.train_s + (c.val + c.test) * t.eval_s + t.epoch_s


def fixed_seconds(t: Timings, c: Counts) -> float:
    """Seconds outside the epochs: decoding every image once, building the model, :data:`END_S`."""
    return (c.train + c.val + c.test) * t.decode_s + t.setup_s + END_S


def affordable_epochs(budget_s: float, spent_s: float, t: Timings, c: Counts, margin: float = MARGIN) -> int:
    """The most whole epochs that fit ``budget_s`` less the margin, the time spent so far and the fixed costs."""
    left = budget_s * (1.0 - margin) - spent_s - fixed_seconds(t, c)
    per = epoch_seconds(t, c)
    return max(0, int(math.floor(left / per))) if per > 0 else 0


def choose_plan(budget_s: float, spent_s: float, candidates: Sequence[Candidate], counts: Counts,
                max_epochs: int = DEFAULT_EPOCHS, min_epochs: int = 1, margin: float = MARGIN) -> Plan:
    """Pick the first candidate (largest input first) that affords ``min_epochs``, else the one that
    affords the most; give it the most epochs up to ``max_epochs``. Raises ValueError when none
    affords one epoch, naming the budget that would."""
    if not candidates:
        raise ValueError("no input size to choose from")
    candidates = [replace(c) for c in candidates]  # the given ones stay as they are
    for cand in candidates:
        cand.epochs = min(max_epochs, affordable_epochs(budget_s, spent_s, cand.timings, counts, margin))
        cand.epoch_s = epoch_seconds(cand.timings, counts)
        cand.predicted_s = spent_s + fixed_seconds(cand.timings, counts) + cand.epochs * cand.epoch_s
    need = min(min_epochs, max_epochs)
    pick = next((c for c in candidates if c.epochs >= need), None)
    several = len(candidates) > 1
    if pick is None:
        pick = max(candidates, key=lambda c: (c.epochs, -candidates.index(c)))
        if pick.epochs < 1:
            c = candidates[-1]
            one = (spent_s + fixed_seconds(c.timings, counts) + c.epoch_s) / (1.0 - margin)
            raise ValueError(
                f"--budget {_fmt(budget_s)} is too short: one epoch at crop {_hw(c.crop)} takes about "
                f"{_fmt(c.epoch_s)} here ({counts.train} training images at {1000 * c.timings.train_s:.0f} ms, "
                f"{counts.val + counts.test} evaluated at {1000 * c.timings.eval_s:.0f} ms), so one epoch needs a "
                f"budget of at least {_fmt(one)} (warm-up {_fmt(spent_s)} and a {100 * margin:.0f} % margin included)"
                + ("" if several else "; --budget-kw resize= with smaller sizes, fewer images or --no-test-curves help"))
        why_size = (f"no size affords {need} epochs; crop {_hw(pick.crop)} affords the most" if several else "")
    else:
        why_size = (f"the largest crop that affords {need} epochs" if several else "")
    capped = pick.epochs == max_epochs
    why = (f"{pick.epochs} epochs of about {_fmt(pick.epoch_s)} each"
           + (f" (the most allowed: --epochs {max_epochs})" if capped else " (the most that fit)")
           + f", predicted {_fmt(pick.predicted_s)} of {_fmt(budget_s)} with warm-up and a {100 * margin:.0f} % margin")
    if why_size:
        why = f"crop {_hw(pick.crop)}: {why_size}; " + why
    return Plan(budget_s=budget_s, spent_s=spent_s, epochs=pick.epochs, resize=pick.resize, crop=pick.crop,
                epoch_s=pick.epoch_s, predicted_s=pick.predicted_s, reason=why, max_epochs=max_epochs, margin=margin,
                candidates=list(candidates))


def _fmt(s: float) -> str:
    from nexedge.progress import format_seconds

    return format_seconds(s)


def _hw(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def scaled_resize(resize: Sequence[int], crop: Sequence[int], new_crop: Sequence[int]) -> Tuple[int, int]:
    """``resize`` scaled like the crop, so the resize/crop margin keeps its proportion."""
    return (max(int(new_crop[0]), int(round(resize[0] * new_crop[0] / crop[0]))),
            max(int(new_crop[1]), int(round(resize[1] * new_crop[1] / crop[1]))))


def measure(cfg: Any, resize: Sequence[int], crop: Sequence[int], batches: int = WARMUP_BATCHES) -> Timings:
    """Time training, evaluation, decoding and checkpointing of ``cfg``'s model at this input size on
    a few batches of its own data (this machine, its current load, the threads set for this command)."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, Subset

    from nexedge.models import input_normalization
    from nexedge.train.data import ImageFolderSet, collate_skip_unreadable, list_classes
    from nexedge.train.loop import forward_crops
    from nexedge.train.trainer import _make_model, _optimizer
    from nexedge.train.transforms import EvalTransform, TrainTransform

    sized = replace(cfg, resize=tuple(resize), crop=tuple(crop))
    classes = list_classes(cfg.data, "train")
    mean, std = input_normalization(cfg.arch)
    inp = {"color": cfg.color, "resize": list(resize), "crop": list(crop), "crop_mode": cfg.crop_mode,
           "resize_mode": cfg.resize_mode, "mean": list(mean), "std": list(std)}
    if cfg.augment:
        ttf: Any = TrainTransform(inp, crop=cfg.train_crop, flip=cfg.flip, photometric=cfg.photometric)
    else:
        ttf = EvalTransform(inp, cfg.crop_mode if cfg.train_crop == "random" else cfg.train_crop)
    train_ds = ImageFolderSet(cfg.data, "train", classes, inp, ttf, cache=True)
    val_ds = ImageFolderSet(cfg.data, "val", classes, inp, EvalTransform(inp, cfg.crop_mode), cache=True)
    bs = cfg.batch_size
    pick = np.unique(np.linspace(0, len(train_ds) - 1, min(len(train_ds), (batches + 1) * bs)).astype(int))
    vpick = np.unique(np.linspace(0, len(val_ds) - 1, min(len(val_ds), batches * bs)).astype(int))
    t0 = time.perf_counter()
    for i in pick:
        train_ds._try_prepared(int(i))  # unreadable images are recorded and skipped, as in training
    decode_s = (time.perf_counter() - t0) / len(pick)
    for i in vpick:
        val_ds._try_prepared(int(i))

    t0 = time.perf_counter()
    model, _ = _make_model(sized, len(classes))
    setup_s = time.perf_counter() - t0
    opt = _optimizer(sized, model)
    loss_fn = torch.nn.CrossEntropyLoss()

    def loader(ds: Any, idx: Any) -> Any:
        return DataLoader(Subset(ds, [int(i) for i in idx]), batch_size=bs, shuffle=False,
                          collate_fn=collate_skip_unreadable)

    def train_step(batch: Any) -> None:
        x, y, _ = batch
        loss = loss_fn(forward_crops(model, x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    train_s = _seconds_per_image(loader(train_ds, pick), train_step)
    model.eval()
    with torch.no_grad():
        eval_s = _seconds_per_image(loader(val_ds, vpick), lambda b: forward_crops(model, b[0]))
    epoch_s = _checkpoint_seconds(cfg, model, opt, classes)
    return Timings(train_s=train_s, eval_s=eval_s, decode_s=decode_s, epoch_s=epoch_s, setup_s=setup_s)


def _checkpoint_seconds(cfg: Any, model: Any, opt: Any, classes: Sequence[str]) -> float:
    """Seconds to write an epoch's checkpoints where the run writes them: a kept one and last.pt
    (with the optimizer), each read back for its card's sha256."""
    import hashlib
    import tempfile

    from nexedge.models.checkpoint import save_checkpoint

    folder = os.path.abspath(cfg.out)
    while not os.path.isdir(folder):  # the nearest existing folder: the same file system
        folder = os.path.dirname(folder)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".budget-", dir=folder) as tmp:
        for name, state in (("kept.pt", None), ("last.pt", opt.state_dict())):
            path = save_checkpoint(os.path.join(tmp, name), model, cfg.arch, list(classes), cfg.good_class,
                                   optimizer=state)
            with open(path, "rb") as f:
                hashlib.sha256(f.read())
    return time.perf_counter() - t0


def _seconds_per_image(batches: Any, step: Any) -> float:
    """Wall seconds per image of loading and ``step``-ping each batch; the first batch, which pays
    one-off allocations and kernel choices, is left out when there are more."""
    rows = []
    t_prev = time.perf_counter()
    for batch in batches:
        if batch is None:  # every image of the batch unreadable
            continue
        step(batch)
        now = time.perf_counter()
        rows.append((now - t_prev, len(batch[1])))
        t_prev = now
    if not rows:
        raise ValueError("--budget: no readable images for the warm-up")
    rows = rows[1:] if len(rows) > 1 else rows
    return sum(t for t, _ in rows) / sum(n for _, n in rows)


def image_counts(cfg: Any) -> Counts:
    """Images per pass of ``cfg``'s run."""
    from nexedge.train.data import list_classes, scan_split

    classes = list_classes(cfg.data, "train")
    test = 0
    if cfg.test_curves and os.path.isdir(os.path.join(cfg.data, "test")):
        test = len(scan_split(cfg.data, "test", classes))
    return Counts(len(scan_split(cfg.data, "train", classes)), len(scan_split(cfg.data, "val", classes)), test)


def plan_budget(cfg: Any, budget_s: float, t_start: float, sizes: Optional[Sequence[Tuple[int, int]]] = None,
                max_epochs: int = DEFAULT_EPOCHS, min_epochs: int = 10, margin: float = MARGIN,
                say: Any = print) -> Plan:
    """Measure each candidate input size (``sizes``: crops, largest first; default: ``cfg.crop``) and choose."""
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("--budget measures this one process; run it without torchrun")
    if cfg.resume:
        raise ValueError("--budget chooses the epochs of a new run; --resume continues one with its own")
    crops = [tuple(int(v) for v in s) for s in (sizes or [cfg.crop])]
    crops.sort(key=lambda hw: -hw[0] * hw[1])
    counts = image_counts(cfg)
    cands = []
    for crop in crops:
        resize = scaled_resize(cfg.resize, cfg.crop, crop) if sizes else tuple(cfg.resize)
        say(f"budget {_fmt(budget_s)}: warm-up at crop {_hw(crop)} (resize {_hw(resize)}) ...")
        t = measure(cfg, resize, crop)
        say(f"  {1000 * t.train_s:.1f} ms per training image, {1000 * t.eval_s:.1f} ms per evaluated image "
            f"({cfg.crop_mode} crops), {1000 * t.decode_s:.1f} ms per decoded image, {t.epoch_s:.2f} s checkpoints "
            f"per epoch, {t.setup_s:.1f} s to build the model")
        cands.append(Candidate(resize=resize, crop=crop, timings=t))
    spent = time.time() - t_start
    plan = choose_plan(budget_s, spent, cands, counts, max_epochs=max_epochs, min_epochs=min_epochs, margin=margin)
    if plan.epochs <= cfg.warmup_epochs:
        raise ValueError(f"--budget {_fmt(budget_s)} affords {plan.epochs} epoch(s), not more than --optimizer-kw "
                         f"warmup_epochs={cfg.warmup_epochs}; lower warmup_epochs or raise the budget")
    say(f"budget {_fmt(budget_s)}: chose {plan.reason} ({counts.train} train, {counts.val} val"
        + (f", {counts.test} test" if counts.test else "") + " images per epoch)")
    if cfg.schedule == "step" and cfg.step_size >= plan.epochs:
        say(f"  note: --schedule step:{cfg.step_size} never lowers the lr in {plan.epochs} epochs; "
            "--schedule cosine anneals over whatever epochs the budget gives")
    return plan


def finish(out: str, plan: Plan, t_start: float, say: Any = print) -> Dict[str, Any]:
    """Write ``budget.json`` (the plan, the wall time it took and the epochs' own times) into the run
    folder; say how it went."""
    import json

    from nexedge.card import atomic_write_bytes

    actual = time.time() - t_start
    epochs = []
    path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            epochs = [float(json.loads(line)["time_s"]) for line in f if line.strip()]
    rec = dict(plan.record(), actual_s=round(actual, 1), within_budget=actual <= plan.budget_s,
               epoch_s_actual=epochs)
    atomic_write_bytes(os.path.join(out, "budget.json"), (json.dumps(rec, indent=2) + "\n").encode())
    per = f"; epochs took {_fmt(sum(epochs) / len(epochs))} on average (predicted {_fmt(plan.epoch_s)})" if epochs else ""
    say(f"budget: {_fmt(actual)} of {_fmt(plan.budget_s)} used (predicted {_fmt(plan.predicted_s)}){per}"
        + ("" if rec["within_budget"] else "; OVER BUDGET: the box was slower than during the warm-up"))
    return rec
