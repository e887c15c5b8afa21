"""ResNet18 with two attention estimators ("Learn to pay attention", Jetley et al. 2018),
as in the report's Table 1: attention after conv4 (layer3) and conv5 (layer4); the
average pool replaced by a 3x3 512-channel conv and a global max-pool giving g.

Compatibility ``c_i = <u, l_i (+) g>``. With ``compat="concat"`` (the report's
formula, the default) ``(+)`` is concatenation: then ``<u_g, g>`` is the same for
every position and cancels in the softmax, so the map depends on ``l_i`` only.
``compat="add"`` is the paper's parametrised form: ``l_i`` is projected to g's
dimension by a 1x1 conv and added to g, so the global feature steers the map.
"""

import torch
import torch.nn.functional as F
from torch import nn


class AttentionEstimator(nn.Module):
    """Attention over the positions of a local feature map ``l`` given a global vector ``g``."""

    def __init__(self, local_ch: int, global_ch: int, compat: str = "concat") -> None:
        super().__init__()
        if compat not in ("concat", "add"):
            raise ValueError(f"attention compat must be 'concat' or 'add', got {compat!r}")
        self.compat = compat
        if compat == "concat":
            self.u = nn.Linear(local_ch + global_ch, 1, bias=False)
            self.proj = None
        else:
            self.proj = nn.Conv2d(local_ch, global_ch, kernel_size=1, bias=False)
            self.u = nn.Linear(global_ch, 1, bias=False)

    def forward(self, l: torch.Tensor, g: torch.Tensor):  # noqa: E741
        n, c, h, w = l.shape
        if self.proj is None:
            g_map = g[:, :, None, None].expand(n, g.shape[1], h, w)
            feat = torch.cat([l, g_map], dim=1)
        else:
            feat = self.proj(l) + g[:, :, None, None]
        comp = self.u(feat.flatten(2).transpose(1, 2)).squeeze(2)  # N x (h*w)
        a = F.softmax(comp, dim=1)
        g_a = torch.bmm(l.flatten(2), a.unsqueeze(2)).squeeze(2)  # N x C
        return g_a, a.view(n, 1, h, w)


class ResNetAtt2(nn.Module):
    """Attention after layer3 and layer4 of a torchvision ResNet18/34."""

    def __init__(self, backbone: nn.Module, num_classes: int, compat: str = "concat") -> None:
        super().__init__()
        b = backbone
        self.stem = nn.Sequential(b.conv1, b.bn1, b.relu, b.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = b.layer1, b.layer2, b.layer3, b.layer4
        c3, c4 = 256, 512
        self.conv6 = nn.Sequential(nn.Conv2d(c4, 512, 3, padding=1, bias=False), nn.BatchNorm2d(512), nn.ReLU(True))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.att4 = AttentionEstimator(c3, 512, compat)
        self.att5 = AttentionEstimator(c4, 512, compat)
        self.fc = nn.Linear(c3 + c4, num_classes)

    def forward_maps(self, x: torch.Tensor):
        """Logits and the two attention maps (for inspection)."""
        x = self.layer2(self.layer1(self.stem(x)))
        l4 = self.layer3(x)
        l5 = self.layer4(l4)
        g = torch.flatten(self.pool(self.conv6(l5)), 1)
        g4, a4 = self.att4(l4, g)
        g5, a5 = self.att5(l5, g)
        return self.fc(torch.cat([g4, g5], dim=1)), (a4, a5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_maps(x)[0]
