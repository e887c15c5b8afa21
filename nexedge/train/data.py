"""ImageFolder data sets: ``<root>/<split>/<class>/<image>`` plus optional ``manifest.jsonl``.

Images are loaded with OpenCV and prepared with :func:`nexedge.preprocess.prepare`
(colour + resize), the same code the exporter and the daemon use. Evaluation
crops come from :func:`nexedge.preprocess.host_batch` itself, so training-time
validation sees exactly the tensors the runtime feeds the model.
"""

import hashlib
import json
import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nexedge import preprocess
from nexedge.images import READ_EXTS

log = logging.getLogger(__name__)


def list_classes(root: str, split: str = "train") -> List[str]:
    """Sorted class folder names of ``root/split`` (two or more)."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        hint = ""
        if os.path.isdir(root) and not any(os.path.isdir(os.path.join(root, s)) for s in ("train", "val", "test")):
            hint = f"; if {root} holds one folder per class, split it first: nexedge split {root} DATA"
        raise FileNotFoundError(f"data split folder not found: {folder} (expected <root>/{split}/<class>/<image>)"
                                + hint)
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{folder} has {len(classes)} class folder(s) {classes}; expected two or more")
    return classes


def scan_split(root: str, split: str, classes: Sequence[str]) -> List[Tuple[str, int]]:
    """(path relative to root, class index) of every image of a split, sorted by path."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data split folder not found: {folder}")
    index = {c: i for i, c in enumerate(classes)}
    items: List[Tuple[str, int]] = []
    for d in sorted(os.listdir(folder)):
        if not os.path.isdir(os.path.join(folder, d)) or d.startswith("."):
            continue
        if d not in index:
            raise ValueError(f"{folder} has class folder {d!r} that the model does not know (classes {list(classes)})")
        for f in sorted(os.listdir(os.path.join(folder, d))):
            if f.lower().endswith(READ_EXTS):
                items.append((os.path.join(split, d, f), index[d]))
    if not items:
        raise ValueError(f"no images ({', '.join(READ_EXTS)}) under {folder}")
    return items


def read_dataset_manifest(root: str) -> Dict[str, Dict[str, Any]]:
    """``manifest.jsonl`` rows keyed by the normalised relative path ({} when absent)."""
    path = os.path.join(root, "manifest.jsonl")
    if not os.path.exists(path):
        return {}
    rows: Dict[str, Dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if "path" not in row:
                raise ValueError(f"{path}:{n}: row has no 'path' field")
            rows[os.path.normpath(row["path"])] = row
    return rows


def data_hash(root: str, splits: Sequence[str] = ("train", "val")) -> str:
    """sha256 over (relative path, bytes) of every image of the given splits."""
    h = hashlib.sha256()
    for split in splits:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            continue
        for dirpath, dirnames, files in sorted(os.walk(folder)):
            dirnames.sort()
            for f in sorted(files):
                if f.lower().endswith(READ_EXTS):
                    p = os.path.join(dirpath, f)
                    h.update(os.path.relpath(p, root).encode("utf-8") + b"\0")
                    with open(p, "rb") as fh:
                        h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def load_image(path: str, color: str) -> np.ndarray:
    """Decode an image file as the daemon would receive it (gray or BGR, 8/16 bit)."""
    import cv2

    flag = cv2.IMREAD_GRAYSCALE if color == "gray" else cv2.IMREAD_COLOR
    img = cv2.imread(path, flag | cv2.IMREAD_ANYDEPTH)
    if img is None:
        raise ValueError(f"cannot decode image {path}")
    return img


class ImageFolderSet:
    """A split as a map-style dataset of prepared uint8 H x W x C images.

    ``transform(prepared) -> tensor`` turns the prepared image into the model input;
    items are ``(tensor, label, index)``. ``cache=True`` keeps prepared images in
    memory (small inputs make this cheap and spare the decoder every epoch).
    """

    def __init__(
        self,
        root: str,
        split: str,
        classes: Sequence[str],
        input_cfg: Mapping[str, Any],
        transform: Optional[Callable[[np.ndarray], Any]] = None,
        cache: bool = True,
    ) -> None:
        self.root, self.split = root, split
        self.classes = list(classes)
        self.input_cfg = dict(input_cfg)
        self.items = scan_split(root, split, classes)
        self.transform = transform
        self.cache = cache
        self._cache: Dict[int, np.ndarray] = {}
        self.unreadable: Dict[str, str] = {}  # path -> error, for files that stopped decoding

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([y for _, y in self.items], dtype=np.int64)

    @property
    def paths(self) -> List[str]:
        return [p for p, _ in self.items]

    def prepared(self, i: int) -> np.ndarray:
        img = self._cache.get(i)
        if img is None:
            img = preprocess.prepare(load_image(os.path.join(self.root, self.items[i][0]), self.input_cfg["color"]),
                                     self.input_cfg)
            if self.cache:
                self._cache[i] = img
        return img

    def _try_prepared(self, i: int) -> Optional[np.ndarray]:
        try:
            return self.prepared(i)
        except (ValueError, OSError) as e:  # a file that became unreadable costs one image, not the run
            path = os.path.join(self.root, self.items[i][0])
            if path not in self.unreadable:
                log.warning("skipping unreadable image %s: %s", path, e)
            self.unreadable[path] = str(e)
            return None

    def readable_prepared(self) -> List[np.ndarray]:
        """Prepared images of every readable item (unreadable ones are recorded and left out)."""
        return [im for im in map(self._try_prepared, range(len(self))) if im is not None]

    def __getitem__(self, i: int):
        img = self._try_prepared(i)
        if img is None:
            return None
        x = self.transform(img) if self.transform is not None else img
        return x, self.items[i][1], i


def collate_skip_unreadable(batch: List[Any]) -> Any:
    """``default_collate`` without the items :class:`ImageFolderSet` could not read (None when none left)."""
    from torch.utils.data import default_collate

    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


def class_counts(labels: np.ndarray, classes: Sequence[str]) -> Dict[str, int]:
    return {c: int((labels == i).sum()) for i, c in enumerate(classes)}
