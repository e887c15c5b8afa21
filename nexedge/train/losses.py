"""Training losses of the report (``--loss``): ce, wbce, sat, sat_good, sat_boost.

Every loss is called as ``loss(logits, targets, index, epoch)`` with crop-averaged
logits (B x C), given labels, dataset indices and the 1-based epoch; per-sample
class weights (``--boost``) are normalised over the batch.

- ``wbce``: lambda*CE + (1-lambda)*binary CE, where log p(defect) is the
  log-sum-exp of the defect-class log-probabilities of the live softmax (the
  gradient flows through the binary term); the binary term starts per class at
  its start epoch (before that a sample gets plain CE).
- ``sat``: self-adaptive training (Huang et al. 2020): CE up to epoch ``es``, then
  soft labels t_i <- alpha t_i + (1 - alpha) softmax(f(x_i)) (detached), weights
  w_i = max_j t_ij normalised over the batch, loss -sum_i w_i sum_j t_ij log p_ij.
- ``sat_good``: soft labels updated only for images labelled good ("SAT bad 1").
- ``sat_boost``: sat_good plus class weights (default x5 for lead_defect,
  marking_defect, pocket_damage, scratch, where those classes exist).
"""

from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nexedge.train.config import LOSSES

DEFAULT_BOOST = {"lead_defect": 5.0, "marking_defect": 5.0, "pocket_damage": 5.0, "scratch": 5.0}


