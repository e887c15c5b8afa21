"""Export formats for pulled samples (and the trainer's mislabel list).

Folder layout written under ``out``::

    images/<sha256>.<ext>            every image once, by content hash
    manifest.jsonl                   canonical, one JSON row per sample (always)
    labelstudio/tasks.json           Label Studio tasks with the model's prediction pre-filled
    labelstudio/labeling_config.xml  the matching labeling config (Image "image", Choices "label")
    folders/<class>/<sha256>.<ext>   ImageNet-style class folders by predicted class (CVAT imports these)
    cleanlab/labels.npy, pred_probs.npy, index.jsonl, classes.json   for rows that carry a label

Manifest row fields: sample_id, path (relative to ``out``), sha256, camera,
frame_id, time (ISO 8601 UTC), ts (epoch s), model_id, threshold, score, probs
{class: p}, predicted, decision, reason, kind, source; optionally label (a given
label, e.g. from the mislabel list) and dataset_path (where the image lives in
the training set).
"""

import datetime as _dt
import json
import os
import re
import shutil
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple
from xml.sax.saxutils import quoteattr

import numpy as np

from nexedge.store import write_atomic

FORMATS = ("manifest", "labelstudio", "folders", "cleanlab")
MANIFEST = "manifest.jsonl"
#: Label Studio control/object names used in tasks and the labeling config.
LS_FROM_NAME = "label"
LS_TO_NAME = "image"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def safe_name(name: str) -> str:
    """A single safe path component for a class or camera name: letters, digits and
    ``._+-`` kept, anything else ``_``; never empty, ``.`` or ``..`` and never hidden."""
    s = _UNSAFE.sub("_", str(name))
    s = s.lstrip(".") or "_"
    return s[:128]


def inside(root: str, path: str) -> bool:
    """True when ``path`` resolves to somewhere under ``root``."""
    r = os.path.realpath(root)
    p = os.path.realpath(path)
    return p == r or p.startswith(r + os.sep)


