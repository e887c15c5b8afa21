"""Scene parameters and drawing of a SOT-23-style device in a carrier-tape pocket.

Everything is drawn as float32 gray levels (0..255, before camera gain and noise) on a
canvas of the render size; geometry is given at the native 275 x 267 size and scaled.
Drawing is split into a background (tape, pocket) and an unrotated device layer with
an alpha mask; :func:`composite` rotates and places the device. Defects hook in between.
"""

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from nexedge.data.spec import NATIVE_SIZE, BatchStyle

NH, NW = NATIVE_SIZE
_CODE_CHARS = "ABCDEFHKLMNPRSTUVWXYZ0123456789"
FLIPS = ("none", "rot180", "mirror", "vmirror")


@dataclass
class Lead:
    side: str  # "top" or "bottom" edge of the body
    x: float  # base position along the body, relative to the body centre (native px)
    width: float
    length: float
    angle: float = 0.0  # deviation from straight out (degrees)
    levels: Tuple[float, float, float, float] = (245.0, 95.0, 190.0, 130.0)
    flat: bool = False  # bottom side of a flipped device: plain pads, no bands
    streaks: Tuple[float, ...] = (1.0,) * 16  # brightness of strips along the lead (rolled metal)


@dataclass
class Scene:
    """All pose and look parameters of one image (no defect)."""

    size: Tuple[int, int]  # render canvas H, W
    style: BatchStyle
    pocket_dx: float
    pocket_dy: float
    cx: float  # body centre in native px (before the pose offset)
    cy: float
    dx: float  # pose offset (native px)
    dy: float
    angle: float  # degrees
    body_w: float
    body_h: float
    floor: float
    body_gray: float
    rim_gray: float
    wall_gray: float
    leads: List[Lead]
    text: str
    flip: str
    mark_gray: float
    tex_x: int
    tex_y: int
    tilt: Tuple[float, float]
    blur: float
    gain: float
    device: bool = True
    bottom_side: bool = False
    marking_erase: List[Tuple[float, float, float, float]] = field(default_factory=list)  # body-rel fractions
    mark_fade: float = 1.0
    look: str = "legacy"
    # real look only (see :func:`_calibrate`): texture offsets, pocket-wall glints, lead glare
    grain_x: int = 0
    grain_y: int = 0
    arcs: List[Tuple[float, float, float, float]] = field(default_factory=list)  # side, y, radius, level
    top_edge: float = 0.0
    glare: float = 0.0
    mark_width: float = 1.0
    outline: float = 1.0  # level of the moulded pocket's outline strokes (real look: faint)
    tape: float = 1.0  # contrast of the carrier tape's embossed texture
    walls: Tuple[float, float] = (0.0, 0.0)  # glint level of the left and right pocket walls (x rim_gray)
    wall_var: Tuple[float, ...] = (1.0,) * 12  # along each wall, 6 pieces per side
    shadow: float = 0.45  # depth of the device's soft contact shadow on the pocket floor
    shade: float = 1.0  # real look: level (x floor) of the shaded tape above the pocket's top edge
    # real look: specular edges of the recess under the bottom lead, per side (left, right):
    # (offset from the recess centre, hook, bulge, flare, level, second stroke, 5 piece levels), then
    # the bar under the lead tip and the recess floor's far edge: (offset, level) each
    recess: List[Tuple[float, ...]] = field(default_factory=list)
    recess_bars: Tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    @property
    def real(self) -> bool:
        return self.look == "real"

    @property
    def sx(self) -> float:
        return self.size[1] / NW

    @property
    def sy(self) -> float:
        return self.size[0] / NH

    @property
    def s(self) -> float:
        return min(self.sx, self.sy)

    def copy(self) -> "Scene":
        return copy.deepcopy(self)


# Where the lone bottom lead sits on a good device (native px from the body centre): a
# "shifted" bottom lead must land outside this range, or nothing tells it from a good one.
BOTTOM_LEAD_X = (-3.0, 4.0)