def _weighted_mean(per_sample: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (per_sample * w).sum() / w.sum().clamp_min(1e-12)


class TrainLoss:
    """Cross entropy with optional class weights; base of the others."""

    name = "ce"

    def __init__(self, num_classes: int, good_index: int, class_weights: Optional[Sequence[float]] = None) -> None:
        self.num_classes = num_classes
        self.good_index = good_index
        cw = torch.ones(num_classes) if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if cw.shape != (num_classes,) or bool((cw <= 0).any()):
            raise ValueError(f"class weights must be {num_classes} positive numbers, got {cw.tolist()}")
        self.class_weights = cw

    def sample_weights(self, targets: torch.Tensor) -> torch.Tensor:
        return self.class_weights.to(targets.device)[targets]

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        ce = F.cross_entropy(logits, targets, reduction="none")
        return _weighted_mean(ce, self.sample_weights(targets))

    # State for checkpoints / mislabel ranking (stateless here).
    def state(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        pass

    def sync(self, device: Optional[torch.device] = None) -> None:
        """Make per-sample state identical across DDP ranks (after each epoch); collectives run on
        ``device``."""


class WBCELoss(TrainLoss):
    name = "wbce"

    def __init__(
        self,
        num_classes: int,
        good_index: int,
        lam: float = 0.5,
        start_epochs: Optional[Sequence[int]] = None,
        class_weights: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__(num_classes, good_index, class_weights)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"--loss-kw wbce_lambda must be in [0, 1], got {lam}")
        self.lam = float(lam)
        starts = [1] * num_classes if start_epochs is None else [int(s) for s in start_epochs]
        if len(starts) != num_classes:
            raise ValueError(f"need {num_classes} start epochs, got {starts}")
        self.start_epochs = torch.as_tensor(starts)
        self.defect_idx = torch.as_tensor([j for j in range(num_classes) if j != good_index])

    def terms(self, logits: torch.Tensor, targets: torch.Tensor):
        """Per-sample (CE, binary CE), both with gradients."""
        lp = F.log_softmax(logits, dim=1)
        ce = -lp.gather(1, targets[:, None])[:, 0]
        log_good = lp[:, self.good_index]
        log_def = torch.logsumexp(lp[:, self.defect_idx.to(logits.device)], dim=1)
        bce = -torch.where(targets == self.good_index, log_good, log_def)
        return ce, bce

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        ce, bce = self.terms(logits, targets)
        active = self.start_epochs.to(targets.device)[targets] <= epoch
        per = torch.where(active, self.lam * ce + (1.0 - self.lam) * bce, ce)
        return _weighted_mean(per, self.sample_weights(targets))


class SATLoss(TrainLoss):
    name = "sat"

    def __init__(
        self,
        labels: Sequence[int],
        num_classes: int,
        good_index: int,
        alpha: float = 0.9,
        es: int = 60,
        only_good: bool = False,
        class_weights: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__(num_classes, good_index, class_weights)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"--loss-kw sat_alpha must be in [0, 1), got {alpha}")
        if es < 0:
            raise ValueError(f"--loss-kw sat_es must be >= 0, got {es}")
        labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.alpha, self.es, self.only_good = float(alpha), int(es), bool(only_good)
        self.soft = F.one_hot(labels_t, num_classes).float()
        self.labels = labels_t
        self.touched = torch.zeros(len(labels_t), dtype=torch.bool)
        #: Epoch of each sample's last soft-label update: with balanced sampling (with replacement) a
        #: sample drawn several times in an epoch is still updated once, as in the report's epoch loop.
        self.updated_epoch = torch.zeros(len(labels_t), dtype=torch.long)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        cw = self.sample_weights(targets)
        if epoch <= self.es:
            return _weighted_mean(F.cross_entropy(logits, targets, reduction="none"), cw)
        idx = index.cpu()
        mask = torch.ones(len(idx), dtype=torch.bool) if not self.only_good else (targets == self.good_index).cpu()
        # Once per sample per epoch: not yet updated this epoch, and its first draw in this batch.
        mask &= self.updated_epoch[idx] < epoch
        first = torch.zeros(len(idx), dtype=torch.bool)
        first[np.unique(idx.numpy(), return_index=True)[1]] = True
        mask &= first
        if mask.any():
            upd = idx[mask]
            sel = F.softmax(logits.detach().float(), dim=1).cpu()[mask]
            self.soft[upd] = self.alpha * self.soft[upd] + (1.0 - self.alpha) * sel
            self.touched[upd] = True
            self.updated_epoch[upd] = epoch
        t = self.soft[idx].to(logits.device)
        w = t.max(dim=1).values * cw
        per = -(t * F.log_softmax(logits, dim=1)).sum(dim=1)
        return _weighted_mean(per, w)

    @property
    def weights(self) -> torch.Tensor:
        """Unnormalised per-sample weights max_j t_ij (without class weights)."""
        return self.soft.max(dim=1).values

    def state(self) -> Dict[str, torch.Tensor]:
        return {"soft": self.soft.clone()}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        soft = state.get("soft")
        if soft is None or tuple(soft.shape) != tuple(self.soft.shape):
            raise ValueError(
                f"SAT state of shape {None if soft is None else tuple(soft.shape)} does not fit "
                f"{tuple(self.soft.shape)} (training set changed since the checkpoint?)"
            )
        self.soft = soft.float().clone()

    def sync(self, device: Optional[torch.device] = None) -> None:
        """Average this epoch's soft-label updates over the ranks. The all-reduce runs on ``device``
        (the rank's training device): NCCL refuses CPU tensors."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            m = self.touched.float()[:, None]
            total = (self.soft * m).to(device or "cpu")
            count = m.to(device or "cpu")
            dist.all_reduce(total)
            dist.all_reduce(count)
            total, count = total.cpu(), count.cpu()
            hit = count[:, 0] > 0
            self.soft[hit] = total[hit] / count[hit]
        self.touched.zero_()


def parse_class_map(pairs: Sequence[str], classes: Sequence[str], what: str, cast=float) -> Dict[str, float]:
    """``["scratch=5", ...]`` -> {"scratch": 5.0}; unknown classes are an error."""
    out: Dict[str, float] = {}
    for p in pairs or []:
        name, sep, val = p.partition("=")
        if not sep:
            raise ValueError(f"{what} {p!r}: expected CLASS=VALUE")
        if name not in classes:
            raise ValueError(f"{what} {p!r}: class {name!r} is not one of {list(classes)}")
        try:
            out[name] = cast(val)
        except ValueError:
            raise ValueError(f"{what} {p!r}: {val!r} is not a number") from None
    return out


def build_loss(
    name: str,
    labels: Sequence[int],
    classes: Sequence[str],
    good_class: str,
    boost: Optional[Mapping[str, float]] = None,
    sat_alpha: float = 0.9,
    sat_es: int = 60,
    wbce_lambda: float = 0.5,
    wbce_start: Optional[Mapping[str, int]] = None,
    wbce_start_default: int = 1,
) -> TrainLoss:
    """The loss ``name`` for a training set with ``labels`` over ``classes``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    classes = list(classes)
    g = classes.index(good_class)
    weights = dict(boost or {})
    if name == "sat_boost" and boost is None:
        weights = {c: f for c, f in DEFAULT_BOOST.items() if c in classes}
    cw = [float(weights.get(c, 1.0)) for c in classes]
    n = len(classes)
    if name == "ce":
        return TrainLoss(n, g, cw)
    if name == "wbce":
        starts = [int((wbce_start or {}).get(c, wbce_start_default)) for c in classes]
        return WBCELoss(n, g, wbce_lambda, starts, cw)
    loss = SATLoss(labels, n, g, sat_alpha, sat_es, only_good=name != "sat", class_weights=cw)
    loss.name = name
    return loss
