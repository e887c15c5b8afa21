"""``nexedge import-labels``: bring human labels back into a training data set.

Input: a Label Studio export (JSON, full or JSON-MIN, or its CSV with the
``image`` URL) or a CSV with a ``path`` or ``sha256`` column and a ``label`` column (``corrected_label``/``new_label``
win over ``label`` when present; optional ``annotator``).

Every row is validated first (class name is one of the data set's class
folders, the image is found and readable, no conflicting labels for the same
image); any bad row stops the import with every problem listed by line number,
and nothing is written (``skip_bad`` imports the good rows and reports the
rest). Then:

* a new image is copied to ``<dataset>/<split>/<label>/<sha256>.<ext>`` (temp
  file, fsync, then all renamed at the end);
* an image already in the data set (same bytes) is skipped as a duplicate; with
  another label it is counted as a label conflict, or moved to the new class
  with ``relabel`` (``--relabel``);
* an image that *is* a data-set image (mislabel review: its ``dataset_path``,
  or a CSV path inside the data set) with a different label is moved to the new
  class folder (relabel); with the same label it is recorded as confirmed;
* one provenance row per change goes to ``<dataset>/provenance.jsonl`` (action,
  path, sha256, label, previous label, source, annotator, time, input line), and
  ``<dataset>/manifest.jsonl`` and the counts in ``<dataset>/dataset.json`` are
  updated when the data set has them.
"""

import csv
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import uuid
from typing import Any, Dict, List, Optional, Tuple

from nexedge.images import READ_EXTS
from nexedge.relabel.formats import LS_FROM_NAME, MANIFEST, inside
from nexedge.store import write_atomic
from nexedge.store.files import try_flock

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SHA_IN = re.compile(r"([0-9a-f]{64})")
_TMP = ".tmp-import-"


class Item:
    """One labelled row of the input."""

    def __init__(self, line: int, label: str, sha256: Optional[str] = None, path: Optional[str] = None,
                 dataset_path: Optional[str] = None, annotator: Any = None, sample_id: Optional[str] = None) -> None:
        self.line = line
        self.label = label
        self.sha256 = sha256
        self.path = path
        self.dataset_path = dataset_path
        self.annotator = annotator
        self.sample_id = sample_id
        self.src: Optional[str] = None  # resolved source file


def _sha_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- reading the inputs -------------------------------------------------------------
def _json_array_with_lines(text: str, path: str) -> List[Tuple[int, Any]]:
    """Elements of a top-level JSON array with the line each starts on."""
    dec = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text[i:i + 1] == "[":
        raise ValueError(f"{path}: expected a JSON array of tasks (Label Studio export)")
    i += 1
    out = []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise ValueError(f"{path}: JSON array is not closed")
        if text[i] == "]":
            return out
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except ValueError as e:
            raise ValueError(f"{path}: line {line}: invalid JSON: {e}") from None
        out.append((line, obj))


def _annotator(a: Any) -> Any:
    if isinstance(a, dict):
        return a.get("email") or a.get("username") or a.get("id")
    return a


def _ls_label(task: Dict[str, Any]) -> Tuple[Optional[str], Any, Optional[str]]:
    """(label, annotator, problem) from a full Label Studio export task; the newest
    non-cancelled annotation wins. (None, None, None) means not labelled yet."""
    anns = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not anns:
        return None, None, None
    ann = sorted(anns, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))[-1]
    choices = [r for r in ann.get("result") or [] if r.get("type") == "choices"]
    named = [r for r in choices if r.get("from_name") == LS_FROM_NAME] or choices
    if not named:
        return None, None, "annotation has no 'choices' result"
    values = (named[0].get("value") or {}).get("choices") or []
    if len(values) != 1:
        return None, None, f"expected exactly one choice, got {values!r}"
    return str(values[0]), _annotator(ann.get("completed_by")), None


