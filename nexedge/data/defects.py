"""Local defects with a severity in (0, 1].

A defect is sampled from its own random stream (so the scene, and therefore the clean
twin, stays the same) and hooks into drawing at one of four stages: it changes scene
parameters (``modify``), draws on the background (``on_background``), on the unrotated
device layer (``on_device``) or on the composited image (``on_image``). Low severities
give borderline cases (a 3 px chip, a faint short scratch) that a human could label
either way.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import cv2
import numpy as np

from nexedge.data.scene import BOTTOM_LEAD_X, Lead, Scene, body_rect, lead_quad, pocket_box, pose_matrix

DEFECT_KINDS = (
    "chipping", "device_flip", "empty_pocket", "foreign_material", "lead_defect", "lead_glue",
    "marking_defect", "pocket_damage", "scratch", "tin_particle", "camera_glitch",
)


@dataclass
class Defect:
    kind: str
    severity: float
    params: Dict[str, Any] = field(default_factory=dict)


def _blob(rng: np.random.Generator, c: Tuple[float, float], r: float, n: int = 7) -> np.ndarray:
    """Irregular polygon (n x 2) around ``c`` with mean radius ``r``.

    One vertex per 1/n turn (jittered within it), so the polygon always encloses ``c``: angles
    drawn anywhere on the circle put all 7 vertices in one half about 1 time in 9, and a chip
    so drawn sat outside the body it was meant to break, invisible at any severity.
    """
    ang = (np.arange(n) + rng.uniform(0, 1, n)) * (2 * np.pi / n)
    rad = r * rng.uniform(0.55, 1.0, n)
    return np.stack([c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang)], axis=1)


def _poly_mask(shape: Tuple[int, int], pts: np.ndarray) -> np.ndarray:
    m = np.zeros(shape, np.float32)
    cv2.fillPoly(m, [np.round(pts * 16).astype(np.int32)], 1.0, cv2.LINE_AA, 4)
    return m


def _soft(m: np.ndarray, p: Dict[str, Any]) -> np.ndarray:
    """Blur a defect mask by ``p["soft"]`` px (real look); legacy masks stay hard."""
    return cv2.GaussianBlur(m, (0, 0), p["soft"]) if p.get("soft") else m


def _to_image(sc: Scene, p: Tuple[float, float]) -> Tuple[float, float]:
    """Unrotated render px -> image px under the scene's pose."""
    m = pose_matrix(sc)
    return (float(m[0, 0] * p[0] + m[0, 1] * p[1] + m[0, 2]), float(m[1, 0] * p[0] + m[1, 1] * p[1] + m[1, 2]))


