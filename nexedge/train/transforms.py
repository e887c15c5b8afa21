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
from nexedge.train.config import FLIPS, PHOTOMETRIC  # noqa: F401  (re-exported)

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
    """Prepared image -> K x 3 x h x w augmented tensor (K = 1 for ``random``/``center``).

    A random mirror (``flip``: h, v or hv, each axis with probability 1/2), then one OpenCV
    warp does rotation (within ``rotation`` degrees), scale and
    translation; then brightness, contrast and (colour images) saturation jitter;
    then a random crop or the eval crop style; then normalisation. Random numbers
    come from torch, which DataLoader seeds per worker.
    """

    def __init__(
        self,
        input_cfg: Mapping[str, Any],
        crop: str = "random",
        rotation: float = 10.0,
        translate: float = 0.05,
        scale: float = 0.05,
        jitter: float = 0.2,
        flip: str = "none",
        photometric: str = "report",
    ) -> None:
        if crop not in TRAIN_CROPS:
            raise ValueError(f"unknown train crop {crop!r}; expected one of {TRAIN_CROPS}")
        if flip not in FLIPS:
            raise ValueError(f"unknown flip {flip!r}; expected one of {FLIPS}")
        self.input_cfg = dict(input_cfg)
        self.crop = crop
        self.flip = flip
        if photometric not in PHOTOMETRIC:
            raise ValueError(f"unknown photometric recipe {photometric!r}; expected one of {sorted(PHOTOMETRIC)}")
        self.photometric = photometric
        self.gamma, self.blur, self.noise = (PHOTOMETRIC[photometric][k] for k in ("gamma", "blur", "noise"))
        self.rotation, self.translate, self.scale, self.jitter = rotation, translate, scale, jitter

    def augment(self, img: np.ndarray) -> np.ndarray:
        """uint8 H x W x C -> float32 H x W x C in [0, 255], geometrically and photometrically jittered."""
        import cv2

        r = (torch.rand(7) * 2 - 1).tolist()
        if self.flip != "none":  # extra draws only here, so a seed's default training stays as it was
            fh, fv = torch.rand(2).tolist()
            if "h" in self.flip and fh < 0.5:
                img = img[:, ::-1]
            if "v" in self.flip and fv < 0.5:
                img = img[::-1]
            img = np.ascontiguousarray(img)
        h, w = img.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), r[0] * self.rotation, 1.0 + r[1] * self.scale)
        m[:, 2] += (r[2] * self.translate * w, r[3] * self.translate * h)
        out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        x = out.reshape(h, w, -1).astype(np.float32)
        x *= 1.0 + r[4] * self.jitter
        mu = float(x.mean())
        x = (x - mu) * (1.0 + r[5] * self.jitter) + mu
        if x.shape[2] == 3:
            gray = x @ np.asarray([0.299, 0.587, 0.114], np.float32)
            x = (x - gray[:, :, None]) * (1.0 + r[6] * self.jitter) + gray[:, :, None]
        if self.photometric != "report":
            x = self._shift(np.clip(x, 0.0, 255.0))
        return np.clip(x, 0.0, 255.0)

    def _shift(self, x: np.ndarray) -> np.ndarray:
        import cv2

        g, b, n, on = torch.rand(4).tolist()
        x = 255.0 * (x / 255.0) ** np.float32(np.exp((2 * g - 1) * self.gamma))
        if on < 0.5 and self.blur > 0:
            sigma = max(0.3, b * self.blur)
            x = cv2.GaussianBlur(x, (0, 0), sigma).reshape(x.shape)
        if self.noise > 0:
            x = x + torch.randn(x.shape).numpy() * np.float32(n * self.noise)
        return x.astype(np.float32)

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        x = self.augment(img)
        if self.crop == "random":
            ch, cw = self.input_cfg["crop"]
            top = int(torch.randint(0, x.shape[0] - ch + 1, (1,)))
            left = int(torch.randint(0, x.shape[1] - cw + 1, (1,)))
            x = preprocess.normalize(x[top : top + ch, left : left + cw], self.input_cfg["mean"], self.input_cfg["std"])
            return torch.from_numpy(x).unsqueeze(0)
        return torch.from_numpy(preprocess.host_batch(x[None], self.input_cfg, self.crop))
