"""Render one synthetic Nexperia-like inspection image (the library API other stages call).

``render_image(cls, seed)`` -> (uint8 H x W image, meta). Each image uses three random
streams derived from its seed: scene (pose, marking, looks), defect, and sensor noise.
The clean twin (:func:`render_pair`) re-renders the same scene and noise without the
defect, so the defect's pixels, and its bounding box, are exact.
"""

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from nexedge.data import defects
from nexedge.data.scene import Scene, composite, draw_background, draw_device, sample_scene
from nexedge.data.spec import (
    DEFAULT_LOOK,
    FIXED_SEVERITY,
    GOOD,
    NATIVE_SIZE,
    STYLES,
    BatchStyle,
    batch_classes,
    check_batch,
    check_look,
)

SeedLike = Union[int, Sequence[int], np.random.Generator, np.random.SeedSequence]
NATIVE_WH: Tuple[int, int] = (NATIVE_SIZE[1], NATIVE_SIZE[0])  # (275, 267)
BBOX_THRESHOLD = 4.0  # gray levels (before camera gain) that count as "changed by the defect"
# A labelled defect must be visible: after the optics blur it changes at least a 4 x 4 native-px
# patch by 16 gray levels (about 8x the legacy sensor noise on the dark body). Fainter draws (a
# particle on a marking stroke of its own gray, a hairline scratch, a chip whose fragment matches
# the floor) labelled the image defective with nothing to see, and set the line's threshold.
VISIBLE_LEVEL = 16.0
VISIBLE_AREA = 16.0


def _streams(seed: SeedLike) -> Tuple[np.random.Generator, np.random.Generator, np.random.SeedSequence]:
    if isinstance(seed, np.random.Generator):
        ss = np.random.SeedSequence([int(v) for v in seed.integers(0, 2**63 - 1, 2)])
    elif isinstance(seed, np.random.SeedSequence):  # a copy: spawning must not change the caller's object
        ss = np.random.SeedSequence(seed.entropy, spawn_key=seed.spawn_key, pool_size=seed.pool_size)
    else:
        ss = np.random.SeedSequence(seed)
    a, b, c = ss.spawn(3)
    return np.random.default_rng(a), np.random.default_rng(b), c


def check_size(size: Sequence[int]) -> Tuple[int, int]:
    """Validate an output (width, height)."""
    try:
        w, h = int(size[0]), int(size[1])
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"bad image size {size!r}; expected (width, height)") from None
    if w < 16 or h < 16 or w > 4096 or h > 4096:
        raise ValueError(f"image size {w}x{h} out of range; expected 16..4096 px per side")
    return w, h


def render_shape(size: Sequence[int]) -> Tuple[int, int]:
    """Canvas (H, W) the scene is drawn on: at least native size; smaller outputs are downscaled."""
    w, h = check_size(size)
    return max(h, NATIVE_SIZE[0]), max(w, NATIVE_SIZE[1])


def sample_severity(rng: np.random.Generator) -> float:
    """Defect severity in (0, 1]: mostly clear, about 1 in 10 below 0.2 (borderline)."""
    return float(np.clip(rng.beta(1.5, 1.2), 0.03, 1.0))


def _canvas(sc: Scene, d: Optional[defects.Defect]) -> np.ndarray:
    s2 = defects.modify(sc, d) if d is not None else sc
    bg = draw_background(s2)
    if d is not None:
        defects.on_background(bg, s2, d)
    if s2.device:
        dev, alpha = draw_device(s2)
        if d is not None:
            defects.on_device(dev, alpha, s2, d)
        img = composite(bg, dev, alpha, s2)
    else:
        img = bg
    if d is not None:
        img = defects.on_image(img, s2, d)
    return img


_GRIDS: Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]] = {}


