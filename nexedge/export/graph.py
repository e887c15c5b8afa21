"""In-graph preprocessing: a torch wrapper that exports preprocessing into the ONNX graph.

Input: prepared uint8 images N x H x W x C (C=1 for gray cards, 3 for rgb), as
:func:`nexedge.preprocess.prepare` makes them. The graph does what
:func:`nexedge.preprocess.host_batch` does on the host — x/255, gray to three
channels (by broadcasting against the per-channel mean/std), normalisation, the
crops in TenCrop order — then the backbone, the per-image aggregate of the crops
(``mean``: the mean of the crop logits, then the softmax; ``max``: the probabilities
of the crop with the highest defect score, see :func:`nexedge.metrics.aggregate_crops`)
and ``defect_score`` = the sum of the defect classes' probabilities
(:func:`nexedge.metrics.defect_score`; never ``1 - p(good)``, which is exactly 0 in
float32 below about 6e-8).

The graph also outputs ``logits``, the per-image logits the crops' aggregate stands for (their
mean, or the top crop's with ``max``): the runtimes compute the class probabilities and the
defect score from it on the host in float64, so no softmax computed in reduced precision (a
TensorRT FP16/INT8 engine flushes probabilities below 6e-8 to 0) ever reaches a score. ``probs``
and ``defect_score`` stay for other consumers of the graph.

The backbone is the submodule ``backbone``; every ONNX node it produces is named
``/backbone/...`` by the TorchScript exporter, which the INT8 quantizer uses to
keep preprocessing and the tail in float (see nexedge.export.quantize).
"""

from typing import Any, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from nexedge import preprocess as pp


def mirrored_offsets(mode: str, size: Tuple[int, int], crop: Tuple[int, int]) -> List[Tuple[int, int, bool]]:
    """Crop offsets in the original image: a crop at (top, left) of the flipped image
    is the flip of the crop at (top, W - left - w) of the original."""
    W, w = int(size[1]), int(crop[1])
    return [(y, W - x - w if f else x, f) for y, x, f in pp.crop_offsets(mode, size, crop)]


