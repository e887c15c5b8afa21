"""``nexedge explain``: which part of an image makes a model call it defective.

Occlusion maps (Zeiler & Fergus 2014) on the artifact that runs: each square patch of
the prepared image is replaced by its local median (the structure there removed, the
brightness kept), and the map holds how much the defect score (or one class's
probability) falls without it. It works on any backend the daemon can open (.pt, .onnx,
.engine) because it only calls ``infer``; Python 3.8, no torch.
"""

import argparse
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nexedge import preprocess as pp
from nexedge.cliopts import Key, add_kw_option, uses_globals
from nexedge.threads import given


def occlusion_map(backend: Any, prepared: np.ndarray, patch: int, stride: int, target: Optional[int] = None,
                  batch: int = 32) -> Dict[str, Any]:
    """Occlusion map of one prepared image (uint8 H x W x C) on ``backend``.

    Returns {"probs", "score", "value", "map"}: the unoccluded class probabilities and defect
    score; ``value`` is what the map explains, as log-odds: of the defect score, or of the
    probability of class index ``target``; ``map`` (H x W float32) is the mean drop of ``value``
    over the patches covering each pixel (positive: that region raises it).
    """
    import cv2

    h, w = prepared.shape[:2]
    if not 1 <= patch <= min(h, w):
        raise ValueError(f"patch {patch} px does not fit the prepared {w} x {h} image; expected 1..{min(h, w)}")
    if stride < 1:
        raise ValueError(f"stride {stride} px; expected at least 1")
    k = patch | 1  # odd median aperture about the patch size: removes structure smaller than the patch
    med = cv2.medianBlur(np.ascontiguousarray(prepared), min(k, 255)).reshape(prepared.shape)

    from nexedge.metrics import logit_exact as logit

    def value(res: Any) -> np.ndarray:  # log-odds: a probability near 0 or 1 would hide what moves it
        p = np.asarray(res.defect_score if target is None else res.probs[:, target], np.float64)
        return logit(np.clip(p, 1e-12, 1.0 - 1e-12))

    base = backend.infer(prepared[None])
    v0 = float(value(base)[0])
    ys = sorted(set(list(range(0, h - patch + 1, stride)) + [h - patch]))
    xs = sorted(set(list(range(0, w - patch + 1, stride)) + [w - patch]))
    pos = [(y, x) for y in ys for x in xs]
    drops = np.zeros(len(pos), np.float64)
    step = max(1, min(batch, getattr(backend, "max_batch", batch)))
    for i in range(0, len(pos), step):
        chunk = pos[i:i + step]
        imgs = np.repeat(prepared[None], len(chunk), axis=0)
        for j, (y, x) in enumerate(chunk):
            imgs[j, y:y + patch, x:x + patch] = med[y:y + patch, x:x + patch]
        drops[i:i + len(chunk)] = v0 - value(backend.infer(imgs))
    acc = np.zeros((h, w), np.float64)
    cnt = np.zeros((h, w), np.float64)
    for (y, x), d in zip(pos, drops):
        acc[y:y + patch, x:x + patch] += d
        cnt[y:y + patch, x:x + patch] += 1
    return {"probs": base.probs[0], "score": float(base.defect_score[0]), "value": v0,
            "map": (acc / np.maximum(cnt, 1)).astype(np.float32)}


def _to_original(prep_hw: Sequence[int], size_hw: Sequence[int], resize_mode: str) -> Tuple[float, float, int, int]:
    """(ky, kx, oy, ox): a prepared pixel (y, x) lies at ((y + oy) * ky, (x + ox) * kx) in the original image.

    ``stretch`` scales each axis; ``short`` scales both by one factor, then centre-crops (preprocess.resize_short).
    """
    h, w = int(prep_hw[0]), int(prep_hw[1])
    oh, ow = int(size_hw[0]), int(size_hw[1])
    if resize_mode != "short":
        return oh / float(h), ow / float(w), 0, 0
    s = max(h / oh, w / ow)
    nh, nw = max(h, int(round(oh * s))), max(w, int(round(ow * s)))
    return oh / float(nh), ow / float(nw), (nh - h) // 2, (nw - w) // 2


