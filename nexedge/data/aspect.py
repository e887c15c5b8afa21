"""Aspect ratios of a data set's images, and which resize mode fits them.

``stretch`` scales each axis to ``--resize``: every pixel stays, and an image whose aspect ratio
(width / height) differs from the input's by a factor r is squeezed by r along one axis.
``short`` keeps the aspect ratio, fits the short side and center-crops: shapes stay, but the same
image loses 1 - 1/r of its area, and a defect in the cut-off part is gone, from training (a
defect-labelled image without a defect) and on the line (an escape). With mixed aspect ratios
``stretch`` is the mode that keeps every defect in view; ``short`` fits data whose images share
the input's aspect ratio.
"""

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

#: ``short`` cuts an image when it loses more than this share of its area.
CUT_LOSS = 0.2
#: Warn when more than this share of the images is cut (``short``) or badly squeezed (``stretch``).
CUT_SHARE = 0.05
#: Aspect ratios within this factor (5th to 95th percentile) count as one aspect ratio.
UNIFORM_SPREAD = 1.15
#: ``stretch`` squeezing (nearly) every image by more than this: advise a --resize of the data's shape.
SQUEEZE_LIMIT = 1.5
#: Class medians further apart than this factor: the aspect ratio alone tells classes apart.
CLASS_SPREAD = 1.5


def ratios(aspects: Sequence[float], target_hw: Sequence[int]) -> np.ndarray:
    """Per image, the factor r >= 1 between its aspect ratio and the input's (``target_hw`` = [H, W])."""
    a = np.asarray(aspects, dtype=float)
    t = float(target_hw[1]) / float(target_hw[0])
    return np.maximum(a / t, t / a)