def sample_defect(kind: str, sc: Scene, rng: np.random.Generator, severity: float) -> Defect:
    """Draw the parameters of one defect for scene ``sc`` (render px unless noted)."""
    if kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect class {kind!r}; expected one of {sorted(DEFECT_KINDS)}")
    if not 0.0 < severity <= 1.0:
        raise ValueError(f"severity {severity!r} out of range; expected 0 < severity <= 1")
    sv, s = float(severity), sc.s
    x0, y0, x1, y1 = body_rect(sc)
    p: Dict[str, Any] = {}
    if kind == "chipping":
        cxm, cym = (x0 + x1) / 2, (y0 + y1) / 2
        if rng.random() < 0.5:  # a corner
            c = (x0 if rng.random() < 0.5 else x1, y0 if rng.random() < 0.5 else y1)
        else:  # a long edge
            c = (rng.uniform(x0 + 10 * s, x1 - 10 * s), y0 if rng.random() < 0.5 else y1)
        r = (6.0 + 26.0 * sv) * s
        # the fracture reaches into the body; the missing part sits at the edge
        fc = (c[0] + 0.3 * r * np.sign(cxm - c[0]) * (c[0] in (x0, x1)), c[1] + 0.3 * r * np.sign(cym - c[1]))
        p = {"outer": _blob(rng, fc, r), "inner": _blob(rng, c, 0.75 * r), "deep": sv > 0.15,
             "gray": sc.body_gray + 22.0 + 38.0 * sv, "grain": rng.uniform(0.75, 1.25, 64).astype(np.float32)}
        if sc.real:  # a fracture: jagged outline, soft edge (drawn after the legacy draws)
            p["outer"] = _blob(rng, fc, r, 14)
            p["soft"] = 0.8 * s
    elif kind == "scratch":
        length = (18.0 + 150.0 * sv) * s
        a = rng.uniform(-np.pi / 3, np.pi / 3)
        mid = np.array([rng.uniform(x0 + 12 * s, x1 - 12 * s), rng.uniform(y0 + 8 * s, y1 - 8 * s)])
        n = 12
        t = np.linspace(-0.5, 0.5, n)[:, None]
        d = np.array([np.cos(a), np.sin(a)])
        pts = mid + t * length * d + rng.normal(0, 0.8 * s, (n, 2))  # centred in the body, clipped at its edge
        p = {"pts": pts, "width": max(1, int(round((1.0 + 6.0 * sv**1.5) * s))),
             "delta": 22.0 + 120.0 * sv, "seg": rng.uniform(0.3, 1.3, n - 1)}
        if sc.real:  # a scuffed groove: soft, ragged edges
            p["soft"] = 0.7 * s
    elif kind == "lead_glue":
        i = int(rng.integers(0, len(sc.leads)))
        q = lead_quad(sc, sc.leads[i], 0.25, 0.95)
        f = rng.uniform(0.0, 1.0)
        c = (q[0] * (1 - f) + q[3] * f + q[1] * (1 - f) + q[2] * f) / 2 + rng.normal(0, 3 * s, 2)
        # glue is a dull patch: it returns a fraction of the light of the plated metal under it
        # (a fixed gray matched the lead's own mid and tip bands and vanished there)
        p = {"lead": i, "blob": _blob(rng, (c[0], c[1]), (2.5 + 10.0 * sv) * s, 9),
             "dim": rng.uniform(0.4, 0.6)}
        if sc.real:  # glue wets the metal: irregular outline, soft edge (drawn after the legacy draws)
            p["blob"] = _blob(rng, (c[0], c[1]), (2.5 + 10.0 * sv) * s, 13)
            p["soft"] = 0.7 * s
    elif kind == "lead_defect":
        mode = str(rng.choice(["bent", "short", "shifted"]))
        p = {"lead": int(rng.integers(0, len(sc.leads))), "mode": mode,
             "sign": float(rng.choice([-1.0, 1.0]))}
    elif kind == "marking_defect":
        mode = str(rng.choice(["missing", "faded"]))
        frac = 0.12 + 0.45 * sv
        fx = rng.uniform(0.1, 0.9 - frac)
        p = {"mode": mode, "rect": (fx, 0.0, fx + frac, 1.0)}
    elif kind == "pocket_damage":
        px0, py0, px1, py1 = pocket_box(sc)
        side = str(rng.choice(["left", "right", "bottom", "top"]))
        if side in ("left", "right"):
            c = (px0 if side == "left" else px1, rng.uniform(py0 + 40 * s, py1 - 40 * s))
        else:
            c = (rng.uniform(px0 + 40 * s, px1 - 40 * s), py0 if side == "top" else py1)
        r = (5.0 + 24.0 * sv) * s
        inward = {"left": (1.0, 0.0), "right": (-1.0, 0.0), "top": (0.0, 1.0), "bottom": (0.0, -1.0)}[side]
        dc = (c[0] + inward[0] * 0.6 * r, c[1] + inward[1] * 0.6 * r)
        k = 6
        t = np.linspace(0.0, 1.6 * r, k)
        along = rng.uniform(-0.8, 0.8)
        crack = np.stack([c[0] + inward[0] * t + inward[1] * along * t + rng.normal(0, 0.25 * r, k) * abs(inward[1]),
                          c[1] + inward[1] * t + inward[0] * along * t + rng.normal(0, 0.25 * r, k) * abs(inward[0])], 1)
        p = {"dent": _blob(rng, dc, r, 9), "crack": crack, "bright": 1.7 + 0.9 * sv}
    elif kind in ("foreign_material", "tin_particle"):
        k = int(rng.integers(1, 4))
        parts = []
        for _ in range(k):
            if kind == "tin_particle" and rng.random() < 0.7:  # tin comes off the plated leads
                ld = sc.leads[int(rng.integers(0, len(sc.leads)))]
                q = lead_quad(sc, ld, 0.0, 0.2)
                c = q.mean(axis=0) + rng.normal(0, 8 * s, 2)
            elif rng.random() < 0.6:
                c = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)])
            else:
                c = np.array([rng.uniform(x0 - 25 * s, x1 + 25 * s), rng.uniform(y0 - 40 * s, y1 + 40 * s)])
            r = ((1.6 + 6.0 * sv) if kind == "foreign_material" else (1.4 + 4.0 * sv)) * s
            fiber = kind == "foreign_material" and rng.random() < 0.25
            parts.append({"c": _to_image(sc, (c[0], c[1])), "r": r, "fiber": fiber,
                          "gray": rng.uniform(85.0, 120.0) + 100.0 * sv,
                          "blob": _blob(rng, (0.0, 0.0), r),
                          "bend": rng.normal(0, 1, 4), "len": (8.0 + 40.0 * sv) * s})
        p = {"parts": parts}
        if sc.real:  # dust, fibres and tin splashes: ragged outlines with soft, out-of-focus edges
            for q in parts:
                q["blob"] = _blob(rng, (0.0, 0.0), q["r"], 13)
            p["soft"] = 0.9 * s
    elif kind == "camera_glitch":
        mode = str(rng.choice(["tear", "dropout", "crop"]))
        h, w = sc.size
        p = {"mode": mode, "row": int(rng.integers(h // 5, 4 * h // 5)), "shift": int(rng.integers(w // 10, w // 3)),
             "band": int(rng.integers(h // 20, h // 6)), "level": float(rng.choice([0.0, 255.0])),
             "dxy": (int(rng.integers(w // 6, w // 3)) * int(rng.choice([-1, 1])),
                     int(rng.integers(h // 8, h // 4)) * int(rng.choice([-1, 1])))}
    return Defect(kind, sv, p)


def modify(sc: Scene, d: Defect) -> Scene:
    """Scene changes (a copy) for defects that alter the device itself."""
    if d.kind not in ("lead_defect", "device_flip", "empty_pocket", "marking_defect"):
        return sc
    sc = sc.copy()
    sv, p = d.severity, d.params
    if d.kind == "empty_pocket":
        sc.device = False
    elif d.kind == "device_flip":
        sc.bottom_side = True
        pitch = abs(sc.leads[0].x)
        lw, ll = sc.leads[0].width, sc.leads[0].length
        lv = sc.leads[2].levels
        sc.leads = [Lead("bottom", -pitch, lw, ll, 0.0, lv, True), Lead("bottom", pitch, lw, ll, 0.0, lv, True),
                    Lead("top", sc.leads[2].x, lw, ll, 0.0, lv, True)]
    elif d.kind == "lead_defect":
        ld = sc.leads[p["lead"]]
        if p["mode"] == "bent":
            ld.angle = p["sign"] * (7.0 + 35.0 * sv)
        elif p["mode"] == "short":
            ld.length *= 1.0 - (0.18 + 0.65 * sv)
        else:
            shift = p["sign"] * (3.0 + 14.0 * sv)
            if ld.side == "bottom":  # its good position varies by 7 px: shift from the edge of that range
                ld.x = BOTTOM_LEAD_X[1 if shift > 0 else 0] + shift
            else:  # one of a symmetric pair: any shift breaks the symmetry
                ld.x += shift
    elif d.kind == "marking_defect":
        if p["mode"] == "missing":
            sc.marking_erase = [p["rect"]]
        else:
            sc.mark_fade = 1.0 - (0.3 + 0.65 * sv)
    return sc


def on_background(bg: np.ndarray, sc: Scene, d: Defect) -> None:
    if d.kind != "pocket_damage":
        return
    p = d.params
    m = _poly_mask(bg.shape, p["dent"])
    bg *= 1.0 - 0.55 * m  # crushed wall: darker
    cv2.polylines(bg, [np.round(p["crack"] * 16).astype(np.int32)], False, sc.rim_gray * p["bright"],
                  max(1, int(round(1.5 * sc.s))), cv2.LINE_AA, 4)


def on_device(dev: np.ndarray, alpha: np.ndarray, sc: Scene, d: Defect) -> None:
    p = d.params
    if d.kind == "chipping":
        x0, y0, x1, y1 = body_rect(sc)
        body = np.zeros(dev.shape, np.float32)
        cv2.rectangle(body, (int(round(x0)), int(round(y0))), (int(round(x1)), int(round(y1))), 1.0, -1)
        m = _soft(_poly_mask(dev.shape, p["outer"]), p) * body
        ys, xs = np.nonzero(m)
        if len(ys):
            grain = p["grain"][(ys * 7 + xs * 3) % 64]
            dev[ys, xs] = dev[ys, xs] * (1 - m[ys, xs]) + m[ys, xs] * p["gray"] * grain
        if p["deep"]:
            inner = _poly_mask(dev.shape, p["inner"]) * body
            alpha *= 1.0 - inner
    elif d.kind == "scratch":
        x0, y0, x1, y1 = body_rect(sc)
        line = np.zeros(dev.shape, np.float32)
        pts = p["pts"]
        for i in range(len(pts) - 1):
            a = tuple(int(v) for v in np.round(pts[i] * 16))
            b = tuple(int(v) for v in np.round(pts[i + 1] * 16))
            if p["width"] >= 3:  # a wide scratch: scuffed band around a bright core
                cv2.line(line, a, b, 0.35 * float(p["seg"][i]), 3 * p["width"], cv2.LINE_AA, 4)
            cv2.line(line, a, b, float(p["seg"][i]), p["width"], cv2.LINE_AA, 4)
        clip = np.zeros(dev.shape, np.float32)
        e = 2.5 * sc.s
        cv2.rectangle(clip, (int(x0 + e), int(y0 + e)), (int(x1 - e), int(y1 - e)), 1.0, -1)
        dev += _soft(line, p) * clip * np.float32(p["delta"])
    elif d.kind == "lead_glue":
        m = _soft(_poly_mask(dev.shape, p["blob"]), p)
        w = m * alpha
        under = float((dev * w).sum() / w.sum()) if w.sum() > 0 else float(sc.leads[p["lead"]].levels[0])
        dev[:] = dev * (1 - m) + m * (p["dim"] * under)
        np.maximum(alpha, m, out=alpha)


def on_image(img: np.ndarray, sc: Scene, d: Defect) -> np.ndarray:
    p = d.params
    if d.kind in ("foreign_material", "tin_particle"):
        before = img.copy() if p.get("soft") else None
        for q in p["parts"]:
            c = np.array(q["c"])
            if d.kind == "tin_particle":
                ci = (int(round(c[0] * 16)), int(round(c[1] * 16)))
                r = q["r"]
                cv2.circle(img, ci, int(round(r * 1.35 * 16)), 12.0, -1, cv2.LINE_AA, 4)  # dark ring
                for k, v in ((1.0, 150.0), (0.7, 210.0), (0.4, 255.0)):
                    cv2.circle(img, ci, max(1, int(round(r * k * 16))), v, -1, cv2.LINE_AA, 4)
            elif q["fiber"]:
                t = np.linspace(0, 1, 6)[:, None]
                b = q["bend"]
                pts = c + np.concatenate([t * q["len"] * b[0:1] / (abs(b[0]) + 1e-3),
                                          t * q["len"] * 0.5 * np.sin(3 * t + b[1])], axis=1)
                cv2.polylines(img, [np.round(pts * 16).astype(np.int32)], False, q["gray"],
                              max(1, int(round(sc.s))), cv2.LINE_AA, 4)
            else:
                h, w = img.shape
                under = img[min(h - 1, max(0, int(c[1]))), min(w - 1, max(0, int(c[0])))]
                g = q["gray"] if under < 140 else 255.0 - q["gray"]  # dirt shows dark on a bright lead
                cv2.fillPoly(img, [np.round((q["blob"] + c) * 16).astype(np.int32)], g, cv2.LINE_AA, 4)
        if before is not None:  # soften what the particles changed, not the scene under them
            img = before + _soft(img - before, p)
        return img
    if d.kind == "camera_glitch":
        h, w = img.shape
        if p["mode"] == "tear":
            r = p["row"]
            img[r:] = np.roll(img[r:], p["shift"], axis=1)
            img[r:r + 1] = 200.0
        elif p["mode"] == "dropout":
            r = p["row"]
            img[r:r + p["band"]] = p["level"]
        else:
            m = np.float32([[1, 0, p["dxy"][0]], [0, 1, p["dxy"][1]]])
            img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_NEAREST, borderValue=0.0)
    return img
