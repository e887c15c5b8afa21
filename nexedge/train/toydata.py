"""A tiny drawn ImageFolder data set for tests and smoke runs (not the synthetic
generator: see ``nexedge synth`` for realistic data).

Every image is a gray "device" (a bright rectangle on a dark background);
defect classes add a class-specific mark, so a small CNN learns them in a few
epochs. Optional label noise flips good <-> first defect class and is recorded
in ``manifest.jsonl`` (label = given, true_label = drawn).
"""

import json
import os
from typing import Dict, Optional, Sequence

import numpy as np


def _draw(cls_index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    import cv2

    img = np.full((size, size), int(rng.integers(20, 50)), np.uint8)
    m = size // 6 + int(rng.integers(-1, 2))
    cv2.rectangle(img, (m, m + 2), (size - m, size - m - 2), int(rng.integers(150, 190)), -1)
    c = size // 2 + int(rng.integers(-size // 8, size // 8 + 1))
    if cls_index == 1:
        cv2.line(img, (m + 2, c), (size - m - 2, c + int(rng.integers(-3, 4))), 255, max(1, size // 24))
    elif cls_index == 2:
        cv2.circle(img, (c, c), max(2, size // 8), 10, -1)
    elif cls_index >= 3:
        k = cls_index - 2
        for j in range(k + 1):
            cv2.rectangle(img, (m + 3 * j * 2, m), (m + 3 * j * 2 + 2, m + 4), 0, -1)
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img.astype(float) + noise, 0, 255).astype(np.uint8)


def make_toy_imagefolder(
    root: str,
    classes: Sequence[str] = ("good", "scratch", "chipping"),
    counts: Optional[Dict[str, Sequence[int]]] = None,
    size: int = 40,
    noise: float = 0.0,
    seed: int = 0,
) -> str:
    """Write ``root/{train,val,test}/<class>/*.png`` + ``manifest.jsonl``; ``classes[0]`` is the negative.

    ``counts`` maps split -> per-class image counts (default 12 / 6 / 6 per class).
    ``noise`` is the fraction of train images whose label flips good <-> classes[1].
    """
    import cv2

    rng = np.random.default_rng(seed)
    counts = counts or {"train": [12] * len(classes), "val": [6] * len(classes), "test": [6] * len(classes)}
    rows = []
    for split, per_class in counts.items():
        for ci, name in enumerate(classes):
            for k in range(per_class[ci]):
                given = name
                if split == "train" and noise > 0 and ci in (0, 1) and rng.random() < noise:
                    given = classes[1 - ci]
                rel = os.path.join(split, given, f"{name}_{k:04d}.png")
                os.makedirs(os.path.join(root, split, given), exist_ok=True)
                cv2.imwrite(os.path.join(root, rel), _draw(ci, size, rng))
                rows.append({"path": rel, "split": split, "label": given, "true_label": name,
                             "noisy": given != name})
    for split in counts:
        for name in classes:
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
    with open(os.path.join(root, "manifest.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return root