def summarize(sizes: Sequence[Tuple[int, int]], labels: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Aspect-ratio summary of images given as (width, height): range, percentiles, per-class medians."""
    if not len(sizes):
        raise ValueError("no image sizes to summarize")
    wh = np.asarray(sizes, dtype=float)
    a = wh[:, 0] / wh[:, 1]
    p5, p50, p95 = (float(v) for v in np.percentile(a, [5, 50, 95]))
    i_lo, i_hi = int(np.argmin(a)), int(np.argmax(a))
    out: Dict[str, Any] = {
        "n": int(len(a)), "min": round(float(a.min()), 3), "p5": round(p5, 3), "median": round(p50, 3),
        "p95": round(p95, 3), "max": round(float(a.max()), 3), "spread": round(p95 / p5, 3),
        "narrowest": [int(v) for v in wh[i_lo]], "widest": [int(v) for v in wh[i_hi]],
    }
    if labels is not None:
        by: Dict[str, List[float]] = {}
        for lab, x in zip(labels, a):
            by.setdefault(lab, []).append(float(x))
        out["class_median"] = {c: round(float(np.median(v)), 3) for c, v in sorted(by.items())}
    return out


def _example_resize(aspect: float) -> str:
    """A --resize/--crop of the data's shape with the default's 72/64 pixels on the short side."""
    def r8(x: float) -> int:
        return max(8, int(round(x / 8.0)) * 8)

    if aspect >= 1:
        return f"--resize 72x{r8(72 * aspect)} --crop 64x{r8(64 * aspect)}"
    return f"--resize {r8(72 / aspect)}x72 --crop {r8(64 / aspect)}x64"


def assess(aspects: Sequence[float], target_hw: Sequence[int]) -> Dict[str, float]:
    """How each mode treats these images at input ``target_hw``: share of images ``short`` cuts
    (loses more than :data:`CUT_LOSS` of their area), the largest area it loses, and the median and
    largest factor ``stretch`` squeezes by."""
    r = ratios(aspects, target_hw)
    loss = 1.0 - 1.0 / r
    return {"short_cut_share": float((loss > CUT_LOSS).mean()), "short_max_loss": float(loss.max()),
            "stretch_median_squeeze": float(np.median(r)), "stretch_max_squeeze": float(r.max()),
            "stretch_squeezed_share": float((r > SQUEEZE_LIMIT).mean())}


def advise(aspects: Sequence[float], target_hw: Sequence[int] = (72, 72)) -> Dict[str, Any]:
    """The resize mode these images call for at input ``target_hw`` and why: {"mode", "reason"}."""
    a = np.asarray(aspects, dtype=float)
    p5, p50, p95 = np.percentile(a, [5, 50, 95])
    m = assess(a, target_hw)
    if p95 / p5 <= UNIFORM_SPREAD:
        if m["stretch_median_squeeze"] <= UNIFORM_SPREAD:
            return {"mode": "stretch", "reason": "the images share the input's aspect ratio; stretch and short "
                                                 "give nearly the same input (stretch is the default)"}
        return {"mode": "stretch",
                "reason": f"the images share one aspect ratio (width/height {p50:.2f}) unlike the input's "
                          f"{target_hw[1] / target_hw[0]:.2f}: stretch squeezes them all alike, short would cut "
                          f"{100 * m['short_max_loss']:.0f} % off each; an input of their shape keeps both, e.g. "
                          + _example_resize(float(p50))}
    return {"mode": "stretch",
            "reason": f"mixed aspect ratios (width/height {a.min():.2f} to {a.max():.2f}): short would cut more than "
                      f"{100 * CUT_LOSS:.0f} % off {100 * m['short_cut_share']:.0f} % of the images (up to "
                      f"{100 * m['short_max_loss']:.0f} %), and a defect there is lost; stretch keeps every pixel "
                      f"(squeezing them by up to {m['stretch_max_squeeze']:.1f}x)"}


def class_note(summary: Dict[str, Any]) -> Optional[str]:
    """A note when classes differ in aspect ratio (a model can tell them apart by shape alone)."""
    med = summary.get("class_median") or {}
    if len(med) < 2:
        return None
    lo, hi = min(med, key=med.get), max(med, key=med.get)
    if med[hi] / med[lo] <= CLASS_SPREAD:
        return None
    return (f"classes differ in aspect ratio (median width/height {hi} {med[hi]:.2f}, {lo} {med[lo]:.2f}): a model "
            "can learn the shape instead of the defect; check that the line's images vary the same way")


def fit_warning(aspects: Sequence[float], mode: str, target_hw: Sequence[int]) -> Optional[str]:
    """A warning when ``mode`` is a bad fit for these images at input ``target_hw`` (None when it fits)."""
    m = assess(aspects, target_hw)
    if mode == "short" and m["short_cut_share"] > CUT_SHARE:
        return (f"--resize-mode short cuts more than {100 * CUT_LOSS:.0f} % of the image off "
                f"{100 * m['short_cut_share']:.0f} % of the training images (up to {100 * m['short_max_loss']:.0f} %): "
                "a defect in the cut-off part is invisible to the model, in training and on the line. "
                "--resize-mode stretch keeps every pixel")
    if mode == "stretch" and m["stretch_squeezed_share"] > 1.0 - CUT_SHARE:
        a = np.asarray(aspects, dtype=float)
        if np.percentile(a, 95) / np.percentile(a, 5) <= UNIFORM_SPREAD:
            return (f"the training images share one aspect ratio (width/height {np.median(a):.2f}) and --resize "
                    f"{target_hw[0]}x{target_hw[1]} squeezes them {m['stretch_median_squeeze']:.1f}x: an input of "
                    "their shape keeps more detail for the same pixels, e.g. " + _example_resize(float(np.median(a))))
    return None


def image_sizes(paths: Sequence[str], skip_unreadable: bool = False) -> List[Optional[Tuple[int, int]]]:
    """(width, height) of each image file, read from its header (PIL; no decoding).

    An unreadable file is a ValueError naming it, or None in its place with ``skip_unreadable``.
    """
    from PIL import Image

    out: List[Optional[Tuple[int, int]]] = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append((int(im.size[0]), int(im.size[1])))
        except (OSError, ValueError) as e:
            if not skip_unreadable:
                raise ValueError(f"cannot read the size of image {p}: {e}") from None
            out.append(None)
    return out


def split_aspects(root: str, split: str = "train", skip_unreadable: bool = False) -> Tuple[List[float], List[str]]:
    """Aspect ratios and class names of every (readable, with ``skip_unreadable``) image of ``root/split``."""
    sizes, labels = split_sizes(root, split, skip_unreadable)
    return [w / h for w, h in sizes], labels


def split_sizes(root: str, split: str = "train",
                skip_unreadable: bool = False) -> Tuple[List[Tuple[int, int]], List[str]]:
    """(width, height) and class name of every image of ``root/split``; unreadable ones are a ValueError,
    or left out with ``skip_unreadable`` (training skips and counts them itself)."""
    from nexedge.images import READ_EXTS

    folder = os.path.join(root, split)
    paths, labels = [], []
    for c in sorted(os.listdir(folder)):
        d = os.path.join(folder, c)
        if not os.path.isdir(d) or c.startswith("."):
            continue
        for f in sorted(os.listdir(d)):
            if f.lower().endswith(READ_EXTS):
                paths.append(os.path.join(d, f))
                labels.append(c)
    sizes = image_sizes(paths, skip_unreadable)
    kept = [(s, c) for s, c in zip(sizes, labels) if s is not None]
    return [s for s, _ in kept], [c for _, c in kept]


def describe(summary: Dict[str, Any]) -> str:
    """One line: the range of aspect ratios with the narrowest and widest image."""
    nw, nh = summary["narrowest"]
    ww, wh = summary["widest"]
    return (f"aspect ratio (width/height) {summary['min']:.2f} to {summary['max']:.2f}, median {summary['median']:.2f}, "
            f"5-95 % {summary['p5']:.2f}-{summary['p95']:.2f} (narrowest {nw}x{nh}, widest {ww}x{wh})")
