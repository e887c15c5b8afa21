"""Calibration sets and the batch streams that feed INT8 calibrators.

A calibration set is a manifest ``calibrate/<name>/manifest.json``: a class
stratified sample (default 512 images) of one split of a data set, stored as
paths relative to the data root plus the eval ``input`` geometry it was made
for. Images are always read with eval preprocessing
(:func:`nexedge.preprocess.prepare`), never training augmentation.

Feeds: :class:`OrtCalibrationReader` (onnxruntime.quantization) and
:class:`CalibrationBatchStream` (plain numpy, fixed batch shape) which
:func:`make_entropy_calibrator` wraps into a TensorRT
``IInt8EntropyCalibrator2`` for the implicit-quantization cache.
"""

import json
import logging
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from nexedge import preprocess as pp
from nexedge.card import ModelCard, atomic_write_bytes
from nexedge.export.parity import read_images_skipping
from nexedge.images import READ_EXTS

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "nexedge.calib/1"
GEOMETRY_KEYS = ("color", "resize")


def class_folders(root: str, split: str) -> Dict[str, List[str]]:
    """{class: sorted image paths relative to ``root``} for ``root/<split>/<class>/``."""
    base = os.path.join(root, split)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"split folder not found: {base} (expected <root>/{split}/<class>/<image>)")
    out: Dict[str, List[str]] = {}
    for cls in sorted(os.listdir(base)):
        d = os.path.join(base, cls)
        if os.path.isdir(d):
            files = sorted(f for f in os.listdir(d) if f.lower().endswith(READ_EXTS))
            if files:
                out[cls] = [os.path.join(split, cls, f) for f in files]
    if not out:
        raise FileNotFoundError(f"no class folders with images under {base}")
    return out


def stratified_quota(counts: Mapping[str, int], n: int, min_per_class: int = 8) -> Dict[str, int]:
    """Images per class: proportional to ``counts``, at least ``min_per_class`` (or all a class has),
    total ``n`` (or everything when fewer exist)."""
    total = sum(counts.values())
    if n >= total:
        return dict(counts)
    quota = {c: min(k, max(min_per_class, int(n * k / total))) for c, k in counts.items()}
    # Hand out or take back the rounding remainder, largest classes first.
    order = sorted(counts, key=lambda c: (-counts[c], c))
    while sum(quota.values()) < n:
        grown = False
        for c in order:
            if quota[c] < counts[c] and sum(quota.values()) < n:
                quota[c] += 1
                grown = True
        if not grown:
            break
    while sum(quota.values()) > n:
        c = max(order, key=lambda c: quota[c])
        quota[c] -= 1
    return quota