def iso_time(ts: Optional[float]) -> Optional[str]:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(float(ts), _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def predicted_class(probs: Optional[Dict[str, float]]) -> Optional[str]:
    if not probs:
        return None
    return max(probs.items(), key=lambda kv: kv[1])[0]


def manifest_row_from_sample(row: Dict[str, Any], rel_path: str, store_id: str, source: str) -> Dict[str, Any]:
    """Canonical manifest row for one store sample."""
    return {
        "sample_id": "{}:{}".format(store_id or "store", row["id"]),
        "path": rel_path.replace(os.sep, "/"),
        "sha256": row["sha256"],
        "camera": row.get("camera"),
        "frame_id": row.get("frame_id"),
        "time": iso_time(row.get("ts")),
        "ts": row.get("ts"),
        "model_id": row.get("model_id"),
        "threshold": row.get("threshold"),
        "score": row.get("score"),
        "probs": row.get("probs"),
        "predicted": predicted_class(row.get("probs")),
        "decision": row.get("decision"),
        "reason": row.get("reason"),
        "kind": row.get("kind"),
        "shadow": row.get("shadow"),
        "source": source,
    }


class ManifestWriter:
    """Append-only ``manifest.jsonl`` keyed by ``sample_id``; repairs a torn last line."""

    def __init__(self, out_dir: str) -> None:
        self.path = os.path.join(out_dir, MANIFEST)
        self._ids = set()
        if os.path.exists(self.path):
            rows, good_bytes = _read_lines(self.path)
            if good_bytes != os.path.getsize(self.path):  # a killed writer left half a line
                with open(self.path, "r+b") as f:
                    f.truncate(good_bytes)
                    f.flush()
                    os.fsync(f.fileno())
            self._ids = {r["sample_id"] for r in rows}

    def has(self, sample_id: str) -> bool:
        return sample_id in self._ids

    def append(self, rows: Sequence[Dict[str, Any]]) -> None:
        if not rows:
            return
        data = "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows).encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._ids.update(r["sample_id"] for r in rows)


def _read_lines(path: str) -> Tuple[List[Dict[str, Any]], int]:
    """Rows of a JSONL file and the byte length of its complete, valid prefix."""
    rows, good = [], 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break  # unterminated last line: torn write
        line = data[pos:end].strip()
        if line:
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except ValueError:
                lineno = data.count(b"\n", 0, pos) + 1
                raise ValueError(f"{path}: line {lineno} is not valid JSON") from None
        pos = end + 1
        good = pos
    return rows, good


def read_pull_manifest(out_dir: str) -> List[Dict[str, Any]]:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (run `nexedge pull` into {out_dir} first)")
    return _read_lines(path)[0]


def class_list(rows: Iterable[Dict[str, Any]], classes: Optional[Sequence[str]] = None) -> List[str]:
    """``classes`` if given, else class names in first-seen order from probs, predictions and labels."""
    if classes:
        return list(classes)
    seen: Dict[str, None] = {}
    for r in rows:
        for c in (r.get("probs") or {}):
            seen.setdefault(c, None)
        for key in ("predicted", "label"):
            if r.get(key) is not None:
                seen.setdefault(r[key], None)
    return list(seen)


# -- Label Studio ---------------------------------------------------------------
def labeling_config(classes: Sequence[str]) -> str:
    """Label Studio labeling config: one image, single-choice classification."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        "<View>\n"
        f'  <Image name="{LS_TO_NAME}" value="$image"/>\n'
        f'  <Choices name="{LS_FROM_NAME}" toName="{LS_TO_NAME}" choice="single" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def labelstudio_tasks(rows: Sequence[Dict[str, Any]], url_prefix: str) -> List[Dict[str, Any]]:
    """Label Studio import tasks, one per distinct image (an image seen by several cameras or frames
    is labelled once): ``data`` (image URL plus our metadata, ``sample_ids`` of every sample with these
    bytes) and, where the model scored the image, one ``predictions`` entry with a ``choices`` result."""
    by_sha: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        by_sha.setdefault(r["sha256"], []).append(r)
    tasks = []
    for same in by_sha.values():
        r = next((x for x in same if x.get("probs") or x.get("predicted")), same[0])
        data = {
            "image": url_prefix + r["path"],
            "sha256": r["sha256"],
            "sample_id": r["sample_id"],
            "camera": r.get("camera"),
            "time": r.get("time"),
            "score": r.get("score"),
            "decision": r.get("decision"),
            "reason": r.get("reason"),
        }
        if len(same) > 1:
            data["sample_ids"] = [x["sample_id"] for x in same]
            data["cameras"] = sorted({str(x.get("camera")) for x in same if x.get("camera") is not None})
        if r.get("label") is not None:
            data["given_label"] = r["label"]
        if r.get("dataset_path"):
            data["dataset_path"] = r["dataset_path"]
        task: Dict[str, Any] = {"data": data}
        pred = r.get("predicted") or predicted_class(r.get("probs"))
        if pred is not None:
            prediction: Dict[str, Any] = {
                "model_version": r.get("model_id") or "unknown",
                "result": [
                    {
                        "id": r["sha256"][:10],
                        "from_name": LS_FROM_NAME,
                        "to_name": LS_TO_NAME,
                        "type": "choices",
                        "value": {"choices": [pred]},
                    }
                ],
            }
            if r.get("probs") and pred in r["probs"]:
                prediction["score"] = float(r["probs"][pred])
            task["predictions"] = [prediction]
        tasks.append(task)
    return tasks


def default_ls_prefix(out_dir: str) -> str:
    """URL prefix for Label Studio local-files serving with document root ``/``."""
    return "/data/local-files/?d=" + os.path.abspath(out_dir).lstrip("/").replace(os.sep, "/") + "/"


# -- writers --------------------------------------------------------------------
def _write_json(path: str, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def write_labelstudio(out_dir: str, rows: Sequence[Dict[str, Any]], classes: Sequence[str],
                      url_prefix: Optional[str] = None) -> List[str]:
    folder = os.path.join(out_dir, "labelstudio")
    tasks = labelstudio_tasks(rows, default_ls_prefix(out_dir) if url_prefix is None else url_prefix)
    unknown = {t["predictions"][0]["result"][0]["value"]["choices"][0] for t in tasks if "predictions" in t}
    unknown -= set(classes)
    if unknown:
        raise ValueError(f"predicted classes {sorted(unknown)} are not in the class list {list(classes)}")
    a, b = os.path.join(folder, "tasks.json"), os.path.join(folder, "labeling_config.xml")
    _write_json(a, tasks)
    write_atomic(b, labeling_config(classes).encode("utf-8"))
    return [a, b]


def write_folders(out_dir: str, rows: Sequence[Dict[str, Any]], classes: Sequence[str]) -> List[str]:
    """``folders/<predicted class>/<sha>.<ext>`` (hard links where the file system allows)."""
    top = os.path.join(out_dir, "folders")
    names = {c: safe_name(c) for c in classes}
    if len(set(names.values())) != len(names):
        raise ValueError(f"class names {list(classes)} collide after making them safe folder names")
    written = []
    for r in rows:
        pred = r.get("predicted") or predicted_class(r.get("probs"))
        sub = names.get(pred, "_unscored") if pred is not None else "_unscored"
        if pred is not None and pred not in names:
            raise ValueError(f"predicted class {pred!r} of {r['path']} is not in the class list {list(classes)}")
        src = os.path.join(out_dir, r["path"])
        dst = os.path.join(top, sub, os.path.basename(r["path"]))
        if not inside(top, dst) or not inside(out_dir, src):
            raise ValueError(f"refusing a path outside the export folder: {r['path']!r}")
        if os.path.exists(dst):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # no hard links here (e.g. across file systems): same bytes, copied
            tmp = dst + ".tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        written.append(dst)
    return written


def write_cleanlab(out_dir: str, rows: Sequence[Dict[str, Any]], classes: Sequence[str]) -> List[str]:
    """``labels.npy`` (N,) int64 in [0, K) and ``pred_probs.npy`` (N, K) float32 rows
    summing to 1, in ``classes`` order, for rows that have both a label and probs."""
    use = [r for r in rows if r.get("label") is not None and r.get("probs")]
    if not use:
        raise ValueError("cleanlab format needs rows with a given label and class probabilities; "
                         "pulled production samples have no label (export the mislabel list, or import labels first)")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.empty(len(use), np.int64)
    probs = np.zeros((len(use), len(classes)), np.float64)
    for i, r in enumerate(use):
        if r["label"] not in index:
            raise ValueError(f"label {r['label']!r} of {r['path']} is not in the class list {list(classes)}")
        labels[i] = index[r["label"]]
        for c, p in r["probs"].items():
            if c not in index:
                raise ValueError(f"class {c!r} in the probabilities of {r['path']} is not in {list(classes)}")
            probs[i, index[c]] = float(p)
    sums = probs.sum(axis=1, keepdims=True)
    if np.any(sums <= 0):
        raise ValueError("some rows have all-zero class probabilities")
    probs = (probs / sums).astype(np.float32)
    folder = os.path.join(out_dir, "cleanlab")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, arr in (("labels.npy", labels), ("pred_probs.npy", probs)):
        p = os.path.join(folder, name)
        tmp = p + ".tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, p)
        paths.append(p)
    idx = os.path.join(folder, "index.jsonl")
    write_atomic(idx, "".join(json.dumps({"row": i, "path": r["path"], "sha256": r["sha256"],
                                          "label": r["label"]}) + "\n" for i, r in enumerate(use)).encode())
    cls = os.path.join(folder, "classes.json")
    _write_json(cls, list(classes))
    return paths + [idx, cls]


def export_formats(out_dir: str, formats: Iterable[str], classes: Optional[Sequence[str]] = None,
                   ls_url_prefix: Optional[str] = None) -> Dict[str, List[str]]:
    """Write the requested formats from ``out/manifest.jsonl`` (the manifest itself is always there)."""
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown export format(s) {bad}; expected some of {FORMATS}")
    rows = read_pull_manifest(out_dir)
    cls = class_list(rows, classes)
    out: Dict[str, List[str]] = {"manifest": [os.path.join(out_dir, MANIFEST)]}
    if "labelstudio" in formats:
        out["labelstudio"] = write_labelstudio(out_dir, rows, cls, ls_url_prefix)
    if "folders" in formats:
        out["folders"] = write_folders(out_dir, rows, cls)
    if "cleanlab" in formats:
        out["cleanlab"] = write_cleanlab(out_dir, rows, cls)
    return out
