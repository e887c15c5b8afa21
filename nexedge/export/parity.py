"""Parity of an exported model against PyTorch on real, eval-preprocessed images.

The reference is the checkpoint run by torch on :func:`nexedge.preprocess.host_batch`
crops, logits averaged over each image's crops, softmax — the definition every
backend must reproduce. The candidate runs through ONNX Runtime via the same
:class:`~nexedge.runtime.base.Backend` interface the daemon uses.
"""

import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from nexedge import preprocess as pp
from nexedge.images import READ_EXTS

log = logging.getLogger(__name__)



def list_images(root: str) -> List[str]:
    """Image files under ``root`` (sorted). For a dataset root, prefer ``val/``, then ``test/``, then all."""
    if os.path.isfile(root):
        return [root]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    for split in ("val", "test"):
        sub = os.path.join(root, split)
        if os.path.isdir(sub):
            found = list_images_flat(sub)
            if found:
                return found
    return list_images_flat(root)


def list_images_flat(root: str) -> List[str]:
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for f in sorted(files):
            if f.lower().endswith(READ_EXTS):
                out.append(os.path.join(dirpath, f))
    return out


def read_image(path: str) -> np.ndarray:
    import cv2

    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"cannot decode image {path}")
    return img


def read_images_skipping(paths: List[str]) -> Tuple[List[np.ndarray], List[int]]:
    """(images, indexes of the paths that decoded): an unreadable file is logged with its path and
    left out, so one bad file does not stop a calibration or a parity check."""
    import logging

    imgs, kept = [], []
    for i, p in enumerate(paths):
        try:
            imgs.append(read_image(p))
            kept.append(i)
        except ValueError as e:
            logging.getLogger(__name__).warning("skipping unreadable image: %s", e)
    return imgs, kept


def spread(paths: List[str], n: int) -> List[str]:
    """``n`` paths spread evenly over the sorted list (so every class folder is visited)."""
    if len(paths) <= n:
        return list(paths)
    idx = np.linspace(0, len(paths) - 1, n).round().astype(int)
    return [paths[i] for i in idx]


def generated_images(n: int, inp: Mapping[str, Any], seed: int = 0) -> np.ndarray:
    """Prepared uint8 images with structure (gradients, blobs, edges) when no real images are given."""
    H, W = inp["resize"]
    c = 1 if inp["color"] == "gray" else 3
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    out = np.empty((n, H, W, c), np.uint8)
    for i in range(n):
        base = 90 + 60 * np.sin(xx / (4 + 6 * rng.random()) + rng.random() * 6) * np.cos(yy / (5 + 6 * rng.random()))
        cy, cx, r = rng.random() * H, rng.random() * W, 2 + rng.random() * H / 4
        base += 80 * ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
        img = np.clip(base[..., None] + rng.normal(0, 8, (H, W, c)), 0, 255)
        out[i] = img.astype(np.uint8)
    return out


def parity_images(source: Optional[str], inp: Mapping[str, Any], n: int = 16) -> Tuple[np.ndarray, str]:
    """(prepared uint8 N x H x W x C, description). ``source`` None -> generated images (logged)."""
    if source is None:
        log.warning("no --parity-kw data=... given: parity runs on %d generated images, not real ones", n)
        return generated_images(n, inp), f"generated:{n}"
    paths = spread(list_images(source), n)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(READ_EXTS)}) found under {source}")
    imgs = np.stack([pp.prepare(read_image(p), inp) for p in paths])
    return imgs, f"{source}:{len(paths)}"


def torch_reference(model: Any, images: np.ndarray, inp: Mapping[str, Any], mode: str, batch: int = 16,
                    good_index: int = 0) -> np.ndarray:
    """Reference probabilities N x C from the torch model with host-side crops, aggregated as
    ``inp["aggregate"]`` says (nexedge.metrics.aggregate_crops)."""
    import torch

    from nexedge import metrics

    k = pp.n_crops(mode)
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(pp.host_batch(images[i : i + batch], inp, mode))
            logits = model(x).float().numpy()
            probs, _ = metrics.aggregate_crops(logits.reshape(-1, k, logits.shape[-1]), good_index,
                                               inp.get("aggregate", "mean"))
            out.append(probs)
    return np.concatenate(out).astype(np.float32)


def check_parity(
    model: Any, backend: Any, images: np.ndarray, inp: Mapping[str, Any], mode: str, tol: float = 1e-4
) -> Dict[str, Any]:
    """Compare ``backend`` with torch on ``images`` (whole batch and batch 1); raise if over ``tol``."""
    ref = torch_reference(model, images, inp, mode, good_index=backend.card.good_index)
    nb = min(len(images), backend.max_batch)
    got = np.concatenate([backend.infer(images[i : i + nb]).probs for i in range(0, len(images), nb)])
    single = backend.infer(images[:1]).probs
    diff = float(max(np.abs(got - ref).max(), np.abs(single - ref[:1]).max()))
    result = {"max_abs_diff": diff, "tolerance": tol, "n_images": int(len(images)), "crop_mode": mode}
    if not diff <= tol:
        raise RuntimeError(
            f"parity check failed: max |p_onnx - p_torch| = {diff:.3g} over {len(images)} images "
            f"(crop mode {mode}) exceeds the tolerance {tol:g}"
        )
    return result
