"""Tensor transforms on prepared uint8 H x W x C images.

Eval: :func:`nexedge.preprocess.host_batch` itself (K x 3 x h x w, TenCrop order).
Train: gray to 3 channels, rotation within 10 degrees, slight affine, brightness /
contrast / saturation jitter, then a random crop or the eval crop style, then
ImageNet normalisation (the report's section 3.1).
"""

from typing import Any, Mapping

import numpy as np
import torch

from nexedge import preprocess

TRAIN_CROPS = ("random", "center", "five", "ten")


class EvalTransform:
    """Prepared image -> K x 3 x h x w float tensor, exactly ``preprocess.host_batch``."""

    def __init__(self, input_cfg: Mapping[str, Any], mode: str) -> None:
        preprocess.n_crops(mode)
        self.input_cfg = dict(input_cfg)
        self.mode = mode

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(preprocess.host_batch(img[None], self.input_cfg, self.mode))


class TrainTransform:
    """Prepared image -> K x 3 x h x w augmented tensor (K = 1 for ``random``/``center``)."""

    def __init__(
        self,
        input_cfg: Mapping[str, Any],
        crop: str = "random",
        rotation: float = 10.0,
        translate: float = 0.05,
        scale: float = 0.05,
        jitter: float = 0.2,
    ) -> None:
        from torchvision.transforms import v2

        if crop not in TRAIN_CROPS:
            raise ValueError(f"unknown train crop {crop!r}; expected one of {TRAIN_CROPS}")
        self.input_cfg = dict(input_cfg)
        self.crop = crop
        self.geo = v2.Compose(
            [
                v2.RandomRotation(rotation),
                v2.RandomAffine(degrees=0, translate=(translate, translate), scale=(1 - scale, 1 + scale)),
            ]
        )
        self.color = v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter)
        self.random_crop = v2.RandomCrop(tuple(self.input_cfg["crop"]))

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1).contiguous()
        t = self.color(self.geo(t))
        if self.crop == "random":
            t = self.random_crop(t)
            x = t.float().div_(255.0)
            mean = torch.tensor(self.input_cfg["mean"]).view(3, 1, 1)
            std = torch.tensor(self.input_cfg["std"]).view(3, 1, 1)
            return ((x - mean) / std).unsqueeze(0)
        # Eval crop geometry on the augmented image (RGB already, so gray is kept as is).
        return torch.from_numpy(preprocess.host_batch(t.permute(1, 2, 0).numpy()[None], self.input_cfg, self.crop))
