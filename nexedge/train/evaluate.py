"""``nexedge eval``: the report's Table 3 over the top-k checkpoints of one or more
runs and several crop styles, plus ROC plots, ``eval.json`` and ``eval.csv``.

One TenCrop pass per checkpoint serves every crop style: CenterCrop is crop 4 of
the TenCrop order and FiveCrop crops 0-4 (see nexedge.preprocess.crop_offsets).
"""

import csv
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nexedge import metrics
from nexedge.card import atomic_write_bytes

CROP_LABEL = {"center": "CenterCrop", "five": "FiveCrop", "ten": "TenCrop"}
CROP_SLICE = {"center": [4], "five": [0, 1, 2, 3, 4], "ten": list(range(10))}


def resolve_checkpoints(path: str, top: Optional[int] = None) -> Tuple[str, List[str]]:
    """(label, checkpoint files best first) for a checkpoint file or a run folder."""
    if os.path.isfile(path):
        return os.path.splitext(os.path.basename(path))[0], [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a checkpoint file or run folder")
    label = os.path.basename(os.path.normpath(path))
    index = os.path.join(path, "topk.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = [os.path.join(path, e["file"]) for e in json.load(f)["checkpoints"]]
    else:
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.startswith("ckpt_") and f.endswith(".pt"))
        if not files and os.path.exists(os.path.join(path, "last.pt")):
            files = [os.path.join(path, "last.pt")]
    files = [f for f in files if os.path.exists(f)]
    if not files:
        raise FileNotFoundError(f"{path}: no checkpoints (expected topk.json, ckpt_*.pt or last.pt)")
    return label, files[:top] if top else files


def score_checkpoint(
    ckpt: str, data: str, split: str, crops: Sequence[str], batch_size: int = 64, progress: bool = True,
    _cache: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Defect scores of every image of ``split`` for each crop style: {"labels", "paths", crop: scores}."""
    import torch

    from nexedge.models.checkpoint import model_from_checkpoint
    from nexedge.train.data import ImageFolderSet
    from nexedge.train.engine import crop_logits
    from nexedge.train.transforms import EvalTransform

    model, card = model_from_checkpoint(ckpt)
    widest = "ten" if "ten" in crops else ("five" if "five" in crops else "center")
    key = json.dumps([card.classes, card.input, widest, split])
    cache = _cache if _cache is not None else {}
    ds = cache.get(key)
    if ds is None:
        ds = ImageFolderSet(data, split, card.classes, card.input, EvalTransform(card.input, widest))
        cache.clear()
        cache[key] = ds
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    _, logits, labels = crop_logits(model, loader, torch.device("cpu"), f"{os.path.basename(ckpt)} {split}", progress)
    out: Dict[str, Any] = {"labels": labels, "paths": ds.paths, "good_index": card.good_index, "classes": card.classes}
    for c in crops:
        sel = [0] if widest == "center" else CROP_SLICE[c]
        out[c] = metrics.defect_score(logits[:, sel].mean(axis=1), card.good_index)
    return out


def run_evaluation(
    runs: Sequence[str], data: str, split: str, crops: Sequence[str], out: Optional[str] = None,
    top: Optional[int] = None, batch_size: int = 64, progress: bool = True, tprs: Sequence[float] = metrics.DEFAULT_TPRS,
    print_table: bool = True, tpr_floor: float = metrics.DEFAULT_TPR_FLOOR,
) -> Dict[str, Any]:
    """Evaluate every checkpoint of every run; print and write the table; return the results."""
    from sklearn.metrics import roc_curve

    from nexedge.train.plots import plot_roc

    resolved = [resolve_checkpoints(r, top) for r in runs]
    labels_seen = [lab for lab, _ in resolved]
    if len(set(labels_seen)) != len(labels_seen):
        resolved = [(f"{i + 1}:{lab}", files) for i, (lab, files) in enumerate(resolved)]
    out = out or os.path.join(runs[0] if os.path.isdir(runs[0]) else os.path.dirname(runs[0]) or ".", f"eval_{split}")
    os.makedirs(out, exist_ok=True)
    results: Dict[str, Any] = {"split": split, "data": os.path.abspath(data), "crops": list(crops), "runs": {}}
    rows: List[Dict[str, Any]] = []
    roc: Dict[str, Dict[str, list]] = {c: {} for c in crops}
    cache: Dict[str, Any] = {}
    for label, files in resolved:
        per_crop: Dict[str, List[Dict[str, Any]]] = {c: [] for c in crops}
        for f in files:
            s = score_checkpoint(f, data, split, crops, batch_size, progress, cache)
            y = (s["labels"] != s["good_index"]).astype(int)
            for c in crops:
                rec = {"checkpoint": os.path.basename(f), "auc": metrics.roc_auc(y, s[c]),
                       "fpr_at_tpr": metrics.fpr_at_tprs(y, s[c], tprs)}
                per_crop[c].append(rec)
                rows.append({"run": label, "crop": c, "checkpoint": rec["checkpoint"], "auc": rec["auc"],
                             **{f"fpr@{k}": v for k, v in rec["fpr_at_tpr"].items()}})
                if y.min() != y.max():
                    fpr, tpr, _ = roc_curve(y, s[c])
                    roc[c].setdefault(label, []).append((fpr, tpr))
            n_def, n_good = int(y.sum()), int((y == 0).sum())
        results["runs"][label] = {
            "checkpoints": [os.path.basename(f) for f in files], "n_defects": n_def, "n_good": n_good,
            "crops": {c: _aggregate(per_crop[c], tprs) for c in crops},
        }
    for c in crops:
        if roc[c]:
            plot_roc(roc[c], os.path.join(out, f"roc_{c}.png"), f"ROC on {split} ({CROP_LABEL[c]})")
    atomic_write_bytes(os.path.join(out, "eval.json"), (json.dumps(_jsonable(results), indent=2) + "\n").encode())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(os.path.join(out, "eval.csv"), buf.getvalue().encode())
    results["out"] = out
    results["weak"] = weak_split_warnings(results, tprs, tpr_floor)
    if print_table:
        print(format_table(results))
        for line in results["weak"]:
            print("WARNING: " + line)
        print(f"\nwrote {out}/eval.json, eval.csv and roc_<crop>.png")
    return results


def weak_split_warnings(results: Dict[str, Any], tprs: Sequence[float], floor: float) -> List[str]:
    """One line per TPR target that the split's defect count cannot support: even with every defect
    detected, the 95 % lower bound on TPR stays below ``floor``."""
    first = next(iter(results["runs"].values()), None)
    n = int(first["n_defects"]) if first else 0
    if not n:
        return []
    best = metrics.clopper_pearson_lower(n, n)
    if best >= floor:
        return []
    need = metrics.defects_needed(max(tprs), floor)
    return [f"{results['split']} has {n} defect images: even with all detected the 95 % lower bound on TPR is "
            f"{best:.3f} < floor {floor}; FPR at TPR >= {', '.join(metrics.tpr_key(t) for t in tprs)} % is not "
            f"supported by this split (about {need} defects would be)"]


def _aggregate(recs: List[Dict[str, Any]], tprs: Sequence[float]) -> Dict[str, Any]:
    return {
        "per_checkpoint": recs,
        "auc": metrics.mean_std([r["auc"] for r in recs]),
        "fpr_at_tpr": {
            metrics.tpr_key(t): metrics.mean_std([r["fpr_at_tpr"][metrics.tpr_key(t)] for r in recs]) for t in tprs
        },
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _cell(ms: Dict[str, float]) -> str:
    if ms["n"] == 0:
        return "-"
    return f"{100 * ms['mean']:.2f} ({100 * ms['std']:.2f})"


def format_table(results: Dict[str, Any], markdown: bool = False) -> str:
    """Report Table 3 layout: rows AUC and FPR at each TPR, columns run x crop style; mean (std) in %."""
    cols: List[Tuple[str, str]] = [(r, c) for r in results["runs"] for c in results["crops"]]
    first = next(iter(results["runs"].values()))
    keys = list(first["crops"][results["crops"][0]]["fpr_at_tpr"])
    head = ["mean (std) %"] + [f"{r} {CROP_LABEL[c]}" if len(results["runs"]) > 1 else CROP_LABEL[c] for r, c in cols]
    body = [["AUC"] + [_cell(results["runs"][r]["crops"][c]["auc"]) for r, c in cols]]
    for k in keys:
        body.append([f"FPR at TPR >= {k}"] + [_cell(results["runs"][r]["crops"][c]["fpr_at_tpr"][k]) for r, c in cols])
    n = [len(v["checkpoints"]) for v in results["runs"].values()]
    note = (f"{results['split']} split: {first['n_good']} good, {first['n_defects']} defect images; "
            f"mean (std) over {', '.join(map(str, n))} checkpoint(s)")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines) + f"\n\n{note}\n"
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    fmt = "  ".join("{:<" + str(w) + "}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in body]
                     + [note])