def read_labels(path: str) -> Tuple[List[Item], List[str], int]:
    """(items, errors, unlabelled) from a Label Studio JSON export or a CSV."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels file {path} not found")
    items, errors, unlabelled = [], [], 0
    if path.lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            label_col = next((c for c in ("corrected_label", "new_label", "label") if c in cols), None)
            if label_col is None or not ({"path", "sha256", "image"} & set(cols)):
                raise ValueError(f"{path}: CSV needs a 'label' (or corrected_label) column and a 'path', "
                                 f"'sha256' or 'image' (Label Studio CSV export) column; found {cols}")
            for row in reader:
                ln = reader.line_num
                label = (row.get(label_col) or "").strip()
                if not label:
                    unlabelled += 1
                    continue
                sha = (row.get("sha256") or "").strip().lower() or None
                p = (row.get("path") or "").strip() or None
                if sha is None and p is None and row.get("image"):  # Label Studio CSV: the task's image URL
                    m = _SHA_IN.findall(row["image"])
                    sha = m[-1] if m else None
                if sha is None and p is None:
                    errors.append(f"line {ln}: neither path nor sha256 given")
                    continue
                items.append(Item(ln, label, sha256=sha, path=p, dataset_path=(row.get("dataset_path") or None),
                                  annotator=row.get("annotator") or None))
        return items, errors, unlabelled
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for ln, task in _json_array_with_lines(text, path):
        if not isinstance(task, dict):
            errors.append(f"line {ln}: expected a task object")
            continue
        if "data" in task:  # full export
            data = task["data"] or {}
            label, annotator, problem = _ls_label(task)
        else:  # JSON-MIN: data fields and control names at the top level
            data = task
            lab = task.get(LS_FROM_NAME)
            if isinstance(lab, dict):
                lab = (lab.get("choices") or [None])[0]
            label, annotator, problem = (str(lab) if lab else None), task.get("annotator"), None
        if problem:
            errors.append(f"line {ln}: task {task.get('id')}: {problem}")
            continue
        if label is None:
            unlabelled += 1
            continue
        sha = data.get("sha256")
        if not sha:
            m = _SHA_IN.findall(str(data.get("image") or ""))
            sha = m[-1] if m else None
        if not sha:
            errors.append(f"line {ln}: task {task.get('id')}: cannot tell which image (no sha256 in data or image name)")
            continue
        items.append(Item(ln, label, sha256=str(sha).lower(), dataset_path=data.get("dataset_path"),
                          annotator=annotator, sample_id=data.get("sample_id")))
    return items, errors, unlabelled


# -- the data set -------------------------------------------------------------------
class Dataset:
    """Class folders and a content-hash index of an ImageFolder data set."""

    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data set folder {root} not found")
        self.root = os.path.abspath(root)
        self.classes: List[str] = []
        self.by_sha: Dict[str, str] = {}  # sha256 -> path relative to root
        for split in SPLITS:
            sdir = os.path.join(self.root, split)
            if not os.path.isdir(sdir):
                continue
            for cls in sorted(os.listdir(sdir)):
                cdir = os.path.join(sdir, cls)
                if not os.path.isdir(cdir) or cls.startswith("."):
                    continue
                if cls not in self.classes:
                    self.classes.append(cls)
                for name in sorted(os.listdir(cdir)):
                    if name.startswith(".") or not name.lower().endswith(READ_EXTS):
                        continue
                    self.by_sha.setdefault(_sha_file(os.path.join(cdir, name)), f"{split}/{cls}/{name}")
        if not self.classes:
            raise ValueError(f"{root} has no class folders under {'/'.join(SPLITS)} (expected <root>/train/<class>/)")


def _resolve(item: Item, ds: Dataset, images_dir: Optional[str], base_dir: str) -> Tuple[Optional[str], bool, Optional[str]]:
    """(source file, is a data-set image, problem)."""
    if item.dataset_path:
        p = os.path.join(ds.root, item.dataset_path)
        if not inside(ds.root, p) or not os.path.isfile(p):
            return None, False, f"dataset_path {item.dataset_path!r} is not a file inside the data set"
        return p, True, None
    if item.path:
        cands = [item.path] if os.path.isabs(item.path) else [
            os.path.join(d, item.path) for d in (base_dir, images_dir, ds.root) if d]
        for c in cands:
            if os.path.isfile(c):
                return c, inside(ds.root, c), None
        return None, False, f"image {item.path!r} not found (looked in {', '.join(cands)})"
    if images_dir:
        folder = os.path.join(images_dir, "images")
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.split(".", 1)[0] == item.sha256:
                return os.path.join(folder, name), False, None
    if item.sha256 in ds.by_sha:
        return os.path.join(ds.root, ds.by_sha[item.sha256]), True, None
    return None, False, f"no image with sha256 {item.sha256} in {images_dir or '(no --images folder)'} or the data set"


def _move_op(op: Dict[str, Any], rel: str, label: str, sha: str, root: str) -> None:
    """Turn ``op`` into a move of data-set image ``rel`` (``<split>/<class>/<file>``) to class ``label``."""
    parts = rel.split("/")
    dst = f"{parts[0]}/{label}/{parts[2]}"
    if os.path.exists(os.path.join(root, dst)):
        dst = f"{parts[0]}/{label}/{sha}{os.path.splitext(parts[2])[1].lower()}"
    op.update(action="relabel", src=rel, path=dst, previous=parts[1])


def plan_import(labels_file: str, dataset: str, split: str = "train", images_dir: Optional[str] = None,
                skip_bad: bool = False, relabel: bool = False) -> Dict[str, Any]:
    """Validate everything and return the plan (nothing is written)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} unknown; expected one of {SPLITS}")
    items, errors, unlabelled = read_labels(labels_file)
    ds = Dataset(dataset)
    base = os.path.dirname(os.path.abspath(labels_file))
    ops: List[Dict[str, Any]] = []
    seen: Dict[str, Item] = {}
    for it in items:
        if it.label not in ds.classes:
            errors.append(f"line {it.line}: label {it.label!r} is not a class of {dataset} (classes: {ds.classes})")
            continue
        src, in_ds, problem = _resolve(it, ds, images_dir, base)
        if problem:
            errors.append(f"line {it.line}: {problem}")
            continue
        sha = _sha_file(src)
        if it.sha256 and sha != it.sha256:
            errors.append(f"line {it.line}: file {src} has sha256 {sha}, not {it.sha256}")
            continue
        prev = seen.get(sha)
        if prev is not None:
            if prev.label != it.label:
                errors.append(f"line {it.line}: same image as line {prev.line} but label {it.label!r} vs {prev.label!r}")
            continue
        seen[sha] = it
        op = {"line": it.line, "sha256": sha, "label": it.label, "annotator": it.annotator, "sample_id": it.sample_id}
        if in_ds:
            rel = os.path.relpath(src, ds.root).replace(os.sep, "/")
            parts = rel.split("/")
            if len(parts) != 3 or parts[0] not in SPLITS:
                errors.append(f"line {it.line}: {rel} is not at <split>/<class>/<file> in the data set")
                continue
            if parts[1] == it.label:
                op.update(action="confirm", path=rel, previous=parts[1])
            else:
                _move_op(op, rel, it.label, sha, ds.root)
        elif sha in ds.by_sha:
            have = ds.by_sha[sha]
            op.update(action="duplicate", path=have, previous=have.split("/")[1])
            if op["previous"] != it.label and relabel:
                _move_op(op, have, it.label, sha, ds.root)  # the annotator corrected a data-set image
            elif op["previous"] != it.label:
                log.warning("line %d: image already in the data set as %s, labelled %r there and %r here; left as "
                            "it is (--relabel moves it to %r)", it.line, have, op["previous"], it.label, it.label)
                op["conflict"] = True
        else:
            ext = os.path.splitext(src)[1].lower()
            if ext not in READ_EXTS:
                errors.append(f"line {it.line}: {src} has extension {ext!r}; the trainer reads {READ_EXTS}")
                continue
            op.update(action="add", src_abs=src, path=f"{split}/{it.label}/{sha}{ext}", previous=None)
        ops.append(op)
    if errors and not skip_bad:
        raise ValueError(f"{labels_file}: {len(errors)} bad row(s), nothing imported:\n  " + "\n  ".join(errors))
    return {"ops": ops, "errors": errors, "unlabelled": unlabelled, "dataset": ds.root, "source": labels_file}