class InGraphModel(nn.Module):
    """uint8 N x H x W x C -> (probs N x C, defect_score N, logits N x C: the crops' aggregate)."""

    def __init__(self, backbone: nn.Module, inp: Mapping[str, Any], crops: str, good_index: int,
                 aggregate: str = "mean") -> None:
        super().__init__()
        if aggregate not in ("mean", "max"):
            raise ValueError(f"unknown crop aggregate {aggregate!r}; expected mean or max")
        self.aggregate = aggregate
        self.backbone = backbone
        self.size = (int(inp["resize"][0]), int(inp["resize"][1]))
        self.crop = (int(inp["crop"][0]), int(inp["crop"][1]))
        self.offsets = mirrored_offsets(crops, self.size, self.crop)
        self.k = len(self.offsets)
        self.good_index = int(good_index)
        self.register_buffer("mean", torch.tensor(inp["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(inp["std"], dtype=torch.float32).view(1, 3, 1, 1))

    def crops_of(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x C -> float (N*K) x 3 x h x w, each image's crops contiguous."""
        # Cast before anything else: TensorRT 8.6+ rejects UINT8 intermediate tensors ("TensorRT does not
        # support UINT8 types for intermediate tensors", onnx-tensorrt ModelImporter.cpp) and 8.5 takes a
        # UINT8 input only into a Cast (DataType::kUINT8 docs). Then the same float32 ops in the same
        # order as preprocess.normalize: x * (1/255), - mean, / std.
        x = images.float().permute(0, 3, 1, 2) * (1.0 / 255.0)
        x = (x - self.mean) / self.std  # N x 1 x H x W broadcasts to N x 3 x H x W for gray
        h, w = self.crop
        parts = []
        for y0, x0, flip in self.offsets:
            c = x[:, :, y0 : y0 + h, x0 : x0 + w]
            parts.append(torch.flip(c, dims=[3]) if flip else c)
        if self.k == 1:
            return parts[0]
        return torch.stack(parts, dim=1).reshape(-1, 3, h, w)

    def aggregate_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(N*K) x C crop logits -> N x C image logits by ``self.aggregate``: their mean, or the logits of
        the crop with the highest defect score (exact ties: the mean of the tied crops')."""
        g = self.good_index
        logits = logits.reshape(-1, self.k, logits.shape[-1])
        if self.aggregate == "mean" or self.k == 1:
            return logits.mean(dim=1)
        crop_probs = torch.softmax(logits, dim=2)  # N x K x C
        crop_score = torch.cat([crop_probs[:, :, :g], crop_probs[:, :, g + 1 :]], dim=2).sum(dim=2)
        top = (crop_score >= crop_score.max(dim=1, keepdim=True).values).float()
        return (logits * (top / top.sum(dim=1, keepdim=True)).unsqueeze(2)).sum(dim=1)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.aggregate_logits(self.backbone(self.crops_of(images)))
        probs = torch.softmax(logits, dim=1)
        g = self.good_index
        return probs, torch.cat([probs[:, :g], probs[:, g + 1 :]], dim=1).sum(dim=1), logits


class FoldStack(nn.Module):
    """The K fold models side by side: x -> K x N x C logits. Under the name ``backbone`` its ONNX nodes
    are ``/backbone/folds.N/...``, so the INT8 quantizer's rule for backbones applies unchanged."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.folds = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.folds], dim=0)


#: How the fold models' aligned log-odds of a defect become the ensemble's (nexedge.export.ensemble).
ENSEMBLE_RULES = ("median", "mean", "max")


class EnsembleInGraph(InGraphModel):
    """A fold ensemble: the ``rule`` (median, mean or max) over the fold models' aligned log-odds.

    uint8 N x H x W x C -> (probs N x C, defect_score N, logits N x C). Each fold model f scores the
    crops (the same preprocessing, crops and ``aggregate`` as :class:`InGraphModel`); its log-odds of
    a defect minus ``offsets[f]`` put every fold on one scale (u_f), and the image's score is
    ``expit(rule_f(u_f))`` (the median of an even K is the mean of the middle two). With ``max`` one
    threshold T REJECTs exactly when some fold f reaches its own threshold ``logit(T) + offsets[f]``;
    with ``median`` when at least half of them do. The logits output has the good class at 0 and
    each defect class at ``rule_f(u_f)`` plus the log of its share among the defect classes in the
    folds' mean logits, so its softmax sums the defect classes to the ensemble's score.
    """

    def __init__(self, models: Sequence[nn.Module], inp: Mapping[str, Any], crops: str, good_index: int,
                 num_classes: int, aggregate: str, offsets: Sequence[float], rule: str = "median") -> None:
        super().__init__(FoldStack(models), inp, crops, good_index, aggregate)
        if len(offsets) != len(models):
            raise ValueError(f"{len(offsets)} offsets for {len(models)} fold models")
        if rule not in ENSEMBLE_RULES:
            raise ValueError(f"ensemble rule {rule!r}: expected one of {', '.join(ENSEMBLE_RULES)}")
        self.rule, self.n_folds = rule, len(models)
        self.register_buffer("fold_offsets", torch.tensor([float(o) for o in offsets], dtype=torch.float32).view(-1, 1))
        defect = torch.ones(1, 1, int(num_classes), dtype=torch.float32)
        defect[0, 0, self.good_index] = 0.0
        self.register_buffer("defect_mask", defect)

    def combine(self, u: torch.Tensor) -> torch.Tensor:
        """F x N aligned log-odds -> N, by the rule."""
        if self.rule == "max":
            return u.max(dim=0).values
        if self.rule == "mean":
            return u.mean(dim=0)
        v = torch.sort(u, dim=0).values
        lo, hi = (self.n_folds - 1) // 2, self.n_folds // 2
        return v[lo] if lo == hi else 0.5 * (v[lo] + v[hi])

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.good_index
        stacked = self.backbone(self.crops_of(images))  # F x (N*K) x C
        f, c = stacked.shape[0], stacked.shape[-1]
        z = self.aggregate_logits(stacked.reshape(-1, c)).reshape(f, -1, c)  # F x N x C
        masked = z - 1e4 * (1.0 - self.defect_mask)  # the defect classes only
        u = torch.logsumexp(masked, dim=2) - z[:, :, g] - self.fold_offsets  # F x N aligned log-odds
        score = self.combine(u)  # N
        share = torch.log_softmax(masked.mean(dim=0), dim=1)  # N x C, among the defect classes
        logits = (share + score.unsqueeze(1)) * self.defect_mask[0]  # good class at 0
        probs = torch.softmax(logits, dim=1)
        return probs, torch.cat([probs[:, :g], probs[:, g + 1 :]], dim=1).sum(dim=1), logits
