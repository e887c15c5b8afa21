"""Spatial transformer (Jaderberg et al.) placed in front of a backbone.

Localisation net: two conv layers (each followed by max-pool and ReLU) and two
fully connected layers, initialised to the identity transform. ``params=6`` is a
full affine transform, ``params=3`` isotropic scale + translation.

The sampling grid is built with a matmul instead of ``F.affine_grid`` so the
model exports to ONNX opset 17 (AffineGrid only exists from opset 20);
``F.grid_sample`` exports as GridSample (opset 16+).
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _base_grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h*w) x 3 homogeneous coordinates in [-1, 1] (align_corners=False, as affine_grid)."""
    ys = (torch.arange(h, device=device, dtype=dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=device, dtype=dtype) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1), torch.ones(h * w, device=device, dtype=dtype)], dim=1)


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Same values as ``F.affine_grid(theta, (N, C, h, w), align_corners=False)``; N x h x w x 2."""
    base = _base_grid(h, w, theta.device, theta.dtype)  # (hw) x 3
    grid = torch.matmul(base, theta.transpose(1, 2))  # N x hw x 2
    return grid.reshape(theta.shape[0], h, w, 2)


class SpatialTransformer(nn.Module):
    """Predicts an affine transform of the input and resamples it (same size out)."""

    def __init__(self, input_size: Sequence[int] = (224, 224), params: int = 6, channels: int = 3) -> None:
        super().__init__()
        if params not in (3, 6):
            raise ValueError(f"STN params must be 6 (affine) or 3 (scale + translation), got {params}")
        h, w = int(input_size[0]), int(input_size[1])
        if h < 24 or w < 24:
            raise ValueError(f"STN needs an input of at least 24x24 px, got {h}x{w}")
        self.params = params
        self.input_size = (h, w)
        self.loc = nn.Sequential(
            nn.Conv2d(channels, 8, kernel_size=7),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(True),
            nn.Conv2d(8, 10, kernel_size=5),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(True),
        )
        with torch.no_grad():
            n_flat = self.loc(torch.zeros(1, channels, h, w)).numel()
        self.fc = nn.Sequential(nn.Linear(n_flat, 32), nn.ReLU(True), nn.Linear(32, params))
        nn.init.zeros_(self.fc[2].weight)
        with torch.no_grad():
            if params == 6:
                self.fc[2].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
            else:
                self.fc[2].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        """N x 2 x 3 affine matrices for a batch."""
        p = self.fc(torch.flatten(self.loc(x), 1))
        if self.params == 6:
            return p.view(-1, 2, 3)
        s, tx, ty = p[:, 0:1], p[:, 1:2], p[:, 2:3]
        zero = torch.zeros_like(s)
        return torch.cat([s, zero, tx, zero, s, ty], dim=1).view(-1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"STN built for input {self.input_size[0]}x{self.input_size[1]}, got "
                f"{x.shape[-2]}x{x.shape[-1]} (the arch's input_size must equal the crop size)"
            )
        grid = affine_grid(self.theta(x), self.input_size[0], self.input_size[1])
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class STNNet(nn.Module):
    """``backbone(stn(x))``; the backbone keeps its own state-dict prefix."""

    def __init__(self, stn: SpatialTransformer, backbone: nn.Module) -> None:
        super().__init__()
        self.stn = stn
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.stn(x))