class _DatasetLock:
    """One import at a time per data set (flock on ``<dataset>/.import.lock``); clears temp
    files an interrupted import left in the class folders."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.fd: Optional[int] = None

    def __enter__(self) -> "_DatasetLock":
        self.fd = try_flock(os.path.join(self.root, ".import.lock"))
        if self.fd is None:
            raise RuntimeError(f"another import-labels is writing into {self.root}; wait for it")
        for split in SPLITS:
            sdir = os.path.join(self.root, split)
            for cls in os.listdir(sdir) if os.path.isdir(sdir) else []:
                cdir = os.path.join(sdir, cls)
                for name in os.listdir(cdir) if os.path.isdir(cdir) else []:
                    if name.startswith((_TMP, ".tmp-")):
                        os.unlink(os.path.join(cdir, name))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)


def apply_import(plan: Dict[str, Any], source: Optional[str] = None) -> Dict[str, int]:
    """Carry out a validated plan (under the data-set lock)."""
    with _DatasetLock(plan["dataset"]):
        return _apply(plan, source)


def _apply(plan: Dict[str, Any], source: Optional[str]) -> Dict[str, int]:
    """Temp copies, then renames, then manifest and provenance."""
    root = plan["dataset"]
    ops = plan["ops"]
    temps: List[Tuple[str, str]] = []
    try:
        for op in ops:
            if op["action"] != "add":
                continue
            dst = os.path.join(root, op["path"])
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = os.path.join(os.path.dirname(dst), f"{_TMP}{uuid.uuid4().hex[:12]}")
            with open(op["src_abs"], "rb") as f:
                write_atomic(tmp, f.read())
            temps.append((tmp, dst))
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for tmp, dst in temps:
        os.replace(tmp, dst)
    for op in ops:
        if op["action"] == "relabel":
            dst = os.path.join(root, op["path"])
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(os.path.join(root, op["src"]), dst)
    _update_manifest(root, ops)
    update_dataset_counts(root)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    src_name = source or os.path.basename(plan["source"])
    prov = []
    for op in ops:
        if op["action"] == "duplicate":
            continue
        row = {"time": now, "action": op["action"], "path": op["path"], "sha256": op["sha256"], "label": op["label"],
               "previous_label": op["previous"], "source": src_name, "annotator": op["annotator"],
               "input_line": op["line"]}
        if op["action"] == "relabel":
            row["from_path"] = op["src"]
        if op.get("sample_id"):
            row["sample_id"] = op["sample_id"]
        prov.append(json.dumps(row) + "\n")
    if prov:
        with open(os.path.join(root, "provenance.jsonl"), "a", encoding="utf-8") as f:
            f.write("".join(prov))
            f.flush()
            os.fsync(f.fileno())
    return _counts(plan)


def _counts(plan: Dict[str, Any]) -> Dict[str, int]:
    counts = {k: sum(op["action"] == k for op in plan["ops"]) for k in ("add", "relabel", "confirm", "duplicate")}
    counts["label_conflicts"] = sum(bool(op.get("conflict")) for op in plan["ops"])
    counts.update(bad=len(plan["errors"]), unlabelled=plan["unlabelled"])
    return counts


def update_dataset_counts(root: str) -> None:
    """Recount ``<dataset>/dataset.json`` (counts per split and class, n_images) from the class folders,
    so what it says matches what the trainer will read. Untouched when the data set has none."""
    path = os.path.join(root, "dataset.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    counts: Dict[str, Dict[str, int]] = {}
    for split in SPLITS:
        sdir = os.path.join(root, split)
        counts[split] = {}
        for cls in sorted(os.listdir(sdir)) if os.path.isdir(sdir) else []:
            cdir = os.path.join(sdir, cls)
            if os.path.isdir(cdir) and not cls.startswith("."):
                counts[split][cls] = sum(1 for n in os.listdir(cdir)
                                         if not n.startswith(".") and n.lower().endswith(READ_EXTS))
    info["counts"] = counts
    info["n_images"] = sum(sum(c.values()) for c in counts.values())
    write_atomic(path, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _update_manifest(root: str, ops: List[Dict[str, Any]]) -> None:
    """Keep ``<dataset>/manifest.jsonl`` in step: moved rows get their new path and label,
    added images get a row. Rewritten atomically; untouched when the data set has none."""
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path) or not any(op["action"] in ("add", "relabel") for op in ops):
        return
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    moved = {op["src"]: op for op in ops if op["action"] == "relabel"}
    for r in rows:
        op = moved.get(r.get("path"))
        if op is not None:
            r["path"] = op["path"]
            r["label"] = op["label"]
            r["relabeled_from"] = op["previous"]
    for op in ops:
        if op["action"] == "add":
            rows.append({"path": op["path"], "split": op["path"].split("/")[0], "label": op["label"],
                         "sha256": op["sha256"], "source": "import-labels"})
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))


def import_labels(labels_file: str, dataset: str, split: str = "train", images_dir: Optional[str] = None,
                  skip_bad: bool = False, dry_run: bool = False, source: Optional[str] = None,
                  relabel: bool = False) -> Dict[str, Any]:
    """Validate, then (unless ``dry_run``) apply. Returns counts and the problems found."""
    plan = plan_import(labels_file, dataset, split=split, images_dir=images_dir, skip_bad=skip_bad, relabel=relabel)
    if dry_run:
        counts = _counts(plan)
    else:
        counts = apply_import(plan, source=source)
    return {"counts": counts, "errors": plan["errors"]}
