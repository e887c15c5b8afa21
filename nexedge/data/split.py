"""The report's train/val/test split, for synthetic data and for any folder of images sorted by class.

Per class: 10 % of the images to test, then 10 % of the rest to val, the remainder to
train; a class with fewer than 10 images gets exactly one test and one val image. The
split of a class depends only on the seed, the class name and the file names, so adding
a class or an image elsewhere does not reshuffle it.
"""

import json
import logging
import os
import shutil
import zlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nexedge.images import READ_EXTS

SPLITS = ("train", "val", "test")
LINK_MODES = ("copy", "hard", "sym")
log = logging.getLogger(__name__)


def split_counts(n: int, cls: str = "?") -> Tuple[int, int, int]:
    """(test, val, train) image counts for a class of ``n`` images."""
    if n < 2:
        raise ValueError(f"class {cls!r} has {n} image(s); expected at least 2 (one for test, one for val)")
    if n < 10:
        test, val = 1, 1
    else:
        test = max(1, int(n * 0.1 + 0.5))
        val = max(1, int((n - test) * 0.1 + 0.5))
    return test, val, n - test - val


def class_rng(seed: int, cls: str) -> np.random.Generator:
    """Random stream for one class's split: depends on the seed and the class name only."""
    return np.random.default_rng([int(seed), zlib.crc32(cls.encode("utf-8")), 0x5B11])


def assign_splits(keys_by_class: Mapping[str, Sequence[Any]], seed: int) -> Dict[Any, str]:
    """Map every key (file name, image index) to "train" | "val" | "test", class by class."""
    out: Dict[Any, str] = {}
    for cls in sorted(keys_by_class):
        keys = sorted(keys_by_class[cls])
        test, val, _ = split_counts(len(keys), cls)
        if len(keys) - test - val == 0:
            log.warning("class %r has only %d images: none left for train", cls, len(keys))
        order = class_rng(seed, cls).permutation(len(keys))
        for rank, i in enumerate(order):
            out[keys[int(i)]] = "test" if rank < test else ("val" if rank < test + val else "train")
    return out


def check_out_dir(out: str) -> None:
    """Refuse to write into a folder that already holds a data set (never overwrite data)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"output {out!r} exists and is not a folder")
    taken = [p for p in SPLITS + ("manifest.jsonl", "dataset.json") if os.path.exists(os.path.join(out, p))]
    if taken:
        raise ValueError(f"output folder {out!r} already holds a data set ({', '.join(taken)}); choose a new folder")


def dataset_good_class(root: str) -> Optional[str]:
    """``good_class`` recorded in ``<root>/dataset.json`` by ``nexedge split``/``synth`` (None when absent)."""
    path = os.path.join(root, "dataset.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("good_class")


def write_json_atomic(path: str, obj: Any, lines: bool = False) -> None:
    """Write JSON (or JSON lines from an iterable) to a temp file, then rename it into place."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        if lines:
            for row in obj:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        else:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    os.replace(tmp, path)


def count_table(rows: Iterable[Mapping[str, Any]], key: str = "label") -> Dict[str, Dict[str, int]]:
    """{split: {class: n}} from manifest rows."""
    t: Dict[str, Dict[str, int]] = {s: {} for s in SPLITS}
    for r in rows:
        c = r[key]
        if c is None:
            continue
        t[r["split"]][c] = t[r["split"]].get(c, 0) + 1
    return {s: dict(sorted(v.items())) for s, v in t.items()}


def scan_class_folders(src: str, exts: Sequence[str] = READ_EXTS,
                       skipped: Optional[List[Dict[str, str]]] = None) -> Dict[str, List[str]]:
    """{class: sorted image file names} for the class sub-folders of ``src``.

    Files and folders that are not taken are appended to ``skipped`` as {path, reason}.
    """
    if not os.path.exists(src):
        raise FileNotFoundError(f"source folder {src!r} does not exist")
    if not os.path.isdir(src):
        raise ValueError(f"source {src!r} is a file; expected a folder with one sub-folder of images per class "
                         f"(SRC/<class>/<image>)")
    if any(os.path.isdir(os.path.join(src, s)) for s in ("train", "test")):
        raise ValueError(f"source {src!r} looks already split (has train/ or test/); expected one folder per class")
    skipped = skipped if skipped is not None else []
    found: Dict[str, List[str]] = {}
    for cls in sorted(os.listdir(src)):
        d = os.path.join(src, cls)
        if not os.path.isdir(d):
            skipped.append({"path": cls, "reason": "file at the top level (class folders only)"})
            continue
        if cls.startswith("."):
            continue
        files = []
        for f in sorted(os.listdir(d)):
            if not os.path.isfile(os.path.join(d, f)):
                skipped.append({"path": f"{cls}/{f}", "reason": "sub-folder inside a class folder (not searched)"})
            elif f.startswith("."):
                continue
            elif not f.lower().endswith(tuple(exts)):
                skipped.append({"path": f"{cls}/{f}",
                                "reason": f"not an image file name (extensions {', '.join(exts)})"})
            else:
                files.append(f)
        if not files:
            skipped.append({"path": cls + "/", "reason": "class folder without images: not a class of the data set"})
            continue
        found[cls] = files
    if not found:
        raise ValueError(f"no class folders with images ({', '.join(exts)}) under {src!r}")
    return found


