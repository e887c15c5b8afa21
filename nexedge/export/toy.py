"""A small trained model on generated images, for export/INT8 tests and backend benchmarks.

Not a data generator for users (that is ``nexedge synth``): just enough
structure that a ``tiny`` (or any registered arch) model learns a real,
non-trivial decision in a few dozen steps, so INT8-vs-FP32 agreement is
measured on trained weights rather than random ones.

Classes: ``good`` (textured background), ``scratch`` (a thin bright line),
``chip`` (a dark blob at an edge).
"""

import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from nexedge import metrics
from nexedge import preprocess as pp
from nexedge.card import ModelCard

CLASSES = ["good", "chip", "scratch"]


def toy_images(n: int, inp: Dict[str, Any], seed: int = 0, classes: Sequence[str] = CLASSES
               ) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` prepared uint8 images N x H x W x C and their class indices (round-robin classes)."""
    import cv2

    H, W = inp["resize"]
    c = 1 if inp["color"] == "gray" else 3
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    imgs = np.empty((n, H, W, c), np.uint8)
    labels = np.arange(n) % len(classes)
    rng.shuffle(labels)
    for i in range(n):
        f1, f2, ph = 3 + 5 * rng.random(), 3 + 5 * rng.random(), rng.random() * 6.3
        img = 110 + 25 * np.sin(xx / f1 + ph) * np.cos(yy / f2) + rng.normal(0, 10, (H, W))
        name = classes[labels[i]]
        strength = 0.35 + 0.65 * rng.random()  # some defects are faint: the model is not perfect
        if name == "scratch":
            p0 = (int(rng.integers(0, W)), int(rng.integers(0, H // 3)))
            p1 = (int(rng.integers(0, W)), int(rng.integers(2 * H // 3, H)))
            mask = np.zeros((H, W), np.uint8)
            cv2.line(mask, p0, p1, 1, 1)
            img = img + 70 * strength * mask
        elif name == "chip":
            cy = rng.choice([rng.random() * H * 0.2, H - rng.random() * H * 0.2])
            cx = rng.random() * W
            r = H * (0.08 + 0.1 * rng.random())
            img = img - 80 * strength * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
        img = np.clip(img, 0, 255).astype(np.uint8)
        imgs[i] = img[..., None] if c == 1 else np.repeat(img[..., None], 3, axis=2)
    return imgs, labels


def write_toy_dataset(root: str, inp: Dict[str, Any], per_split: Optional[Dict[str, int]] = None,
                      seed: int = 0, classes: Sequence[str] = CLASSES) -> str:
    """Write ``root/{train,val,test}/<class>/<i>.png`` (images already at the card's resize)."""
    import cv2

    per_split = per_split or {"train": 60, "val": 60, "test": 60}
    for k, (split, n) in enumerate(sorted(per_split.items())):
        imgs, labels = toy_images(n, inp, seed=seed + 101 * k, classes=classes)
        for i, (img, lab) in enumerate(zip(imgs, labels)):
            d = os.path.join(root, split, classes[lab])
            os.makedirs(d, exist_ok=True)
            cv2.imwrite(os.path.join(d, f"{i:05d}.png"), img if img.shape[2] == 1 else img[..., ::-1])
    return root


def train_toy_checkpoint(path: str, arch: str = "tiny", inp: Optional[Dict[str, Any]] = None, steps: int = 60,
                         n_train: int = 0, n_val: int = 60, seed: int = 0, lr: float = 3e-3,
                         arch_kwargs: Optional[Dict[str, Any]] = None) -> str:
    """Train ``arch`` for ``steps`` Adam steps on toy images; save checkpoint + card with operating points."""
    import torch

    from nexedge.models import create_model
    from nexedge.models.checkpoint import save_checkpoint

    inp = inp or {"color": "gray", "resize": [40, 40], "crop": [32, 32], "crop_mode": "center"}
    card = ModelCard.new(CLASSES, resize=inp["resize"], crop=inp["crop"], crop_mode=inp["crop_mode"],
                         color=inp["color"])
    inp = card.input
    torch.manual_seed(seed)
    model = create_model(arch, len(CLASSES), **(arch_kwargs or {}))
    n_train = n_train or 32 * steps  # fresh images every step: no overfitting to a handful
    x_img, y = toy_images(n_train, inp, seed=seed)
    x = torch.from_numpy(pp.host_batch(x_img, inp, "center"))
    yt = torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for s in range(steps):
        idx = torch.arange(s * 32, (s + 1) * 32) % n_train
        loss = torch.nn.functional.cross_entropy(model(x[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # settle BatchNorm running statistics on the final weights
        for i in range(0, min(n_train, 320), 64):
            model(x[i : i + 64])
    model.eval()
    v_img, vy = toy_images(n_val, inp, seed=seed + 7)
    with torch.inference_mode():
        logits = model(torch.from_numpy(pp.host_batch(v_img, inp, inp["crop_mode"]))).numpy()
    mean_logits = pp.average_crops(logits, pp.n_crops(inp["crop_mode"]))
    probs = pp.softmax(mean_logits)
    y_def = (vy != card.good_index).astype(int)
    scores = metrics.defect_score(mean_logits, card.good_index)
    with card.edit():
        card.set_operating_points(metrics.operating_points(y_def, scores), {
            "status": "measured", "split": "toy val (generated)", "n_good": int((y_def == 0).sum()),
            "n_defects": int(y_def.sum()), "crop_mode": inp["crop_mode"], "backend": "torch", "artifact_sha256": None})
        card.set_score_reference(metrics.score_histogram(y_def, scores))
        card.set_metrics({"val_accuracy": float((probs.argmax(1) == vy).mean()), "train_steps": steps})
        card.set_provenance({"arch": arch, "data": "nexedge.export.toy (generated)", "seed": seed})
    save_checkpoint(path, model, arch, CLASSES, "good", arch_kwargs=arch_kwargs, card=card)
    return path
