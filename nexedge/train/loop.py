"""``train_one_epoch`` and ``evaluate`` (torchvision references style).

Batches are B x K x 3 x h x w (K crops per image); logits are averaged over the
K crops before softmax and loss.
"""

from typing import Optional, Tuple

import numpy as np
import torch

from nexedge.train.distributed import DistContext, gather_rows


def forward_crops(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """B x K x 3 x h x w -> B x C logits averaged over the K crops."""
    if x.dim() != 5:
        raise ValueError(f"expected a B x K x 3 x h x w batch, got shape {tuple(x.shape)}")
    b, k = x.shape[:2]
    return model(x.flatten(0, 1)).view(b, k, -1).mean(dim=1)


def _batch_images(batch) -> int:
    return 0 if batch is None else len(batch[1])


def _bar(loader, desc: str, enabled: bool, stage_line: bool = False):
    """A bar on a terminal; off a terminal a heartbeat line every 30 s (batches, images/s, ETA) and,
    with ``stage_line``, one line when the pass ends (the trainer prints its own per epoch)."""
    if not enabled:
        return loader
    from nexedge.progress import progress

    return progress(loader, desc=desc, unit="batches", per_stage_line=stage_line, images=_batch_images)


def train_one_epoch(
    model: torch.nn.Module,
    loader,
    loss_fn,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    ctx: DistContext,
    progress: bool = True,
    max_grad_norm: Optional[float] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One pass over ``loader``; returns (index, logits, labels, mean loss) of all ranks."""
    model.train()
    idx_all, logit_all, lab_all = [], [], []
    total, count = 0.0, 0
    bar = _bar(loader, f"epoch {epoch} train", progress and ctx.is_main)
    for batch in bar:
        if batch is None:  # every image of the batch was unreadable
            continue
        x, y, idx = batch
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        logits = forward_crops(model, x)
        loss = loss_fn(logits, y, idx, epoch)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {loss.item()} at epoch {epoch}; lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        total += float(loss.item()) * len(y)
        count += len(y)
        idx_all.append(idx.numpy())
        logit_all.append(logits.detach().float().cpu().numpy())
        lab_all.append(y.cpu().numpy())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    loss_fn.sync(ctx.device)
    index, (logits_np, labels_np) = gather_rows(
        ctx, np.concatenate(idx_all), np.concatenate(logit_all), np.concatenate(lab_all)
    )
    return index, logits_np, labels_np, total / max(count, 1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader, ctx: DistContext, desc: str = "eval", progress: bool = True
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop-averaged logits of every sample; returns (index, logits, labels) of all ranks."""
    model.eval()
    idx_all, logit_all, lab_all = [], [], []
    for batch in _bar(loader, desc, progress and ctx.is_main):
        if batch is None:
            continue
        x, y, idx = batch
        logits = forward_crops(model, x.to(ctx.device, non_blocking=True))
        idx_all.append(idx.numpy())
        logit_all.append(logits.float().cpu().numpy())
        lab_all.append(y.numpy())
    index, (logits_np, labels_np) = gather_rows(
        ctx, np.concatenate(idx_all), np.concatenate(logit_all), np.concatenate(lab_all)
    )
    return index, logits_np, labels_np


@torch.no_grad()
def crop_logits(model: torch.nn.Module, loader, device: torch.device, desc: str = "eval",
                progress: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-crop logits (N x K x C) without averaging, for evaluating several crop
    styles from one TenCrop pass (center = crop 4, five = crops 0-4)."""
    from nexedge.progress import progress as _progress

    model.eval()
    idx_all, out, lab_all = [], [], []
    bar = _progress(desc=desc, total=len(loader.dataset), unit="images", enabled=progress)
    for batch in loader:
        if batch is None:
            continue
        x, y, idx = batch
        b, k = x.shape[:2]
        out.append(model(x.to(device).flatten(0, 1)).view(b, k, -1).float().cpu().numpy())
        idx_all.append(idx.numpy())
        lab_all.append(y.numpy())
        bar.update(b)
    bar.close()
    if not idx_all:
        raise ValueError(f"{desc}: no readable images")
    return np.concatenate(idx_all), np.concatenate(out), np.concatenate(lab_all)