def _grid(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    if (h, w) not in _GRIDS:
        y = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
        x = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
        _GRIDS[(h, w)] = (y, x)
    return _GRIDS[(h, w)]


# Real look sensor and surface noise, calibrated on real line images (docs/data.md), in their
# view (221 x 215): the fine residual grows about in proportion to the level (std of the 3x3
# median residual 1.8 on the dark floor, 6 at level 40-80, 12-14 on lit metal), hence read noise
# plus a speckle proportional to the level; on the floor the high-passed texture (std 3.3) stays
# correlated over several pixels, longer along the rows (0.30 at 3 px) than across them (0.19):
# streaks along the rows plus blotches, each a fresh Gaussian-filtered field per image.
# The amplitudes are those first fitted on the floor alone (1.5x them came closer on KID and
# the noise spectrum, but made small defects harder to learn and transfer: docs/data.md).
REAL_READ = 0.6  # x the batch's read noise sigma
REAL_SPECKLE = 0.2  # sigma / level = REAL_SPECKLE * sqrt(batch shot factor): 0.12 for batch 2
REAL_STREAK = (1.5, 8.0, 1.6)  # std (gray levels), sigma along x, sigma along y (native px)
REAL_BLOTCH = (1.5, 2.5)  # std, sigma
REAL_IMPULSES = (16.0, 28.0, 1.5, 160.0)  # per native frame; Pareto level: scale, shape, cap


def structured_noise(rng: np.random.Generator, h: int, w: int, s: float) -> np.ndarray:
    """Spatially correlated noise: streaks along the rows plus blotches (real look), float32 H x W.

    Drawn at half resolution and upsampled (both parts are smooth over more than a pixel): a
    quarter of the random numbers and filtering of a full-size field.
    """
    hh, hw = (h + 1) // 2, (w + 1) // 2
    out = np.zeros((hh, hw), np.float32)
    for amp, sx, sy in (REAL_STREAK, REAL_BLOTCH + (REAL_BLOTCH[1],)):
        f = cv2.GaussianBlur(rng.standard_normal((hh, hw), dtype=np.float32), (0, 0), sigmaX=sx * s / 2,
                             sigmaY=sy * s / 2)
        out += f * np.float32(amp / max(float(f.std()), 1e-6))
    return cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)


def impulses(img: np.ndarray, rng: np.random.Generator) -> None:
    """Add isolated bright pixels (hot pixels, dust glints; real look) in place, heavy-tailed in level.

    Counted on the references' view (221 x 215, 5 x 5 median residual, 1-3 px spots on dark
    ground), real frames hold about 14 such spots over 25 gray levels per image, 4 over 40
    and 1.3 over 60; read noise and speckle alone gave 8, 2 and 0.1.
    """
    h, w = img.shape
    n = int(rng.poisson(REAL_IMPULSES[0] * h * w / (NATIVE_SIZE[0] * NATIVE_SIZE[1])))
    if n == 0:
        return
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    amp = np.minimum(REAL_IMPULSES[1] * rng.random(n) ** (-1.0 / REAL_IMPULSES[2]), REAL_IMPULSES[3])
    wide = rng.random(n) < 0.4  # some spread over two pixels
    np.add.at(img, (ys, xs), amp.astype(np.float32))
    np.add.at(img, (ys[wide], np.minimum(xs[wide] + 1, w - 1)), (0.6 * amp[wide]).astype(np.float32))


def _finish(canvas: np.ndarray, sc: Scene, noise: np.random.SeedSequence, out_wh: Tuple[int, int]) -> np.ndarray:
    """Camera: illumination field, gain/offset, optics blur, read + shot noise, row banding, resize."""
    h, w = canvas.shape
    st = sc.style
    y, x = _grid(h, w)
    fy = (1.0 + sc.tilt[1] * y) * (1.0 - 0.10 * y * y) * np.float32(sc.gain)
    fx = (1.0 + sc.tilt[0] * x) * (1.0 - 0.10 * x * x)
    img = canvas * (fy * fx) + np.float32(st.offset)
    img = cv2.GaussianBlur(img, (0, 0), sc.blur * sc.s)
    rng = np.random.default_rng(noise)
    if sc.real:  # read noise, and a grain that grows in proportion to the level (speckle of lit surfaces)
        lit = cv2.max(img, 0.0)
        var = lit * lit * np.float32(st.shot * REAL_SPECKLE ** 2) + np.float32((REAL_READ * st.noise) ** 2)
    else:
        var = cv2.max(img, 0.0) * np.float32(st.shot) + np.float32(st.noise ** 2)
    img += rng.standard_normal((h, w), dtype=np.float32) * cv2.sqrt(var)
    img += rng.standard_normal((h, 1), dtype=np.float32) * np.float32(0.15 if sc.real else 0.8)
    if sc.real:
        img += structured_noise(rng, h, w, sc.s)
        impulses(img, rng)
    if (w, h) != out_wh:
        img = cv2.resize(img, out_wh, interpolation=cv2.INTER_AREA)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _bbox(a: np.ndarray, b: np.ndarray, sc: Scene, out_wh: Tuple[int, int]) -> Optional[list]:
    ys, xs = np.nonzero(np.abs(a - b) > BBOX_THRESHOLD)
    if len(ys) == 0:
        return None
    h, w = a.shape
    pad = int(np.ceil(2.5 * sc.blur * sc.s)) + 1
    kx, ky = out_wh[0] / w, out_wh[1] / h
    x0, y0 = max(0, xs.min() - pad), max(0, ys.min() - pad)
    x1, y1 = min(w, xs.max() + 1 + pad), min(h, ys.max() + 1 + pad)
    return [int(np.floor(x0 * kx)), int(np.floor(y0 * ky)), int(np.ceil(x1 * kx)), int(np.ceil(y1 * ky))]


