"""ResNet18 with two attention estimators ("Learn to pay attention", Jetley et al. 2018),
as in the report's Table 1: attention after conv4 (layer3) and conv5 (layer4); the
average pool replaced by a 3x3 512-channel conv and a global max-pool giving g.

Three compatibility functions between a local feature ``l_i`` and g:

* ``compat="concat"`` (the report's formula, the default, kept for reproduction):
  ``c_i = <u, [l_i, g]> = <u_l, l_i> + <u_g, g>``. The g term is the same at every
  position and cancels in the softmax: the map depends on ``l_i`` only, and conv6
  (which only feeds g) gets no gradient from the classifier.
* ``compat="add"`` (the paper's parametrised form): ``c_i = <u, P l_i + g>`` with a
  1x1 conv P; it is ``<u, P l_i> + <u, g>`` and g cancels in exactly the same way.
  It does not let g steer the map.
* ``compat="dot"`` (the paper's dot-product form): ``c_i = <P l_i, g>`` after P
  projects ``l_i`` to g's width. g multiplies every position differently, so it
  steers the map and conv6 learns. Use this one when g should matter.
"""

import torch
import torch.nn.functional as F
from torch import nn

COMPATS = ("concat", "add", "dot")


class AttentionEstimator(nn.Module):
    """Attention over the positions of a local feature map ``l`` given a global vector ``g``."""

    def __init__(self, local_ch: int, global_ch: int, compat: str = "concat") -> None:
        super().__init__()
        if compat not in COMPATS:
            raise ValueError(f"attention compat must be one of {', '.join(COMPATS)}, got {compat!r}")
        self.compat = compat
        self.u = None
        if compat == "concat":
            self.u = nn.Linear(local_ch + global_ch, 1, bias=False)
            self.proj = None
        else:
            self.proj = nn.Conv2d(local_ch, global_ch, kernel_size=1, bias=False)
            if compat == "add":
                self.u = nn.Linear(global_ch, 1, bias=False)

    def forward(self, l: torch.Tensor, g: torch.Tensor):  # noqa: E741
        n, c, h, w = l.shape
        if self.compat == "dot":
            # <P l_i, g> / sqrt(d): the scale keeps the softmax out of saturation at init.
            comp = torch.bmm(g.unsqueeze(1), self.proj(l).flatten(2)).squeeze(1) / float(g.shape[1]) ** 0.5
        else:
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
