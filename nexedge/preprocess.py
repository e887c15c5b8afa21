"""The one definition of eval preprocessing, shared by training, calibration,
export parity checks, benchmarks and the daemon.

Steps: decoded image (any size, gray or colour, uint8/uint16) -> model colour
(``gray`` keeps one channel, ``rgb`` three; 16-bit samples scaled by their bit depth) -> resize to the card's [H, W]
(cv2 INTER_AREA) -> uint8 H x W x C. The card's ``input.resize_mode`` says how:
``stretch`` (default) scales each axis to [H, W] and changes the aspect ratio;
``short`` scales the image, keeping its aspect ratio, until it covers [H, W]
(the short side fits) and center-crops [H, W] out of it, as the report's
``Resize(short side)`` + center crop do. From there either the graph does the rest
(in-graph crops) or :func:`host_batch` does: gray to 3 channels, scale to
[0, 1], normalise with mean/std, crops (center | five | ten).

TenCrop order: top-left, top-right, bottom-left, bottom-right, center, then
the same five of the horizontally flipped image (torchvision's order).

Imported by the daemon: Python 3.8, numpy and OpenCV only.
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

CROP_COUNTS = {"center": 1, "five": 5, "ten": 10}


def n_crops(mode: str) -> int:
    """Number of crops per image for a crop mode."""
    try:
        return CROP_COUNTS[mode]
    except KeyError:
        raise ValueError(f"unknown crop mode {mode!r}; expected one of {sorted(CROP_COUNTS)}") from None


def to_uint8(img: np.ndarray, bit_depth: int = 16) -> np.ndarray:
    """uint16 samples holding ``bit_depth`` significant bits (a 12-bit sensor: 0..4095) -> uint8 0..255,
    full scale to full scale (rounded; values above full scale clip). 16 bits is ``>> 8``, as before.
    uint8 passes through."""
    if img.dtype == np.uint8:
        return img
    if img.dtype != np.uint16:
        raise ValueError(f"unsupported image dtype {img.dtype}; expected uint8 or uint16")
    if not isinstance(bit_depth, int) or isinstance(bit_depth, bool) or not 1 <= bit_depth <= 16:
        raise ValueError(f"bit_depth {bit_depth!r}: expected an integer 1..16")
    if bit_depth == 16:
        return (img >> 8).astype(np.uint8)
    full = (1 << bit_depth) - 1
    out = (np.minimum(img, full).astype(np.uint32) * 255 + full // 2) // full
    return out.astype(np.uint8)


def as_model_color(img: np.ndarray, color: str, bit_depth: int = 16) -> np.ndarray:
    """Convert a decoded image to uint8 H x W x C with C=1 (``gray``) or 3 (``rgb``).

    Accepts H x W, H x W x 1, H x W x 3 (BGR, as OpenCV decodes) and H x W x 4
    (BGRA); uint8 or uint16 (scaled to 8 bit by :func:`to_uint8` at ``bit_depth``).
    """
    import cv2

    if not isinstance(img, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(img).__name__}")
    img = to_uint8(img, bit_depth)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"unsupported image shape {img.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"empty image of shape {img.shape}")
    c = img.shape[2]
    if color == "gray":
        if c == 1:
            return img
        code = cv2.COLOR_BGR2GRAY if c == 3 else cv2.COLOR_BGRA2GRAY
        return cv2.cvtColor(np.ascontiguousarray(img), code)[:, :, None]
    if color == "rgb":
        if c == 1:
            return np.repeat(img, 3, axis=2)
        code = cv2.COLOR_BGR2RGB if c == 3 else cv2.COLOR_BGRA2RGB
        return cv2.cvtColor(np.ascontiguousarray(img), code)
    raise ValueError(f"unknown colour {color!r}; expected 'gray' or 'rgb'")


def resize(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize uint8 H x W x C to ``size`` = [H, W] (INTER_AREA), keeping the channel axis."""
    import cv2

    h, w = int(size[0]), int(size[1])
    if img.shape[0] == h and img.shape[1] == w:
        return img
    out = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    if out.ndim == 2:
        out = out[:, :, None]
    return out


RESIZE_MODES = ("stretch", "short")