def sample_scene(rng: np.random.Generator, size: Tuple[int, int], style: BatchStyle, look: str = "legacy") -> Scene:
    """Draw a random good-device scene (pose jitter, marking, lead brightness, pocket offset)."""
    u = rng.uniform
    bw = style.body[0] * u(0.98, 1.02)
    bh = style.body[1] * u(0.97, 1.03)
    lw = style.lead_width * u(0.95, 1.05)
    llen = u(47.0, 53.0)
    pitch = bw * u(0.33, 0.345)

    def levels() -> Tuple[float, float, float, float]:
        k = u(0.85, 1.05)
        return (245.0 * k, u(60.0, 100.0) * k, u(125.0, 180.0) * k, u(105.0, 145.0) * k)

    def streaks() -> Tuple[float, ...]:
        return tuple(float(v) for v in u(0.9, 1.05, 16))

    leads = [
        Lead("top", -pitch, lw, llen, 0.0, levels(), streaks=streaks()),
        Lead("top", pitch, lw, llen, 0.0, levels(), streaks=streaks()),
        Lead("bottom", u(*BOTTOM_LEAD_X), lw, llen, 0.0, levels(), streaks=streaks()),
    ]
    n_code = int(rng.integers(2, 4))
    code = "".join(_CODE_CHARS[int(i)] for i in rng.integers(0, len(_CODE_CHARS), n_code))
    if rng.random() < 0.6:  # most Nexperia codes carry a "W"
        pos = int(rng.integers(0, n_code))
        code = code[:pos] + "W" + code[pos + 1:]
    date = "9" + str(int(rng.integers(5, 10)))
    text = code + " " + date if rng.random() < 0.5 else date + " " + code
    flip = FLIPS[int(rng.choice(4, p=[0.2, 0.3, 0.3, 0.2]))]
    sc = Scene(
        size=size, style=style,
        pocket_dx=u(-3.0, 3.0), pocket_dy=u(-3.0, 3.0),
        cx=NW / 2.0, cy=NH / 2.0 + 2.0,
        dx=style.shift[0] + u(-5.0, 5.0), dy=style.shift[1] + u(-4.0, 4.0),
        angle=float(rng.normal(0.0, 1.5)),
        body_w=bw, body_h=bh,
        floor=u(20.0, 26.0), body_gray=u(29.0, 36.0), rim_gray=u(34.0, 60.0), wall_gray=u(28.0, 40.0),
        leads=leads, text=text, flip=flip, mark_gray=style.mark_gray * u(0.9, 1.1),
        tex_x=int(rng.integers(0, 32)), tex_y=int(rng.integers(0, 32)),
        tilt=(style.illum_tilt[0] + u(-0.03, 0.03), style.illum_tilt[1] + u(-0.03, 0.03)),
        blur=style.blur * u(0.9, 1.1), gain=style.gain * u(0.96, 1.04), look=look,
    )
    if look == "real":  # drawn after every legacy draw, so the legacy look stays bit-for-bit
        _calibrate(sc, rng)
    return sc


