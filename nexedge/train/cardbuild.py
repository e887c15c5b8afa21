"""ModelCards for checkpoints and the top-k checkpoint set.

A card carries the validation operating points (threshold per target TPR with the
Clopper-Pearson lower bound), the validation score histogram, the reference image
statistics of the prepared validation images and the run's provenance.
"""

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from nexedge import metrics, preprocess
from nexedge.card import ModelCard, atomic_write_bytes, card_path_for


def reference_image_stats(images: Sequence[np.ndarray]) -> Dict[str, Dict[str, float]]:
    """{brightness|contrast|sharpness: {mean, std}} over prepared images."""
    return preprocess.reference_image_stats([preprocess.image_stats(im) for im in images])


def build_card(
    classes: Sequence[str],
    good_class: str,
    input_cfg: Mapping[str, Any],
    val_labels: np.ndarray,
    val_scores: np.ndarray,
    image_stats: Optional[Dict[str, Dict[str, float]]],
    metrics_: Mapping[str, Any],
    provenance: Mapping[str, Any],
    tprs: Sequence[float] = metrics.DEFAULT_TPRS,
    source: Optional[Mapping[str, Any]] = None,
) -> ModelCard:
    """Card for a checkpoint from its validation scores (defect score per image); ``source``
    adds to the ``operating_points_source`` record (split, backend, ...)."""
    card = ModelCard.new(
        classes,
        good_class=good_class,
        resize=input_cfg["resize"],
        crop=input_cfg["crop"],
        crop_mode=input_cfg["crop_mode"],
        color=input_cfg["color"],
        mean=input_cfg["mean"],
        std=input_cfg["std"],
        resize_mode=input_cfg.get("resize_mode", "stretch"),
    )
    g = list(classes).index(good_class)
    y_def = (np.asarray(val_labels) != g).astype(int)
    with card.edit():
        if y_def.sum() and (y_def == 0).sum():
            card.set_operating_points(metrics.operating_points(y_def, val_scores, tprs), dict(
                {"status": "measured", "split": "val", "n_good": int((y_def == 0).sum()),
                 "n_defects": int(y_def.sum()), "artifact_sha256": None, "kind": "checkpoint", "precision": "fp32",
                 "crop_mode": input_cfg["crop_mode"], "resize_mode": input_cfg.get("resize_mode", "stretch"),
                 "backend": "torch (trainer)"},
                **dict(source or {})))
        card.set_score_reference(metrics.score_histogram(y_def, val_scores), image_stats)
        card.set_metrics(json_safe(dict(metrics_)))
        card.set_provenance(json_safe(dict(provenance)))
    return card


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


#: How the best checkpoint is chosen (``nexedge train --select``); written into summary.json,
#: topk.json and best.card.json.
BEST_RULES = {
    "val_auc": "highest val AUC; ties: lower val loss, then the later epoch",
    "last": "the last epoch (--select last); the checkpoints kept with it are the epochs just before",
}


class TopK:
    """Keeps the ``k`` best checkpoints by ``select`` (see :data:`BEST_RULES`). ``val_auc``:
    highest validation AUC, ties to the lower validation loss, then to the later epoch (a tie
    on a small validation set is common, and the earliest epoch is usually the least trained).
    ``last``: the latest epochs, newest first.

    The index ``topk.json`` in the run folder lists them best first; files that
    fall out of the set are deleted with their cards.
    """

    def __init__(self, folder: str, k: int = 10, select: str = "val_auc") -> None:
        if k < 1:
            raise ValueError(f"--keep must be >= 1, got {k}")
        if select not in BEST_RULES:
            raise ValueError(f"--select {select!r}: expected one of {', '.join(BEST_RULES)}")
        self.folder, self.k, self.select = folder, k, select
        self.path = os.path.join(folder, "topk.json")
        self.entries: List[Dict[str, Any]] = []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.entries = sorted(json.load(f)["checkpoints"], key=self._entry_key)  # a resume may change the rule

    @staticmethod
    def _num(x: Optional[float], bad: float) -> float:
        return bad if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

    def _key(self, auc: Optional[float], loss: Optional[float] = None, epoch: int = 0) -> tuple:
        """Sort key, best first."""
        if self.select == "last":
            return (-int(epoch),)
        return (-self._num(auc, -1.0), self._num(loss, math.inf), -int(epoch))

    def _entry_key(self, e: Dict[str, Any]) -> tuple:
        return self._key(e["auc"], e.get("val_loss"), e["epoch"])

    def wants(self, auc: float, loss: Optional[float] = None, epoch: int = 0) -> bool:
        if len(self.entries) < self.k:
            return True
        return self._key(auc, loss, epoch) < max(self._entry_key(e) for e in self.entries)

    def add(self, file: str, epoch: int, auc: float, loss: Optional[float] = None) -> List[str]:
        """Record a saved checkpoint; returns the files removed to keep k."""
        self.entries = [e for e in self.entries if e["file"] != file]
        self.entries.append({"file": file, "epoch": int(epoch), "auc": None if math.isnan(auc) else float(auc),
                             "val_loss": None if loss is None or math.isnan(loss) else float(loss)})
        self.entries.sort(key=self._entry_key)
        removed = [e["file"] for e in self.entries[self.k:]]
        self.entries = self.entries[: self.k]
        for f in removed:
            for p in (os.path.join(self.folder, f), card_path_for(os.path.join(self.folder, f))):
                if os.path.exists(p):
                    os.unlink(p)
        self.save()
        return removed

    def save(self) -> None:
        data = {"metric": "val_auc" if self.select == "val_auc" else "epoch", "select": self.select,
                "rule": BEST_RULES[self.select], "k": self.k, "checkpoints": self.entries}
        atomic_write_bytes(self.path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))

    @property
    def files(self) -> List[str]:
        return [os.path.join(self.folder, e["file"]) for e in self.entries]