def build_manifest(root: str, name: str, inp: Mapping[str, Any], n: int = 512, split: str = "train",
                   seed: int = 0, out_root: str = "calibrate", min_per_class: int = 8) -> str:
    """Write ``<out_root>/<name>/manifest.json``; returns its path."""
    if n < 1:
        raise ValueError(f"--images must be positive, got {n}")
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"calibration set name {name!r} must be a plain folder name")
    per_class = class_folders(root, split)
    quota = stratified_quota({c: len(v) for c, v in per_class.items()}, n, min_per_class)
    rng = np.random.default_rng(seed)
    images = []
    for cls in sorted(per_class):
        picks = sorted(rng.choice(len(per_class[cls]), size=quota[cls], replace=False).tolist())
        images += [{"path": per_class[cls][i], "label": cls} for i in picks]
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "data_root": os.path.abspath(root),
        "split": split,
        "seed": seed,
        "n_images": len(images),
        "per_class": quota,
        "preprocessing": "eval (nexedge.preprocess.prepare); no augmentation",
        "input": {k: inp[k] for k in GEOMETRY_KEYS},
        "images": images,
    }
    path = os.path.join(out_root, name, "manifest.json")
    atomic_write_bytes(path, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    log.info("calibration manifest %s: %d images %s", path, len(images), quota)
    return path


def read_calibration_manifest(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"calibration manifest not found: {path}")
    with open(path, encoding="utf-8") as f:
        m = json.load(f)
    if m.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a calibration manifest (format {m.get('format')!r}, "
                         f"expected {MANIFEST_FORMAT!r})")
    return m


def load_manifest_images(path: str, inp: Mapping[str, Any], data_root: Optional[str] = None
                         ) -> Tuple[np.ndarray, List[str]]:
    """Prepared uint8 N x H x W x C images of a manifest and their labels, for a model with ``inp``."""
    m = read_calibration_manifest(path)
    for k in GEOMETRY_KEYS:
        if m["input"][k] != inp[k]:
            raise ValueError(f"{path}: made for input {k}={m['input'][k]!r}, the model needs {inp[k]!r}; "
                             f"rebuild the calibration set")
    root = data_root or m["data_root"]
    raw, kept = read_images_skipping([os.path.join(root, e["path"]) for e in m["images"]])
    if not raw:
        raise ValueError(f"{path}: none of its {len(m['images'])} images could be read under {root}")
    return np.stack([pp.prepare(im, inp) for im in raw]), [m["images"][i]["label"] for i in kept]


def model_feed(images: np.ndarray, card: ModelCard) -> np.ndarray:
    """What the model's input takes for these prepared images: float crops (host) or the uint8 images."""
    if card.graph["crops"] == "host":
        return pp.host_batch(images, card.input, card.input["crop_mode"])
    return np.ascontiguousarray(images)


class OrtCalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over prepared images (duck-typed: the
    quantizer only calls ``get_next``; subclassing would import onnxruntime here)."""

    def __init__(self, images: np.ndarray, card: ModelCard, batch_images: int = 8) -> None:
        self.images, self.card, self.batch = images, card, max(1, int(batch_images))
        self.input_name = card.graph["input_name"]
        self._it: Optional[Iterator[Dict[str, np.ndarray]]] = None
        self.rewind()

    def _gen(self) -> Iterator[Dict[str, np.ndarray]]:
        for i in range(0, len(self.images), self.batch):
            yield {self.input_name: model_feed(self.images[i : i + self.batch], self.card)}

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._it, None)  # type: ignore[arg-type]

    def rewind(self) -> None:
        self._it = self._gen()

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch)


class CalibrationBatchStream:
    """Fixed-shape numpy batches for TensorRT's calibrator (``get_batch`` needs the same shape each time).

    ``batch_images`` images per batch; a host-crop model gets ``batch_images * K`` crops. The
    incomplete last batch is dropped (TensorRT cannot take a smaller one); :attr:`used` says how many
    images were fed.
    """

    def __init__(self, images: np.ndarray, card: ModelCard, batch_images: int = 8) -> None:
        if batch_images < 1:
            raise ValueError(f"calibration batch must be >= 1 image, got {batch_images}")
        if len(images) < batch_images:
            raise ValueError(f"{len(images)} calibration images is fewer than one batch of {batch_images}")
        self.images, self.card, self.batch_images = images, card, int(batch_images)
        self.n_batches = len(images) // self.batch_images
        self.used = self.n_batches * self.batch_images
        per = pp.n_crops(card.input["crop_mode"]) if card.graph["crops"] == "host" else 1
        first = model_feed(images[: self.batch_images], card)
        self.shape = first.shape
        self.dtype = first.dtype
        self.batch_size = self.batch_images * per
        self.index = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def reset(self) -> None:
        self.index = 0

    def next_batch(self) -> Optional[np.ndarray]:
        """The next contiguous batch, or None when done."""
        if self.index >= self.n_batches:
            return None
        i = self.index * self.batch_images
        self.index += 1
        return np.ascontiguousarray(model_feed(self.images[i : i + self.batch_images], self.card))


def make_entropy_calibrator(trt: Any, stream: CalibrationBatchStream, cache_path: str, cuda: Any = None) -> Any:
    """A ``trt.IInt8EntropyCalibrator2`` fed by ``stream``; reads/writes ``cache_path``.

    ``cuda`` is a nexedge.runtime.backends.tensorrt CUDA helper (opened here when None).
    """
    if cuda is None:
        from nexedge.runtime.backends.tensorrt import open_cuda

        cuda = open_cuda()

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.stream, self.cache_path, self.cuda = stream, cache_path, cuda
            with cuda.active():  # TensorRT calls get_batch on the building thread: make CUDA current there
                self.device = cuda.malloc(stream.nbytes)

        def get_batch_size(self) -> int:
            return stream.batch_size

        def get_batch(self, names: List[str]) -> Optional[List[int]]:
            batch = stream.next_batch()
            if batch is None:
                return None
            with cuda.active():
                cuda.htod(self.device, batch)
                cuda.sync()
            return [int(self.device)]

        def read_calibration_cache(self) -> Optional[bytes]:
            if os.path.exists(cache_path):
                with open(cache_path, "rb") as f:
                    return f.read()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            atomic_write_bytes(cache_path, bytes(cache))

    return EntropyCalibrator()