def peak_box(heat: np.ndarray, patch: int, size_hw: Sequence[int], resize_mode: str = "stretch") -> List[int]:
    """[x0, y0, x1, y1] of a patch-sized box around the map's maximum, in original image pixels."""
    ky, kx, oy, ox = _to_original(heat.shape, size_hw, resize_mode)
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    half = patch / 2.0
    return [int(max(0, (x - half + ox) * kx)), int(max(0, (y - half + oy) * ky)),
            int(min(size_hw[1], np.ceil((x + half + ox) * kx))), int(min(size_hw[0], np.ceil((y + half + oy) * ky)))]


def heat_on_original(heat: np.ndarray, size_hw: Sequence[int], resize_mode: str = "stretch") -> np.ndarray:
    """The map laid over the original image's pixel grid (0 where a ``short`` resize cropped the image away)."""
    import cv2

    ky, kx, oy, ox = _to_original(heat.shape, size_hw, resize_mode)
    h, w = heat.shape
    full = np.zeros((int(round(size_hw[0] / ky)), int(round(size_hw[1] / kx))), np.float32)
    full[oy:oy + h, ox:ox + w] = heat
    return cv2.resize(full, (int(size_hw[1]), int(size_hw[0])), interpolation=cv2.INTER_LINEAR)


def figure(img: np.ndarray, heat: np.ndarray, caption: Sequence[str], scale: float) -> np.ndarray:
    """The image and the map over it (on the image's pixel grid), side by side, with caption lines above (BGR uint8).

    Colours run from 0 (no effect) to ``scale`` (the value's largest drop over all images
    of the run), so maps of one run compare; regions that lower the value stay uncoloured.
    """
    import cv2

    g = np.ascontiguousarray(pp.as_model_color(img, "rgb")[:, :, ::-1])  # any decodable image -> 8-bit BGR
    hh, ww = g.shape[:2]
    k = max(1.0, 256.0 / max(hh, ww))
    g = cv2.resize(g, (int(ww * k), int(hh * k)), interpolation=cv2.INTER_NEAREST if k > 1 else cv2.INTER_AREA)
    hm = cv2.resize(np.clip(heat / max(scale, 1e-9), 0.0, 1.0), (g.shape[1], g.shape[0]), interpolation=cv2.INTER_LINEAR)
    col = cv2.applyColorMap((hm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    a = (0.65 * hm)[:, :, None]
    over = (g * (1 - a) + col * a).astype(np.uint8)
    pad = 6
    line_h = 16
    head = np.full((pad + line_h * len(caption), 2 * g.shape[1] + pad, 3), 255, np.uint8)
    for i, text in enumerate(caption):
        cv2.putText(head, text, (4, pad + line_h * (i + 1) - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1,
                    cv2.LINE_AA)
    body = np.full((g.shape[0], 2 * g.shape[1] + pad, 3), 255, np.uint8)
    body[:, :g.shape[1]] = g
    body[:, g.shape[1] + pad:] = over
    return np.concatenate([head, body], 0)


def configure_explain(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model artifact with its card beside it (.pt, .onnx or .engine), or a run folder")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", default="explain", help="folder for the figures and explain.json")
    p.add_argument("--target", default=None, metavar="CLASS",
                   help="explain this class's probability instead of the defect score (1 - p(good))")
    p.add_argument("--crop-mode", default=None, choices=sorted(pp.CROP_COUNTS),
                   help="crops per image (default: the card's; ten is 10x slower than center)")
    add_kw_option(p, "--occlusion-kw", {
        "patch": Key("patch", float, 0.1, "occluding patch side, as a fraction of the prepared image's shorter side"),
        "stride": Key("stride", float, 0.5, "patch step, as a fraction of the patch"),
    }, help="occlusion settings")
    p.add_argument("--limit", type=int, default=50, help="at most this many images (0: all)")
    uses_globals(p, "--threads")


def run_explain(args: argparse.Namespace) -> int:
    import cv2

    from nexedge.bench.runner import backend_kwargs
    from nexedge.export.parity import list_images_flat, read_image
    from nexedge.progress import progress
    from nexedge.runs import resolve_artifact
    from nexedge.runtime import open_backend
    from nexedge.runtime.factory import backend_kind

    paths: List[str] = []
    for item in args.images:
        if os.path.isdir(item):
            paths += list_images_flat(item)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"image or folder not found: {item}")
    if not paths:
        raise ValueError(f"no images (.png, .jpg, .bmp, .tif) under {', '.join(args.images)}")
    if args.limit < 0:
        raise ValueError(f"--limit {args.limit}; expected 0 (all) or more")
    if args.limit and len(paths) > args.limit:
        print(f"explaining the first {args.limit} of {len(paths)} images (--limit; 0 for all)")
        paths = paths[:args.limit]
    if not 0.0 < args.patch <= 1.0:
        raise ValueError(f"--occlusion-kw patch={args.patch}; expected a fraction in (0, 1]")
    if not 0.0 < args.stride <= 1.0:
        raise ValueError(f"--occlusion-kw stride={args.stride}; expected a fraction in (0, 1]")
    model = resolve_artifact(args.model, "model")
    backend = open_backend(model, **backend_kwargs(backend_kind(model), given(args), None, None))
    card = backend.card
    if args.crop_mode:
        backend = backend.crop_view(args.crop_mode)
    target = None
    if args.target is not None:
        if args.target not in card.classes:
            raise ValueError(f"--target {args.target!r} is not a class of {model}; expected one of {card.classes}")
        target = card.classes.index(args.target)
    h, w = (int(v) for v in card.input["resize"])
    mode = card.input.get("resize_mode", "stretch")
    patch = max(1, int(round(args.patch * min(h, w))))
    stride = max(1, int(round(args.stride * patch)))
    os.makedirs(args.out, exist_ok=True)

    # one image in memory at a time: the maps are kept (small), the images are read again for the figures
    results = []
    for path in progress(paths, desc="explain", unit="img"):
        try:
            img = read_image(path)
            prepared = pp.prepare(img, card.input)
        except ValueError as e:  # undecodable, or e.g. a float TIFF: say which file and go on with the others
            print(f"skipping {path}: {e}")
            continue
        r = occlusion_map(backend, prepared, patch, stride, target)
        r["box"] = peak_box(r["map"], patch, img.shape[:2], mode)
        results.append((path, r))
    if not results:
        raise ValueError("none of the images could be read and prepared for the model (see the lines above)")
    scale = max(float(r["map"].max()) for _, r in results)
    what = "defect log-odds" if target is None else f"log-odds of p({args.target})"
    rows = []
    print(f"{'image':40s} {'defect score':>12s}  top classes; region that raises the {what} most (x0,y0,x1,y1)")
    for i, (path, r) in enumerate(results):
        tops = ", ".join(f"{card.classes[j]} {float(r['probs'][j]):.2f}" for j in np.argsort(r["probs"])[::-1][:3])
        fig = os.path.join(args.out, f"{i:03d}_" + os.path.splitext(os.path.basename(path))[0] + ".png")
        caption = [os.path.basename(path)[:60], f"defect score {r['score']:.3f}; {tops}",
                   f"map: drop of the {what} when a region is occluded (red: {scale:.3f})"]
        img = read_image(path)
        cv2.imwrite(fig, figure(img, heat_on_original(r["map"], img.shape[:2], mode), caption, scale))
        rows.append({"image": path, "figure": fig, "defect_score": r["score"],
                     "classes": {c: float(p) for c, p in zip(card.classes, r["probs"])},
                     "explains": what, "value": r["value"], "max_drop": float(r["map"].max()), "peak_box": r["box"]})
        print(f"{os.path.basename(path)[:40]:40s} {r['score']:12.4f}  {tops}; {r['box']} drop {float(r['map'].max()):.3f}")
    with open(os.path.join(args.out, "explain.json"), "w", encoding="utf-8") as f:
        json.dump({"model": model, "crop_mode": backend.crop_mode, "patch_px": patch, "stride_px": stride,
                   "images": rows}, f, indent=1)
    print(f"figures and explain.json in {args.out}")
    backend.close()
    return 0
