"""A small data set as a user's own class folders really arrive (not nexedge synth).

Three classes with ``ok`` as the negative class (``ok``, ``scratch``, ``chip``),
300 x 200 photographs of a dark package on a lit background, a mix of PNG and
JPEG, non-ASCII and space-containing file names, one truncated (corrupt) PNG, a
text file, a ``Thumbs.db`` and an empty class folder. Defects are drawn so a tiny
model learns them in a few epochs: a bright diagonal scratch, or a dark bite out
of the package's edge.
"""

import os
from typing import Dict, Optional

import cv2
import numpy as np

CLASSES = ("chip", "ok", "scratch")
GOOD = "ok"
SIZE = (200, 300)  # rows, columns: 300 x 200 images
CORRUPT = os.path.join("scratch", "Kratzer_kaputt.png")  # truncated after the header


def _device(rng: np.random.Generator) -> np.ndarray:
    h, w = SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg = 150 + 40 * (xx / w) + 10 * (yy / h) + rng.normal(0, 4, (h, w))  # uneven lighting, sensor noise
    img = bg
    cx, cy = w // 2 + int(rng.integers(-12, 13)), h // 2 + int(rng.integers(-8, 9))
    bw, bh = 70 + int(rng.integers(-6, 7)), 45 + int(rng.integers(-5, 6))
    img[cy - bh:cy + bh, cx - bw:cx + bw] = 55 + rng.normal(0, 3, (2 * bh, 2 * bw))
    for k in range(3):  # leads
        x = cx - bw + 25 + k * (bw - 25)
        img[cy + bh:cy + bh + 18, x - 5:x + 5] = 205
    return img


def render(cls: str, rng: np.random.Generator) -> np.ndarray:
    """One 300 x 200 BGR image of class ``cls``."""
    img = _device(rng)
    h, w = SIZE
    if cls == "scratch":
        x0, y0 = int(rng.integers(90, 130)), int(rng.integers(60, 90))
        cv2.line(img, (x0, y0), (x0 + 70, y0 + 50), 240.0, thickness=3)
    elif cls == "chip":
        cx, cy = w // 2 + int(rng.choice([-60, 60])), h // 2 + int(rng.integers(-30, 30))
        cv2.circle(img, (cx, cy), 16, 175.0, thickness=-1)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)


NAMES = ("Prüfteil_{i:03d}", "部品 {i:03d}", "img_{i:03d}", "Ærø-{i:03d}")


def make_user_dataset(root: str, counts: Optional[Dict[str, int]] = None, seed: int = 0) -> Dict[str, int]:
    """Write ``root/<class>/...``; returns the number of readable images per class."""
    counts = counts or {"ok": 24, "scratch": 16, "chip": 16}
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        d = os.path.join(root, cls)
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            name = NAMES[i % len(NAMES)].format(i=i)
            img = render(cls, rng)
            if i % 3 == 1:
                ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
                ext = ".JPG" if i % 2 else ".jpg"
            else:
                ok, buf = cv2.imencode(".png", img)
                ext = ".png"
            assert ok
            with open(os.path.join(d, name + ext), "wb") as f:
                f.write(buf.tobytes())
        with open(os.path.join(d, "Thumbs.db"), "wb") as f:
            f.write(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(200))
    ok, buf = cv2.imencode(".png", render("scratch", rng))
    data = buf.tobytes()
    with open(os.path.join(root, CORRUPT), "wb") as f:  # damaged on disk: PNG signature intact, the rest garbage
        f.write(data[:16] + rng.integers(0, 256, len(data) - 16, dtype=np.uint8).tobytes())
    with open(os.path.join(root, "ok", "notes.txt"), "w", encoding="utf-8") as f:
        f.write("Lot 4711, shift B, camera 2\n")
    os.makedirs(os.path.join(root, "unsortiert"), exist_ok=True)  # an empty class folder
    return dict(counts)