def visible(bad: np.ndarray, clean: np.ndarray, sc: Scene) -> bool:
    """Whether a defect canvas differs from its clean twin by :data:`VISIBLE_LEVEL` over at least
    :data:`VISIBLE_AREA` native pixels once the camera's optics blur is applied."""
    d = cv2.GaussianBlur(bad - clean, (0, 0), sc.blur * sc.s)
    return int(np.count_nonzero(np.abs(d) >= VISIBLE_LEVEL)) >= VISIBLE_AREA * sc.s * sc.s


def _render(cls: str, seed: SeedLike, batch: int, size: Sequence[int], severity: Optional[float],
            twin: bool, style: Optional[BatchStyle],
            look: str) -> Tuple[np.ndarray, Optional[np.ndarray], Dict[str, Any]]:
    check_batch(batch)
    check_look(look)
    if cls not in batch_classes(batch):
        raise ValueError(f"unknown class {cls!r} for batch {batch}; expected one of {batch_classes(batch)}")
    out_wh = check_size(size)
    st = style or STYLES[batch]
    scene_rng, defect_rng, noise = _streams(seed)
    sc = sample_scene(scene_rng, render_shape(out_wh), st, look)
    meta: Dict[str, Any] = {
        "class": cls, "batch": batch, "variant": st.variant, "size": list(out_wh), "marking": sc.text,
        "flip": sc.flip, "pose": {"angle": round(sc.angle, 3), "dx": round(sc.dx, 2), "dy": round(sc.dy, 2)},
        "severity": 0.0, "bbox": None,
    }
    clean = _canvas(sc, None)
    if cls == GOOD:
        img = _finish(clean, sc, noise, out_wh)
        return img, (img.copy() if twin else None), meta
    sev = sample_severity(defect_rng) if severity is None else float(severity)
    if cls in FIXED_SEVERITY:
        sev = 1.0
    for k in range(16):  # a defect drawn where it cannot show (e.g. clipped away) is drawn again
        d = defects.sample_defect(cls, sc, defect_rng, sev)
        bad = _canvas(sc, d)
        bbox = _bbox(bad, clean, sc, out_wh)
        if bbox is not None and visible(bad, clean, sc):
            break
        if k % 4 == 3:  # too faint wherever it lands at this severity: draw it bolder
            sev = min(1.0, sev + 0.1)
    else:
        raise RuntimeError(f"could not place a visible {cls} defect (severity {sev}) in image {seed!r}")
    meta["severity"] = round(sev, 4)
    meta["bbox"] = bbox
    meta["defect"] = {k: v for k, v in d.params.items() if k == "mode"}
    img = _finish(bad, sc, noise, out_wh)
    return img, (_finish(clean, sc, noise, out_wh) if twin else None), meta


def render_image(cls: str, seed: SeedLike, batch: int = 2, size: Sequence[int] = NATIVE_WH,
                 severity: Optional[float] = None, style: Optional[BatchStyle] = None,
                 look: str = DEFAULT_LOOK) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Render one grayscale image of class ``cls``.

    ``seed``: int, sequence of ints (e.g. ``(seed, index)``), SeedSequence or Generator.
    ``size``: output (width, height). ``severity`` in (0, 1] (drawn when None; ignored for
    good, fixed at 1 for device_flip, empty_pocket, camera_glitch). ``look``: "real" (calibrated
    against real line images) or "legacy" (the renderer before that calibration).
    Returns (uint8 H x W, meta) with meta keys class, batch, variant, size, marking, flip,
    pose, severity, bbox ([x0, y0, x1, y1], x1/y1 exclusive, or None for good).
    """
    img, _, meta = _render(cls, seed, batch, size, severity, False, style, look)
    return img, meta


def render_pair(cls: str, seed: SeedLike, batch: int = 2, size: Sequence[int] = NATIVE_WH,
                severity: Optional[float] = None,
                style: Optional[BatchStyle] = None,
                look: str = DEFAULT_LOOK) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """Like :func:`render_image`, plus the clean twin: same scene, pose and noise, no defect."""
    img, clean, meta = _render(cls, seed, batch, size, severity, True, style, look)
    return img, (img if clean is None else clean), meta
