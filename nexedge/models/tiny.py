"""A tiny CNN for fast tests and CPU demos (any input of 16 px or more)."""

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def tiny(name: str, num_classes: int, pretrained: str = "none", width: int = 16) -> nn.Module:
    """The factory declared in ``nexedge/models/archs/small.py`` (no pretrained weights: the registry
    refuses any ``--pretrained`` but none before this is called)."""
    return TinyNet(num_classes, width=width)
