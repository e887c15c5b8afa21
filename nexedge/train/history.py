"""Per-epoch metrics table: ``metrics.jsonl`` (one JSON object per epoch) and a
flat ``metrics.csv`` with one column per (split, metric[, class])."""

import csv
import json
import math
import os
from typing import Any, Dict, List

from nexedge.card import atomic_write_bytes


def flatten(row: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"val": {"auc": .9, "per_class": {"good": {"acc": 1}}}} -> {"val.auc": .9, "val.good.acc": 1}."""
    out: Dict[str, Any] = {}
    for k, v in row.items():
        if k == "per_class":
            out.update(flatten(v, prefix))
        elif k == "fpr_at_tpr":
            for t, x in v.items():
                out[f"{prefix}fpr@{t}"] = x
        elif isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


class History:
    """Epoch records; rewritten atomically after each epoch (so a resume can truncate)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.jsonl = os.path.join(folder, "metrics.jsonl")
        self.csv = os.path.join(folder, "metrics.csv")
        self.rows: List[Dict[str, Any]] = []
        if os.path.exists(self.jsonl):
            with open(self.jsonl, encoding="utf-8") as f:
                self.rows = [json.loads(line) for line in f if line.strip()]

    def truncate(self, last_epoch: int) -> None:
        self.rows = [r for r in self.rows if r["epoch"] <= last_epoch]

    def append(self, row: Dict[str, Any]) -> None:
        self.rows.append(_clean(row))
        self.save()

    def save(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        atomic_write_bytes(self.jsonl, text.encode("utf-8"))
        flat = [flatten(r) for r in self.rows]
        cols: List[str] = []
        for fr in flat:
            cols += [c for c in fr if c not in cols]
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for fr in flat:
            w.writerow({k: ("" if v is None else v) for k, v in fr.items()})
        atomic_write_bytes(self.csv, buf.getvalue().encode("utf-8"))

    def series(self, split: str, *path: str) -> List[float]:
        """Values over epochs of ``row[split][path...]`` (NaN where absent)."""
        out = []
        for r in self.rows:
            v: Any = r.get(split)
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            out.append(float("nan") if v is None else float(v))
        return out

    @property
    def epochs(self) -> List[int]:
        return [r["epoch"] for r in self.rows]


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