def unreadable_reason(path: str) -> Optional[str]:
    """None when ``path`` decodes as an image, else why not."""
    return decode_size(path)[1]


def decode_size(path: str) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    """((width, height), None) when ``path`` decodes as an image, else (None, why not)."""
    import cv2

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"cannot read the file ({e.strerror or e})"
    if not data:
        return None, "empty file"
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        return None, f"does not decode as an image ({len(data)} bytes; truncated or corrupt?)"
    return (int(img.shape[1]), int(img.shape[0])), None


def _place(src: str, dst: str, mode: str) -> None:
    if mode == "copy":
        shutil.copy2(src, dst)
    elif mode == "hard":
        try:
            os.link(src, dst)
        except OSError as e:
            raise RuntimeError(f"cannot hard-link {src!r} -> {dst!r} ({e}); use --link sym or copy") from e
    else:
        os.symlink(os.path.abspath(src), dst)


def split_folder(src: str, out: str, seed: int = 0, link: Optional[str] = None, progress: bool = True,
                 exts: Sequence[str] = READ_EXTS, good_class: Optional[str] = None) -> Dict[str, Any]:
    """Split ``src/<class>/<image>`` into ``out/{train,val,test}/<class>/`` plus manifest.jsonl and dataset.json.

    ``link``: None (copy), "hard" (hard links) or "sym" (absolute symlinks). Deterministic for a seed.
    Every image is decoded first: unreadable ones stay out of the data set and are listed, with the
    files that were not images, in ``out/split_report.json``. ``good_class`` (the negative class) is
    recorded in dataset.json, where ``nexedge train`` takes its default --good-class from.
    Returns a summary with counts per split and class.
    """
    mode = link or "copy"
    if mode not in LINK_MODES:
        raise ValueError(f"unknown link mode {link!r}; expected one of {list(LINK_MODES)}")
    skipped: List[Dict[str, str]] = []
    classes = scan_class_folders(src, exts, skipped)
    check_out_dir(out)
    unreadable: List[Dict[str, str]] = []
    sizes: List[Tuple[int, int]] = []
    size_labels: List[str] = []
    bar = _progress(sum(map(len, classes.values())), "verify", progress)
    for c in sorted(classes):
        good = []
        for f in classes[c]:
            size, why = decode_size(os.path.join(src, c, f))
            if size is not None:
                good.append(f)
                sizes.append(size)
                size_labels.append(c)
            else:
                unreadable.append({"path": f"{c}/{f}", "reason": why})
            bar.update(1)
        classes[c] = good
    bar.close()
    for c in [c for c, files in classes.items() if not files]:
        del classes[c]
        skipped.append({"path": c + "/", "reason": "class folder without readable images"})
    if not classes:
        raise ValueError(f"no readable images under {src!r} ({len(unreadable)} unreadable)")
    if good_class is not None and good_class not in classes:
        raise ValueError(f"--good-class {good_class!r} is not one of the class folders {sorted(classes)}")
    keys = {c: [(c, f) for f in files] for c, files in classes.items()}
    where = assign_splits(keys, seed)
    rows = []
    for c in sorted(classes):
        for f in classes[c]:
            rel = "/".join((where[(c, f)], c, f))
            rows.append({"path": rel, "split": where[(c, f)], "label": c, "true_label": None, "bbox": None,
                         "severity": None, "batch": None, "noisy": None, "source": os.path.abspath(os.path.join(src, c, f))})
    bar = _progress(len(rows), "split", progress)
    for r in rows:
        dst = os.path.join(out, r["path"])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        _place(r["source"], dst, mode)
        bar.update(1)
    bar.close()
    write_json_atomic(os.path.join(out, "manifest.jsonl"), rows, lines=True)
    counts = count_table(rows)
    good = good_class or ("good" if "good" in classes else None)
    report = {"unreadable": unreadable, "skipped": skipped}
    write_json_atomic(os.path.join(out, "split_report.json"), report)
    from nexedge.data import aspect

    shape = aspect.summarize(sizes, size_labels)
    shape["advice"] = aspect.advise([w / h for w, h in sizes])
    shape["class_note"] = aspect.class_note(shape)
    info = {"format": "nexedge-split", "version": 1, "source": os.path.abspath(src), "classes": sorted(classes),
            "good_class": good, "counts": counts, "n_images": len(rows), "aspect": shape,
            "n_unreadable": len(unreadable), "n_skipped": len(skipped), "args": {"seed": seed, "link": mode}}
    write_json_atomic(os.path.join(out, "dataset.json"), info)
    return {"out": out, "n": len(rows), "counts": counts, "good_class": good, "aspect": shape, **report}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on a terminal, one line at the end otherwise; nothing when disabled."""
    if not enabled:
        return _NoBar()
    from nexedge.progress import progress

    return progress(desc=desc, total=total, unit="img", leave=True)
