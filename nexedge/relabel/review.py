"""Export the trainer's mislabel ranking (``nexedge mislabels`` CSV) for human review,
through the same folder layout and formats as pulled samples.

The CSV needs a ``path`` column (relative to the data set root, as the trainer
writes it). Used when present: ``given_label`` (or ``label``), ``direction``
(``good->defect`` / ``defect->good``), ``suspicion``, ``defect_score``,
``flagged``, ``rank``, and class probabilities as ``p_<class>`` columns.

Each exported row keeps ``label`` (the given label) and ``dataset_path``, so
``nexedge import-labels`` moves an image to its corrected class folder.
"""

import csv
import hashlib
import os
from typing import Any, Dict, List, Optional

from nexedge.relabel.formats import ManifestWriter, inside
from nexedge.store import normalize_ext, write_atomic


def _float(v: Any) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def read_mislabel_csv(csv_path: str, flagged_only: bool = True, top: Optional[int] = None) -> List[Dict[str, Any]]:
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"mislabel CSV {csv_path} not found (write one with `nexedge mislabels`)")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if "path" not in cols:
            raise ValueError(f"{csv_path}: expected a 'path' column (nexedge mislabels CSV); found {cols}")
        rows = []
        for row in reader:
            row["_line"] = reader.line_num
            rows.append(row)
    if flagged_only and "flagged" in cols:
        rows = [r for r in rows if str(r.get("flagged", "")).strip() in ("1", "true", "True")]
    if "rank" in cols:
        rows.sort(key=lambda r: _float(r.get("rank")) or 0.0)
    if top is not None:
        rows = rows[:top]
    return rows


def export_mislabels(csv_path: str, dataset: str, out_dir: str, flagged_only: bool = True,
                     top: Optional[int] = None) -> Dict[str, int]:
    """Copy the listed data-set images to ``out/images`` and write manifest rows."""
    from nexedge.data.split import dataset_good_class

    rows = read_mislabel_csv(csv_path, flagged_only, top)
    good = dataset_good_class(dataset)  # recorded by `nexedge split --good-class`
    if good is None and any(os.path.isdir(os.path.join(dataset, sp, "good")) for sp in ("train", "val", "test")):
        good = "good"
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    manifest = ManifestWriter(out_dir)
    new, files = [], 0
    bad = [f"line {r['_line']}: {r['path']!r} is not an image file inside {dataset}" for r in rows
           if not inside(dataset, os.path.join(dataset, r["path"])) or not os.path.isfile(os.path.join(dataset, r["path"]))]
    if bad:
        raise ValueError(f"{csv_path}: {len(bad)} bad row(s), nothing exported:\n  " + "\n  ".join(bad))
    for r in rows:
        rel = r["path"].replace("\\", "/")
        src = os.path.join(dataset, rel)
        sid = "dataset:" + rel
        if manifest.has(sid):
            continue
        with open(src, "rb") as f:
            data = f.read()
        sha = hashlib.sha256(data).hexdigest()
        ext = normalize_ext(os.path.splitext(src)[1] or "png")
        out_rel = f"images/{sha}.{ext}"
        if not os.path.exists(os.path.join(out_dir, out_rel)):
            write_atomic(os.path.join(out_dir, out_rel), data)
            files += 1
        given = r.get("given_label") or r.get("label") or None
        probs = {k[2:]: float(v) for k, v in r.items() if k.startswith("p_") and _float(v) is not None} or None
        predicted = max(probs.items(), key=lambda kv: kv[1])[0] if probs else None
        if predicted is None and r.get("direction") == "defect->good":
            predicted = good  # the data set's negative class, whatever it is called
        new.append({
            "sample_id": sid, "path": out_rel, "sha256": sha, "camera": None, "frame_id": None, "time": None,
            "ts": None, "model_id": None, "threshold": None, "score": _float(r.get("defect_score")),
            "probs": probs, "predicted": predicted, "decision": None, "reason": "mislabel-review",
            "kind": "review", "source": "mislabels:" + os.path.abspath(csv_path),
            "label": given, "dataset_path": rel, "suspicion": _float(r.get("suspicion")),
            "direction": r.get("direction"),
        })
    manifest.append(new)
    return {"received": len(rows), "new": len(new), "files": files}
