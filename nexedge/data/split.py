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

SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
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


def scan_class_folders(src: str, exts: Sequence[str] = IMAGE_EXTS) -> Dict[str, List[str]]:
    """{class: sorted image file names} for the class sub-folders of ``src``."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source folder {src!r} does not exist")
    if any(os.path.isdir(os.path.join(src, s)) for s in ("train", "test")):
        raise ValueError(f"source {src!r} looks already split (has train/ or test/); expected one folder per class")
    found: Dict[str, List[str]] = {}
    for cls in sorted(os.listdir(src)):
        d = os.path.join(src, cls)
        if not os.path.isdir(d) or cls.startswith("."):
            continue
        files = sorted(f for f in os.listdir(d)
                       if f.lower().endswith(tuple(exts)) and os.path.isfile(os.path.join(d, f)))
        if not files:
            log.warning("skipping class folder %r: no images with extensions %s", d, list(exts))
            continue
        found[cls] = files
    if not found:
        raise ValueError(f"no class folders with images ({', '.join(exts)}) under {src!r}")
    return found


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
                 exts: Sequence[str] = IMAGE_EXTS) -> Dict[str, Any]:
    """Split ``src/<class>/<image>`` into ``out/{train,val,test}/<class>/`` plus manifest.jsonl and dataset.json.

    ``link``: None (copy), "hard" (hard links) or "sym" (absolute symlinks). Deterministic for a seed.
    Returns a summary with counts per split and class.
    """
    mode = link or "copy"
    if mode not in LINK_MODES:
        raise ValueError(f"unknown link mode {link!r}; expected one of {list(LINK_MODES)}")
    classes = scan_class_folders(src, exts)
    check_out_dir(out)
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
    info = {"format": "nexedge-split", "version": 1, "source": os.path.abspath(src), "classes": sorted(classes),
            "good_class": "good" if "good" in classes else None, "counts": counts, "n_images": len(rows),
            "args": {"seed": seed, "link": mode}}
    write_json_atomic(os.path.join(out, "dataset.json"), info)
    return {"out": out, "n": len(rows), "counts": counts}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar (tqdm comes with the train/test extras); no bar when disabled or not installed."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        log.info("tqdm is not installed; no progress bar")
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