def _calibrate(sc: Scene, rng: np.random.Generator) -> None:
    """Real-look scene values, calibrated on real Nexperia line images (docs/data.md, realism).

    Measured there (min-max stretched, 221 x 215): the moulded body is about twice as bright
    as the pocket floor (1.5-2.5x), the marking is a thick soft stroke well above the body,
    the leads are specular (saturated patches, streaks across the lead), the pocket walls
    show bright curved glints and a bright top tape edge rather than a full outline, and
    noise is grainy rather than white with weaker row banding.
    """
    u = rng.uniform
    sc.floor = u(17.0, 24.0)
    sc.wall_gray = u(20.0, 30.0)
    sc.rim_gray = u(35.0, 70.0)
    sc.body_gray = u(25.0, 35.0)
    # the marking's p95 in the body band is 76 on the references (body ~40): a dim laser mark
    sc.mark_gray = sc.body_gray + sc.style.mark_gray * u(0.5, 0.77)
    sc.mark_width = u(0.8, 1.2)  # single laser strokes: 1-2 px, 2-3 px after the optics
    sc.body_w *= u(1.02, 1.06)
    sc.body_h *= u(0.98, 1.04)
    sc.cy += u(5.0, 9.0)  # the device sits lower in the pocket than the legacy layout put it
    for ld in sc.leads:
        # from the body out: a bright bend, a dark band, a bright flat foot, a duller cut tip; the
        # whole lead dimmer or brighter with its tilt to the light. About 1 % of the references'
        # pixels saturate, in glare spots (below), while the lead bands' p95 is 168 (upper) and 146
        # (lower): bends at 255-340 overshot that by 15-17 gray levels
        k = u(0.825, 1.1)
        ld.levels = (235.0 * k, u(45.0, 85.0) * k, u(210.0, 250.0) * k, u(110.0, 150.0) * k)
        # rolled, plated metal: many uneven strips of glare along the lead, moderate: the deeper
        # glare that matched the references' saturated spots and Lite0 features hid glue and lead
        # defects from a model trained on them (docs/data.md, transfer)
        ld.streaks = tuple(float(v) for v in np.clip(rng.normal(1.0, 0.08, 24), 0.75, 1.2))
        ld.width *= u(1.08, 1.18)
    sc.grain_x, sc.grain_y = int(rng.integers(0, 48)), int(rng.integers(0, 48))
    n_arcs = int(rng.integers(2, 5))
    sc.arcs = [(float(rng.integers(0, 2)), u(0.25, 0.8), u(25.0, 60.0), u(0.5, 1.2)) for _ in range(n_arcs)]
    sc.top_edge = u(0.2, 0.9)
    sc.glare = u(0.12, 0.25)  # glare streaks; saturated spots in 0.3 % of a good frame (references 0.6-2.5 %)
    # softer optics, added in quadrature so an already blurry batch (3) is not blurred
    # past its small defects: batch 2 0.7 -> 0.86-1.06 px, batch 3 1.3 -> 1.39-1.53 px
    sc.blur = float(np.hypot(sc.style.blur, u(0.5, 0.8)))
    sc.outline = u(0.2, 0.4)  # real pockets show broken glints (above), not a full bright outline
    sc.tape = u(0.2, 0.5)
    # a broad glint over the lit wall's face (the ring's p95 is 63 on the references); a 3 px line
    # at 1.2-3x the rim level made the ring too bright and the frames easier to tell from real ones
    lit, dim = u(0.44, 1.08), u(0.08, 0.36)
    sc.walls = (lit, dim) if rng.random() < 0.6 else (dim, lit)
    sc.wall_var = tuple(float(v) for v in u(0.5, 1.2, 12))
    # lit from above (coaxial / ring light): only a faint contact shadow around the device
    sc.shadow = u(0.1, 0.2)
    sc.shade = u(0.2, 0.4)
    # the recess under the bottom lead shows on every reference, good or defective, as two bright
    # curved walls (often a double stroke, broken along its length) 37-52 native px either side of
    # the lead, a short bar just below the lead's tip and the far edge of the recess floor; models
    # trained without them took those glints for fibres (foreign material) on real good devices
    sc.recess = [(u(37.0, 52.0), u(2.0, 9.0), u(-3.0, 3.0), u(3.0, 10.0), u(0.7, 1.6), float(rng.random() < 0.6))
                 + tuple(float(v) for v in u(0.15, 1.2, 5)) for _ in range(2)]
    sc.recess_bars = (u(2.0, 6.0), u(0.4, 1.3), u(14.0, 26.0), u(0.2, 0.9))



_TEXTURES: Dict[Tuple[int, int], np.ndarray] = {}


