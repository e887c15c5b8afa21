"""Class-balanced sampling for imbalanced inspection data (most images are ``good``).

``class``: every class is drawn equally often; ``binary``: half the draws are the
good class, half are defects (defect classes in proportion to their counts);
``sqrt``: class draw probability proportional to sqrt(count). Draws are with
replacement, one epoch = the split size; under torchrun each rank draws its share
from its own seeded generator.
"""

from typing import Iterator, Optional

import numpy as np
import torch

BALANCE_MODES = ("none", "class", "binary", "sqrt")


def sample_weights(labels: np.ndarray, mode: str, good_index: int) -> np.ndarray:
    """Per-sample draw weights (sum 1) for a balance ``mode``."""
    if mode not in BALANCE_MODES[1:]:
        raise ValueError(f"unknown balance mode {mode!r}; expected one of {', '.join(BALANCE_MODES[1:])}")
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=int(labels.max()) + 1).astype(np.float64)
    present = counts > 0
    class_p = np.zeros_like(counts)
    if mode == "class":
        class_p[present] = 1.0
    elif mode == "sqrt":
        class_p = np.sqrt(counts)
    else:
        n_good, n_def = counts[good_index], counts.sum() - counts[good_index]
        if n_good == 0 or n_def == 0:
            raise ValueError(f"--balanced binary needs good and defect images (good {int(n_good)}, defect {int(n_def)})")
        class_p = counts / n_def * 0.5
        class_p[good_index] = 0.5
    class_p = class_p / class_p.sum()
    w = class_p[labels] / counts[labels]
    return w / w.sum()


class BalancedSampler(torch.utils.data.Sampler):
    """Draws ``ceil(len / world_size)`` indices with replacement by ``sample_weights``."""

    def __init__(self, labels: np.ndarray, mode: str, good_index: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, num_samples: Optional[int] = None) -> None:
        self.weights = torch.as_tensor(sample_weights(labels, mode, good_index), dtype=torch.double)
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.num_samples = num_samples or -(-len(labels) // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 1000003 + self.epoch * 1009 + self.rank)
        return iter(torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist())