def resize_short(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Scale ``img`` keeping its aspect ratio until it covers ``size`` = [H, W], then center-crop [H, W]."""
    h, w = int(size[0]), int(size[1])
    s = max(h / img.shape[0], w / img.shape[1])
    nh, nw = max(h, int(round(img.shape[0] * s))), max(w, int(round(img.shape[1] * s)))
    out = resize(img, (nh, nw))
    top, left = (nh - h) // 2, (nw - w) // 2
    return np.ascontiguousarray(out[top : top + h, left : left + w])


def prepare(img: np.ndarray, inp: Mapping[str, Any], bit_depth: Optional[int] = None) -> np.ndarray:
    """Host part common to every model: colour + resize (``input.resize_mode``) -> uint8 H x W x C.
    16-bit samples are scaled by ``bit_depth`` significant bits (default: the card's ``input.bit_depth``,
    else 16)."""
    mode = inp.get("resize_mode", "stretch")
    img = as_model_color(img, inp["color"], int(bit_depth or inp.get("bit_depth") or 16))
    if mode == "stretch":
        return resize(img, inp["resize"])
    if mode == "short":
        return resize_short(img, inp["resize"])
    raise ValueError(f"unknown resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")


def crop_offsets(mode: str, size: Sequence[int], crop: Sequence[int]) -> List[Tuple[int, int, bool]]:
    """(top, left, flipped) of every crop, in TenCrop order; ``flipped`` crops are
    taken at (top, left) of the horizontally flipped image."""
    H, W = int(size[0]), int(size[1])
    h, w = int(crop[0]), int(crop[1])
    if h > H or w > W:
        raise ValueError(f"crop {(h, w)} larger than image {(H, W)}")
    center = (int(round((H - h) / 2.0)), int(round((W - w) / 2.0)))
    five = [(0, 0), (0, W - w), (H - h, 0), (H - h, W - w), center]
    k = n_crops(mode)
    if k == 1:
        return [(center[0], center[1], False)]
    out = [(y, x, False) for y, x in five]
    if k == 10:
        out += [(y, x, True) for y, x in five]
    return out


def normalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [N x] H x W x C -> float32 [N x] 3 x H x W, gray replicated, (x/255 - mean)/std."""
    x = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def crops_chw(x: np.ndarray, mode: str, crop: Sequence[int]) -> np.ndarray:
    """N x 3 x H x W -> (N*K) x 3 x h x w, crops of each image contiguous, TenCrop order."""
    N, _, H, W = x.shape
    h, w = int(crop[0]), int(crop[1])
    offs = crop_offsets(mode, (H, W), (h, w))
    flipped = x[..., ::-1] if any(f for _, _, f in offs) else None
    parts = []
    for y0, x0, f in offs:
        src = flipped if f else x
        parts.append(src[:, :, y0 : y0 + h, x0 : x0 + w])
    out = np.stack(parts, axis=1)  # N x K x 3 x h x w
    return np.ascontiguousarray(out.reshape(N * len(offs), x.shape[1], h, w))


def host_batch(images: np.ndarray, inp: Mapping[str, Any], mode: str = "") -> np.ndarray:
    """Prepared uint8 N x H x W x C -> float32 (N*K) x 3 x h x w for a host-crop model."""
    x = normalize(images, inp["mean"], inp["std"])
    return crops_chw(x, mode or inp["crop_mode"], inp["crop"])


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - np.max(logits, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def average_crops(logits: np.ndarray, k: int) -> np.ndarray:
    """(N*K) x C crop logits -> N x C, averaged over each image's K crops."""
    if logits.shape[0] % k:
        raise ValueError(f"{logits.shape[0]} crop rows is not a multiple of {k} crops")
    return logits.reshape(-1, k, logits.shape[-1]).mean(axis=1)


IMAGE_STATS = ("brightness", "contrast", "sharpness")


def image_stats(img: np.ndarray) -> Tuple[float, float, float]:
    """Cheap per-image statistics for the shift monitor, on a prepared uint8 image:
    brightness = mean/255, contrast = std/255, sharpness = variance of the Laplacian / 255^2."""
    import cv2

    g = img if img.ndim == 2 else (img[:, :, 0] if img.shape[2] == 1 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))
    g32 = g.astype(np.float32) * (1.0 / 255.0)
    lap = cv2.Laplacian(g32, cv2.CV_32F, ksize=1)
    return float(g32.mean()), float(g32.std()), float(lap.var())


def reference_image_stats(stats: Sequence[Sequence[float]]) -> Dict[str, Dict[str, float]]:
    """{brightness|contrast|sharpness: {mean, std}} over per-image :func:`image_stats` rows
    (the card's ``image_stats``, the shift monitor's reference)."""
    vals = np.asarray(stats, dtype=float)
    if vals.ndim != 2 or not len(vals):
        raise ValueError("no images for the reference image statistics")
    return {
        name: {"mean": float(vals[:, i].mean()), "std": float(vals[:, i].std())}
        for i, name in enumerate(IMAGE_STATS)
    }


def quiet_opencv() -> None:
    """OpenCV's own warnings (``[ WARN:0@0.02] ... PNG input buffer is incomplete``) go straight to
    stderr; nexedge reports an unreadable image itself, with its path (or as RECHECK undecodable)."""
    try:
        import cv2
    except ImportError:
        return
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # very old OpenCV builds
        pass
