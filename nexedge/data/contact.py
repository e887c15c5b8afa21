"""Contact sheet: one row per class, a few rendered images each, labelled with the class name."""

import os
from typing import List, Optional, Sequence

import cv2
import numpy as np

from nexedge.data.spec import DEFAULT_LOOK, FIXED_SEVERITY, GOOD, batch_classes
from nexedge.data.synth import NATIVE_WH, check_size, render_image


def contact_sheet(path: str, batch: int = 2, per_class: int = 5, seed: int = 0, size: Sequence[int] = NATIVE_WH,
                  scale: float = 0.45, boxes: bool = False, classes: Optional[Sequence[str]] = None,
                  look: str = DEFAULT_LOOK) -> str:
    """Write a PNG with ``per_class`` images of every class (severity falling left to right).

    ``scale`` shrinks each tile; ``boxes`` draws each defect's bounding box. Returns ``path``.
    """
    if per_class < 1 or per_class > 32:
        raise ValueError(f"per_class {per_class} out of range; expected 1..32")
    if not 0.05 <= scale <= 4.0:
        raise ValueError(f"scale {scale} out of range; expected 0.05..4")
    w, h = check_size(size)
    classes = list(classes) if classes else batch_classes(batch)
    tw, th = max(8, int(round(w * scale))), max(8, int(round(h * scale)))
    label_w, pad, top = 150, 4, 26
    sev = np.linspace(1.0, 0.15, per_class) if per_class > 1 else np.array([0.7])
    rows: List[np.ndarray] = []
    for ci, cls in enumerate(classes):
        row = np.full((th + pad, label_w + per_class * (tw + pad)), 255, np.uint8)
        cv2.putText(row, cls, (6, th // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 0, 1, cv2.LINE_AA)
        for j in range(per_class):
            s = None if cls == GOOD or cls in FIXED_SEVERITY else float(sev[j])
            img, meta = render_image(cls, (seed, 7919, ci, j), batch=batch, size=(w, h), severity=s, look=look)
            tile = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
            if boxes and meta["bbox"]:
                x0, y0, x1, y1 = (int(round(v * scale)) for v in meta["bbox"])
                cv2.rectangle(tile, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), 255, 1)
            x = label_w + j * (tw + pad)
            row[:th, x:x + tw] = tile
        rows.append(row)
    head = np.full((top, rows[0].shape[1]), 255, np.uint8)
    title = f"nexedge synth, batch {batch}: one row per class, defect severity falling left to right"
    cv2.putText(head, title, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 0, 1, cv2.LINE_AA)
    sheet = np.vstack([head] + rows)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    if not cv2.imwrite(path, sheet, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise RuntimeError(f"could not write contact sheet {path!r} (is the extension .png?)")
    return path