def _texture(h: int, w: int) -> np.ndarray:
    """Embossed carrier-tape texture (brick-like rows), fixed per size, 32 px larger than the canvas."""
    key = (h, w)
    if key not in _TEXTURES:
        rng = np.random.default_rng(1234)
        th, tw = h + 32, w + 32
        t = np.zeros((th, tw), np.float32)
        row = 9
        for r in range(0, th, row):
            t[r:r + 1, :] -= 5.0
            off = (r // row) % 2 * 7
            for c in range(off, tw, 14):
                t[r:r + row, c:c + 1] -= 3.5
        t += cv2.GaussianBlur(rng.normal(0, 6.0, (th, tw)).astype(np.float32), (0, 0), 3.0)
        _TEXTURES[key] = cv2.GaussianBlur(t, (0, 0), 0.7)
    return _TEXTURES[key]


def _light(h: int, w: int) -> np.ndarray:
    """Smooth random lighting field (mean 1, 0.1..2.2), fixed per size, 64 px larger than the canvas."""
    key = (-h, -w)
    if key not in _TEXTURES:
        rng = np.random.default_rng(4321)
        f = cv2.GaussianBlur(rng.normal(0, 1, (h + 64, w + 64)).astype(np.float32), (0, 0), 14.0)
        f = 1.0 + 0.6 * f / max(1e-6, float(f.std()))
        _TEXTURES[key] = np.clip(f, 0.1, 2.2).astype(np.float32)
    return _TEXTURES[key]


def grain(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Real-look textures, fixed per size, 48 px larger than the canvas (unit std each).

    (isotropic grain about a pixel wide: moulding compound, tape, sensor; streaks along
    the rows, a few pixels long: the rolled, plated metal of the leads and their glare).
    """
    key = (h, -w - 1)
    if key not in _TEXTURES:
        rng = np.random.default_rng(2468)
        n = rng.standard_normal((h + 48, w + 48)).astype(np.float32)
        g = cv2.GaussianBlur(n, (0, 0), 0.8)
        st = cv2.GaussianBlur(n, (0, 0), sigmaX=8.0, sigmaY=1.1)
        _TEXTURES[key] = np.stack([g / float(g.std()), st / float(st.std())])
    t = _TEXTURES[key]
    return t[0], t[1]


def _crop(t: np.ndarray, sc: Scene) -> np.ndarray:
    h, w = sc.size
    return t[sc.grain_y:sc.grain_y + h, sc.grain_x:sc.grain_x + w]


def rounded_rect(img: np.ndarray, p0: Tuple[float, float], p1: Tuple[float, float], r: float,
                 color: float, thickness: int) -> None:
    """Outline of a rounded rectangle (anti-aliased) from corner ``p0`` to ``p1``."""
    x0, y0 = int(round(p0[0])), int(round(p0[1]))
    x1, y1 = int(round(p1[0])), int(round(p1[1]))
    r = int(round(max(1.0, min(r, (x1 - x0) / 2.0, (y1 - y0) / 2.0))))
    c, t, aa = float(color), max(1, thickness), cv2.LINE_AA
    cv2.line(img, (x0 + r, y0), (x1 - r, y0), c, t, aa)
    cv2.line(img, (x0 + r, y1), (x1 - r, y1), c, t, aa)
    cv2.line(img, (x0, y0 + r), (x0, y1 - r), c, t, aa)
    cv2.line(img, (x1, y0 + r), (x1, y1 - r), c, t, aa)
    for (cx, cy), a in (((x0 + r, y0 + r), 180), ((x1 - r, y0 + r), 270), ((x1 - r, y1 - r), 0), ((x0 + r, y1 - r), 90)):
        cv2.ellipse(img, (cx, cy), (r, r), a, 0, 90, c, t, aa)


def pocket_box(sc: Scene) -> Tuple[float, float, float, float]:
    """Outer pocket rim (x0, y0, x1, y1) in render px."""
    return (
        (3 + sc.pocket_dx) * sc.sx, (2 + sc.pocket_dy) * sc.sy,
        (NW - 3 + sc.pocket_dx) * sc.sx, (NH - 2 + sc.pocket_dy) * sc.sy,
    )


def draw_background(sc: Scene) -> np.ndarray:
    """Carrier tape floor, pocket walls with rounded corners, the recess under the bottom lead, the hole."""
    h, w = sc.size
    tex = _texture(h, w)[sc.tex_y:sc.tex_y + h, sc.tex_x:sc.tex_x + w]
    if sc.real:  # the embossed rows are faint on the line; the floor's grain is camera noise (synth.py)
        tex = tex * np.float32(sc.tape)
    img = tex + np.float32(sc.floor)
    x0, y0, x1, y1 = pocket_box(sc)
    s = sc.s
    inset = 10 * s
    walls = np.zeros((h, w), np.float32)
    # wall band between rim and floor edge: lighter, strongest on the left and right walls
    cv2.rectangle(walls, (int(x0), int(y0)), (int(x1), int(y1)), 1.0, -1)
    cv2.rectangle(walls, (int(x0 + inset), int(y0 + inset)), (int(x1 - inset), int(y1 - inset)), 0.0, -1)
    img += walls * np.float32(sc.wall_gray - sc.floor) * 0.5
    rim = np.zeros((h, w), np.float32)  # edges of the moulded pocket, lit unevenly
    rounded_rect(rim, (x0, y0), (x1, y1), 24 * s, sc.rim_gray, max(1, int(round(2 * s))))
    rounded_rect(rim, (x0 + inset, y0 + inset), (x1 - inset, y1 - inset), 18 * s, sc.rim_gray * 0.7, 1)
    for xs in (x0 + 4 * s, x1 - 4 * s):  # specular streaks on the side walls
        cv2.line(rim, (int(xs), int(y0 + 30 * s)), (int(xs), int(y1 - 40 * s)), sc.rim_gray * 1.3, 1, cv2.LINE_AA)
    # inner step of the pocket around the device
    bx, by = (sc.cx + sc.pocket_dx) * sc.sx, (sc.cy + sc.pocket_dy) * sc.sy
    ix, iy = (sc.body_w / 2 + 22) * sc.sx, (sc.body_h / 2 + 62) * sc.sy
    rounded_rect(rim, (bx - ix, by - iy), (bx + ix, by + iy), 14 * s, sc.rim_gray * 0.55, 1)
    if not sc.real:  # recess around the bottom lead: a U with rounded bottom (real look: _real_recess)
        top, bot = (sc.cy + sc.body_h / 2 + 12) * sc.sy, y1 - 14 * s
        half = 34 * sc.sx
        rc = int(round(14 * s))
        for xs in (bx - half, bx + half):
            cv2.line(rim, (int(xs), int(top)), (int(xs), int(bot - rc)), sc.rim_gray * 0.8, 1, cv2.LINE_AA)
        cv2.ellipse(rim, (int(bx - half + rc), int(bot - rc)), (rc, rc), 90, 0, 90, sc.rim_gray * 0.8, 1, cv2.LINE_AA)
        cv2.ellipse(rim, (int(bx + half - rc), int(bot - rc)), (rc, rc), 0, 0, 90, sc.rim_gray * 0.8, 1, cv2.LINE_AA)
        cv2.line(rim, (int(bx - half + rc), int(bot)), (int(bx + half - rc), int(bot)), sc.rim_gray * 0.8, 1,
                 cv2.LINE_AA)
    img += rim * _light(h, w)[2 * sc.tex_y:2 * sc.tex_y + h, 2 * sc.tex_x:2 * sc.tex_x + w] * np.float32(sc.outline)
    # punched hole in the pocket floor (hidden under the device)
    hc = (int(round((sc.cx + sc.pocket_dx) * sc.sx)), int(round((sc.cy + sc.pocket_dy) * sc.sy)))
    cv2.circle(img, hc, int(round(13 * s)), 6.0, -1, cv2.LINE_AA)
    cv2.circle(img, hc, int(round(13 * s)), sc.rim_gray * 0.6, 1, cv2.LINE_AA)
    if sc.real:
        _real_pocket(img, sc)
    return img


def _real_pocket(img: np.ndarray, sc: Scene) -> None:
    """Bright top tape edge and curved glints on the side walls; grainy floor."""
    h, w = sc.size
    x0, y0, x1, y1 = pocket_box(sc)
    s = sc.s
    glints = np.zeros((h, w), np.float32)
    t = max(1, int(round(2.2 * s)))
    cv2.line(glints, (int(x0 + 20 * s), int(y0 + 3 * s)), (int(x1 - 20 * s), int(y0 + 3 * s)),
             sc.rim_gray * sc.top_edge, t, cv2.LINE_AA)
    for side, fy, r, lv in sc.arcs:
        r *= s
        cy = y0 + fy * (y1 - y0)
        if side < 0.5:
            c, a0, a1 = (int(x0 + 7 * s + r), int(cy)), 150, 210
        else:
            c, a0, a1 = (int(x1 - 7 * s - r), int(cy)), -30, 30
        cv2.ellipse(glints, c, (int(r), int(1.8 * r)), 0, a0, a1, sc.rim_gray * lv, max(1, int(round(1.5 * s))),
                    cv2.LINE_AA)
    # specular side walls at the frame's edges: the sloped wall face is lit as a broad band along
    # the frame's edge that curves into the bottom corner; which side is lit varies
    r = int(round(24 * s))
    for k, (xw, lv) in enumerate(((x0 + 2 * s, sc.walls[0]), (x1 - 2 * s, sc.walls[1]))):
        n = 6
        ys = np.linspace(y0 + 20 * s, y1 - r, n + 1)
        for j in range(n):  # uneven along the wall
            v = sc.rim_gray * lv * sc.wall_var[k * n + j]
            cv2.line(glints, (int(xw), int(ys[j])), (int(xw), int(ys[j + 1])), v, max(1, int(round(14 * s))))
        c = (int(xw + r) if k == 0 else int(xw - r), int(y1 - r))
        cv2.ellipse(glints, c, (r, r), 0, 90 if k == 0 else 0, 180 if k == 0 else 90, sc.rim_gray * lv * 0.7,
                    max(1, int(round(2 * s))))
    _real_recess(glints, sc)
    img += cv2.GaussianBlur(glints, (0, 0), 0.6 * s)
    # in shade: the tape beyond the pocket's top edge holds the darkest pixels of most reference
    # frames; without it the min-max stretch left the floor 5-9 gray levels too dark
    k = np.float32(sc.shade)
    yt = int(round(y0 + 1.5 * s))
    if yt > 0:
        img[:yt] *= k


def _real_recess(glints: np.ndarray, sc: Scene) -> None:
    """Specular edges of the recess under the bottom lead (real look), drawn into ``glints``.

    Positions follow the pocket, not the device: a short or shifted lead leaves them where they are.
    """
    if len(sc.recess) != 2:
        return
    s, sx, sy = sc.s, sc.sx, sc.sy
    bx = sc.cx + sc.pocket_dx
    tip = sc.cy + sc.pocket_dy + sc.body_h / 2 + 50.0  # where a good bottom lead ends (native px)
    t = np.linspace(0.0, 1.0, 16)
    for side, (off, hook, bulge, flare, level, double, *pieces) in zip((-1.0, 1.0), sc.recess):
        # from below the body (hooked in towards the lead) down past the lead's tip, flaring out at the bottom
        xs = bx + side * (off - hook * (1.0 - t) ** 6 + bulge * np.sin(np.pi * t) + flare * t ** 6)
        ys = tip - 40.0 + 52.0 * t
        for k in range(1 + int(double)):
            pts = np.stack([(xs + side * 3.0 * k) * sx, ys * sy], 1)
            for j, lv in enumerate(pieces):  # broken along its length
                seg = np.round(pts[3 * j:3 * j + 4] * 16).astype(np.int32)
                cv2.polylines(glints, [seg], False, sc.rim_gray * level * lv * (0.7 if k else 1.0),
                              max(1, int(round(1.2 * s))), cv2.LINE_AA, 4)
    bar, bar_lv, floor_y, floor_lv = sc.recess_bars
    half = 0.6 * sc.leads[-1].width
    for y, hw, lv in ((tip + bar, half, bar_lv), (tip + floor_y, sc.recess[0][0] * 0.9, floor_lv)):
        cv2.line(glints, (int(round((bx - hw) * sx)), int(round(y * sy))), (int(round((bx + hw) * sx)), int(round(y * sy))),
                 sc.rim_gray * lv, max(1, int(round(1.5 * s))), cv2.LINE_AA)


def body_rect(sc: Scene) -> Tuple[float, float, float, float]:
    """Unrotated body rectangle (x0, y0, x1, y1) in render px."""
    return (
        (sc.cx - sc.body_w / 2) * sc.sx, (sc.cy - sc.body_h / 2) * sc.sy,
        (sc.cx + sc.body_w / 2) * sc.sx, (sc.cy + sc.body_h / 2) * sc.sy,
    )


def lead_quad(sc: Scene, ld: Lead, f0: float, f1: float, under: float = 6.0) -> np.ndarray:
    """Corners (4x2 render px) of the part of a lead from fraction ``f0`` to ``f1`` of its length."""
    sign = -1.0 if ld.side == "top" else 1.0
    a = np.deg2rad(ld.angle)
    dx, dy = np.sin(a), sign * np.cos(a)  # outward direction
    nx, ny = np.cos(a) * ld.width / 2, -sign * np.sin(a) * ld.width / 2  # half-width across
    bx, by = sc.cx + ld.x, sc.cy + sign * (sc.body_h / 2 - under)
    t0, t1 = (ld.length + under) * f0, (ld.length + under) * f1
    ax, ay, cx, cy = bx + dx * t0, by + dy * t0, bx + dx * t1, by + dy * t1
    q = [[ax - nx, ay - ny], [ax + nx, ay + ny], [cx + nx, cy + ny], [cx - nx, cy - ny]]
    return np.array(q) * np.array([sc.sx, sc.sy])


def _fill(img: np.ndarray, quad: np.ndarray, value: float) -> None:
    cv2.fillConvexPoly(img, np.round(quad * 16).astype(np.int32), float(value), cv2.LINE_AA, 4)


def draw_lead(dev: np.ndarray, alpha: np.ndarray, sc: Scene, ld: Lead) -> None:
    """One lead: bright band at the body, a dark band, a second band, a dull tip; streaky metal."""
    q = lead_quad(sc, ld, 0.0, 1.0)
    _fill(alpha, q, 1.0)
    if ld.flat:
        lv = ld.levels[0] if sc.real else ld.levels[2]  # real look: the plated pads glare like the bends
        _fill(dev, q, lv * 0.8)
        _fill(dev, lead_quad(sc, ld, 0.15, 0.85), lv * 0.65)
        return
    if sc.real:
        _real_lead_bands(dev, q, ld)
        return
    bands = tuple(zip((0.48, 0.6, 0.94, 1.01), ld.levels))
    (n0x, n0y), (n1x, n1y), (f1x, f1y), (f0x, f0y) = (q * 16).tolist()  # 1/16 px fixed point
    n = len(ld.streaks)
    for i, k in enumerate(ld.streaks):
        a, b = i / n, (i + 1) / n
        v = next(lv for end, lv in bands if (a + b) / 2 < end)
        pts = [(n0x + (f0x - n0x) * a, n0y + (f0y - n0y) * a), (n1x + (f1x - n1x) * a, n1y + (f1y - n1y) * a),
               (n1x + (f1x - n1x) * b, n1y + (f1y - n1y) * b), (n0x + (f0x - n0x) * b, n0y + (f0y - n0y) * b)]
        cv2.fillConvexPoly(dev, np.array(pts, np.int32), float(v * k), cv2.LINE_AA, 4)


REAL_LEAD_BANDS = (0.42, 0.6, 0.93, 1.0)  # ends of bend, dark band, foot, tip edge (fraction of the length)


def _real_lead_bands(dev: np.ndarray, q: np.ndarray, ld: Lead) -> None:
    """Real look lead: the four bands at their measured lengths, strips of uneven glare along it."""
    n0, n1, f1, f0 = q * 16  # near edge n0 -> n1, far edge f0 -> f1 (1/16 px fixed point)
    n = len(ld.streaks)
    cuts = np.array(sorted(set([i / n for i in range(n + 1)] + list(REAL_LEAD_BANDS[:-1]))))
    side_a = n0 + (f0 - n0) * cuts[:, None]  # (k + 1) x 2 points along each side of the lead
    side_b = n1 + (f1 - n1) * cuts[:, None]
    side_a, side_b = np.round(side_a).astype(np.int32), np.round(side_b).astype(np.int32)
    mids = (cuts[:-1] + cuts[1:]) / 2
    ends = np.array(REAL_LEAD_BANDS)
    level = np.array(ld.levels)[np.minimum(np.searchsorted(ends, mids, side="right"), 3)]
    level = level * np.array(ld.streaks)[np.minimum((mids * n).astype(int), n - 1)]
    for i, v in enumerate(level.tolist()):
        pts = np.stack([side_a[i], side_b[i], side_b[i + 1], side_a[i + 1]])
        cv2.fillConvexPoly(dev, pts, v, cv2.LINE_AA, 4)


def marking_layer(sc: Scene, hb: int, wb: int) -> np.ndarray:
    """Marking text as a 0..1 mask the size of the body: spaced, condensed laser glyphs, flipped as the scene says."""
    font = getattr(cv2, sc.style.font)
    th = max(1, int(round((1.1 if sc.real else 1.8) * sc.s * sc.mark_width)))
    (_, ch), _ = cv2.getTextSize("W", font, 1.0, th)
    mh = 0.72 if sc.real else 0.58  # glyph height / body height (real: measured ~1.2x the legacy glyphs)
    scale = mh * hb / ch
    gap = int(round(0.07 * hb))
    widths = [int(round(0.22 * hb)) if c == " " else cv2.getTextSize(c, font, scale, th)[0][0] for c in sc.text]
    tw = sum(widths) + gap * (len(widths) - 1) + 2 * th + 2
    line = np.zeros((hb, tw), np.uint8)  # OpenCV 5 draws text on 8-bit images only
    base_y = int(round((hb + mh * hb) / 2))
    x = th + 1
    for c, cw in zip(sc.text, widths):
        if c != " ":
            if sc.real:  # single laser strokes, 2-3 px wide on the references
                cv2.putText(line, c, (x, base_y), font, scale, 255, th, cv2.LINE_AA)
            elif sc.style.marking == "outline":  # hollow laser strokes: bright edges, dimmer core
                cv2.putText(line, c, (x, base_y), font, scale, 255, th + 1, cv2.LINE_AA)
                cv2.putText(line, c, (x, base_y), font, scale, 110, max(1, th - 1), cv2.LINE_AA)
            else:
                cv2.putText(line, c, (x, base_y), font, scale, 255, th, cv2.LINE_AA)
        x += cw + gap
    fit = min(tw, int(0.84 * wb))
    if fit != tw:
        line = cv2.resize(line, (fit, hb), interpolation=cv2.INTER_AREA)
    m = np.zeros((hb, wb), np.uint8)
    x0 = (wb - fit) // 2
    m[:, x0:x0 + fit] = line
    if sc.flip == "rot180":
        m = m[::-1, ::-1]
    elif sc.flip == "mirror":
        m = m[:, ::-1]
    elif sc.flip == "vmirror":
        m = m[::-1, :]
    m = m.astype(np.float32) * np.float32(1.0 / 255.0)
    for fx0, fy0, fx1, fy1 in sc.marking_erase:
        m[int(fy0 * hb):int(np.ceil(fy1 * hb)), int(fx0 * wb):int(np.ceil(fx1 * wb))] = 0.0
    return m * np.float32(sc.mark_fade)


def draw_device(sc: Scene) -> Tuple[np.ndarray, np.ndarray]:
    """Unrotated device (leads, body, marking) and its alpha mask, both float32 H x W."""
    h, w = sc.size
    dev = np.zeros((h, w), np.float32)
    alpha = np.zeros((h, w), np.float32)
    for ld in sc.leads:
        draw_lead(dev, alpha, sc, ld)
    if sc.real:  # specular metal: streaky glare across each lead
        dev *= 1.0 + alpha * _crop(grain(h, w)[1], sc) * np.float32(sc.glare)
    x0, y0, x1, y1 = body_rect(sc)
    quad = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    _fill(alpha, quad, 1.0)
    # lighter moulded edge; faint on the references (a +34 edge line doubled the row/column anisotropy)
    _fill(dev, quad, sc.body_gray + (15.0 if sc.real else 24.0))
    e = (2.2 if sc.real else 1.6) * sc.s
    _fill(dev, quad + np.array([[e, e], [-e, e], [-e, -e], [e, -e]]), sc.body_gray)
    if sc.bottom_side:
        for fx in (0.3, 0.7):  # ejector-pin marks of the mould
            c = (int(round(x0 + fx * (x1 - x0))), int(round((y0 + y1) / 2)))
            cv2.circle(dev, c, int(round(9 * sc.s)), sc.body_gray - 8.0, -1, cv2.LINE_AA)
            cv2.circle(dev, c, int(round(9 * sc.s)), sc.body_gray + 10.0, 1, cv2.LINE_AA)
        return dev, alpha
    ix0, iy0, ix1, iy1 = int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))
    if ix1 > ix0 and iy1 > iy0:
        m = marking_layer(sc, iy1 - iy0, ix1 - ix0)
        if sc.real:  # laser marking: soft edges
            m = cv2.GaussianBlur(m, (0, 0), 0.6 * sc.s)
        dev[iy0:iy1, ix0:ix1] += m * np.float32(sc.mark_gray - sc.body_gray)
    if sc.real:  # moulding-compound grain
        body = np.zeros((h, w), np.float32)
        body[max(0, iy0):iy1, max(0, ix0):ix1] = 1.0
        dev += body * _crop(grain(h, w)[0], sc) * np.float32(3.0)
    return dev, alpha


def pose_matrix(sc: Scene) -> np.ndarray:
    """2x3 affine: rotate about the body centre, then shift by the pose offset (render px)."""
    c = (sc.cx * sc.sx, sc.cy * sc.sy)
    m = cv2.getRotationMatrix2D(c, sc.angle, 1.0)
    m[0, 2] += (sc.dx + sc.pocket_dx) * sc.sx
    m[1, 2] += (sc.dy + sc.pocket_dy) * sc.sy
    return m


def composite(bg: np.ndarray, dev: np.ndarray, alpha: np.ndarray, sc: Scene,
              m: Optional[np.ndarray] = None) -> np.ndarray:
    """Place the device on the background with its pose, plus a soft contact shadow."""
    h, w = sc.size
    m = pose_matrix(sc) if m is None else m
    # warp only the region the device can reach (body, leads, glue blobs, pose offset)
    x0, y0, x1, y1 = body_rect(sc)
    mx, my = 70 * sc.sx, 75 * sc.sy
    corners = np.array([[x0 - mx, y0 - my, 1.0], [x1 + mx, y0 - my, 1.0], [x1 + mx, y1 + my, 1.0], [x0 - mx, y1 + my, 1.0]])
    pts = corners @ m.T
    rx0, ry0 = max(0, int(pts[:, 0].min())), max(0, int(pts[:, 1].min()))
    rx1, ry1 = min(w, int(np.ceil(pts[:, 0].max()))), min(h, int(np.ceil(pts[:, 1].max())))
    m2 = m.copy()
    m2[0, 2] -= rx0
    m2[1, 2] -= ry0
    dev_w = np.zeros((h, w), np.float32)
    a_w = np.zeros((h, w), np.float32)
    roi = (rx1 - rx0, ry1 - ry0)
    # two single-channel warps are ~3x faster than one two-channel warp in OpenCV
    dev_w[ry0:ry1, rx0:rx1] = cv2.warpAffine(dev, m2, roi, flags=cv2.INTER_LINEAR)
    a_w[ry0:ry1, rx0:rx1] = cv2.warpAffine(alpha, m2, roi, flags=cv2.INTER_LINEAR)
    small = cv2.resize(a_w, (w // 4, h // 4), interpolation=cv2.INTER_LINEAR)  # blur at 1/4 size: cheap
    shadow = cv2.resize(cv2.GaussianBlur(small, (0, 0), sc.s), (w, h), interpolation=cv2.INTER_LINEAR)
    out = bg * (1.0 - sc.shadow * shadow)
    return out + (dev_w - out) * a_w
