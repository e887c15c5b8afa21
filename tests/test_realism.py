"""The calibrated ("real") synth look and the realism report (`nexedge synth --realism`)."""

import json
import os

import cv2
import numpy as np
import pytest

from nexedge.cli import main
from nexedge.data.realism import kid, load_references, measure, noise_spectrum, region_stats, view
from nexedge.data.synth import render_image, render_pair


def test_looks_are_deterministic_and_differ():
    a, ma = render_image("chipping", (3, 1), look="real")
    b, mb = render_image("chipping", (3, 1), look="real")
    c, _ = render_image("chipping", (3, 1), look="legacy")
    assert np.array_equal(a, b) and ma == mb
    assert not np.array_equal(a, c)
    assert ma["marking"] == render_image("chipping", (3, 1), look="legacy")[1]["marking"]  # same scene draws
    with pytest.raises(ValueError, match="'glossy'"):
        render_image("good", 1, look="glossy")


def _body_floor(look):
    """(body median / pocket floor median, share of saturated pixels) over a few good images."""
    # regions as in the references' measurement: body middle, floor between the top leads
    ratios, sat = [], []
    for i in range(6):
        img, _ = render_image("good", (8, i), look=look)
        body = np.median(img[125:150, 100:175])  # the body's middle
        floor = np.median(img[15:40, 95:180])  # pocket floor above the body, between the top leads
        ratios.append(body / max(floor, 1.0))
        sat.append(np.mean(view(img, (221, 215)) >= 250))  # the references' view: 0.6-2.5 % saturated
    return float(np.mean(ratios)), float(np.mean(sat))


def test_real_look_has_the_measured_contrasts():
    # The 9 real references measured the same way: body / floor 1.5-2.5 (one scratch image 5.4);
    # specular leads that saturate in places (references: 0.6-2.5 % of the pixels in this view).
    r_real, sat_real = _body_floor("real")
    assert 1.5 < r_real < 2.6
    # The deep-glare look reached 0.6 %; the moderate glare that lets a model see glue and lead
    # defects (docs/data.md, transfer) saturates 0.3 %, still 3x legacy's 0.1 %
    assert sat_real > 0.002


def test_real_look_shades_the_tape_above_the_pocket():
    # Most references hold their darkest pixels in the shaded tape strip above the pocket's top
    # edge; without it the min-max stretched floor and body came out 5-9 gray levels too dark.
    def top_over_floor(look):
        r = []
        for i in range(8):
            img, _ = render_image("good", (14, i), look=look)
            r.append(np.median(img[0, 40:235]) / max(float(np.median(img[15:40, 95:180])), 1.0))
        return float(np.median(r))

    assert top_over_floor("real") < 0.6 < top_over_floor("legacy")


def test_real_look_noise_is_grainy_not_banded():
    spec = {lk: [noise_spectrum(render_image("good", (9, i), look=lk)[0]) for i in range(4)] for lk in ("real", "legacy")}
    aniso = {lk: np.median([a for _, a in v]) for lk, v in spec.items()}
    assert aniso["real"] < 0.7 * aniso["legacy"]  # real references: about 1.25 (legacy 2.2-2.7)


def _fine_noise_by_level(img):
    """Std of the 3x3-median residual on dark (< 25) and lit (80..250) surfaces, in the references' view."""
    v = view(img, (221, 215))
    f = v.astype(np.float32)
    r = f - cv2.medianBlur(v, 3).astype(np.float32)
    m = cv2.blur(f, (5, 5))
    return float(r[m < 25].std()), float(r[(m >= 80) & (m < 250)].std())


def test_real_look_noise_grows_with_the_level_like_the_references():
    # The references: residual std 1.8-2.2 on the dark floor, 12-14 on lit metal (ratio about 6);
    # a read + shot noise sensor gives a ratio under 3 (old real look 2.9, legacy 2.4).
    dark, lit = np.mean([_fine_noise_by_level(render_image("good", (12, i), look="real")[0]) for i in range(4)], axis=0)
    assert dark < 2.6 and lit / dark > 3.8, (dark, lit)


def _floor_correlation(img, lag=3):
    """Correlation of the high-passed pocket floor with itself ``lag`` px along the rows (references' view)."""
    v = view(img, (221, 215)).astype(np.float32)
    lm = cv2.blur(v, (7, 7))
    g = cv2.morphologyEx(v, cv2.MORPH_GRADIENT, np.ones((9, 9), np.uint8))
    m = (lm < np.percentile(lm, 45)) & (g < np.percentile(g, 50))  # dark and flat: the floor
    hp = v - cv2.blur(v, (15, 15))
    hp -= hp[m].mean()
    a, b = hp[:, :-lag], hp[:, lag:]
    mm = m[:, :-lag] & m[:, lag:]
    return float((a[mm] * b[mm]).mean() / np.sqrt((a[mm] ** 2).mean() * (b[mm] ** 2).mean()))


def test_real_look_floor_texture_is_spatially_correlated():
    # The references' floor: 0.30 at 3 px along the rows (0.22 at 8 px); white noise gives ~0
    # (the old real look: 0.04).
    c = np.mean([_floor_correlation(render_image("good", (13, i), look="real")[0]) for i in range(4)])
    assert c > 0.22, c


def _bright_spots(img):
    """Isolated bright spots (1-3 px, over 25 gray levels above the 5x5 median) on dark ground, references' view."""
    v = view(img, (221, 215))
    med = cv2.medianBlur(v, 5).astype(np.int32)
    m = ((v.astype(np.int32) - med > 25) & (med < 50)).astype(np.uint8)
    n, _, st, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    return int((st[1:, cv2.CC_STAT_AREA] <= 3).sum())


def test_real_look_has_the_references_isolated_bright_spots():
    # The references: 13.8 such spots per frame (hot pixels, dust glints); read noise and speckle
    # alone gave the real look 7.8, so a model took every speck on a real frame for a particle.
    n = np.mean([_bright_spots(render_image("good", (15, i), look="real")[0]) for i in range(10)])
    assert 11 <= n <= 17, n


def test_real_look_recess_walls_glint_and_stay_with_the_pocket():
    # Every reference shows the recess under the bottom lead as bright curved walls either side of
    # the lead; they belong to the tape, so a short lead does not move them.
    from nexedge.data import scene
    from nexedge.data.spec import STYLES

    rng = np.random.default_rng(3)
    sc = scene.sample_scene(rng, (267, 275), STYLES[2], "real")
    sc.recess = [(45.0, 5.0, 0.0, 5.0, 1.2, 1.0) + (1.0,) * 5, (45.0, 5.0, 0.0, 5.0, 1.2, 0.0) + (1.0,) * 5]
    with_walls = scene.draw_background(sc)
    flat = sc.copy()
    flat.recess = [(45.0, 5.0, 0.0, 5.0, 0.0, 0.0) + (0.0,) * 5] * 2
    flat.recess_bars = (4.0, 0.0, 20.0, 0.0)
    diff = with_walls - scene.draw_background(flat)
    bx = (sc.cx + sc.pocket_dx) * sc.sx
    tip = (sc.cy + sc.pocket_dy + sc.body_h / 2 + 50.0) * sc.sy
    rows = slice(int(tip - 30 * sc.sy), int(tip))
    for side in (-1, 1):  # a bright wall about 45 px out on each side, over 20 levels at its peak
        xs = slice(int(bx + side * 45 * sc.sx) - 4, int(bx + side * 45 * sc.sx) + 5)
        assert diff[rows, xs].max(axis=1).mean() > 20
    assert np.abs(diff[rows, int(bx) - 20:int(bx) + 20]).max() < 1  # nothing drawn between them
    short = sc.copy()
    short.leads[2].length *= 0.5
    assert np.array_equal(scene.draw_background(short), with_walls)


def _edge_sharpness(cls, look):
    """Median over images of (90th percentile gradient on the defect) / (defect peak): lower = softer edges."""
    out = []
    for i in range(6):
        img, clean, _ = render_pair(cls, (5, i), severity=0.8, look=look)
        d = cv2.GaussianBlur(np.abs(img.astype(np.float32) - clean.astype(np.float32)), (0, 0), 0.5)
        g = np.hypot(cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3)) / 8
        out.append(np.percentile(g[d > 0.25 * d.max()], 90) / max(float(d.max()), 1.0))
    return float(np.median(out))


def test_real_look_particles_have_soft_edges():
    # foreign material is drawn after the optics: the old real look left it as sharp as legacy's
    # hard polygons (0.29 vs 0.35); real dust and glue are out of focus and ragged
    assert _edge_sharpness("foreign_material", "real") < 0.26 < _edge_sharpness("foreign_material", "legacy")


def test_legacy_look_is_unchanged_per_seed():
    # Every published demo and trainer number was measured on the legacy look: its pixels must
    # not move when the real look is tuned. The hash covers every class of batches 1-3 (image,
    # clean twin, metadata, a downscaled render). If it changes after an OpenCV or NumPy upgrade
    # rather than a code change, re-measure the demo before re-pinning it.
    # Re-pinned 2026-12-02 after a shifted bottom lead was moved out of the good range (demo re-measured),
    # and again after defect polygons were made to enclose their centres (demo re-measured, seeds 0 and 1),
    # and for opencv-python-headless 5.1.0.95 (2.4 % of pixels moved against 5.0.0.93; the demo and the
    # line-tail benchmark re-measured with it, seeds 0 and 1; requirements-dev.txt pins that build).
    import hashlib

    from nexedge.data.spec import batch_classes

    h = hashlib.sha256()
    for b in (1, 2, 3):
        for i, c in enumerate(batch_classes(b)):
            img, clean, meta = render_pair(c, (b, i), batch=b, look="legacy")
            h.update(img.tobytes())
            h.update(clean.tobytes())
            h.update(repr(sorted(meta.items())).encode())
            h.update(render_image(c, (b, i, 7), batch=b, size=(96, 80), look="legacy")[0].tobytes())
    assert h.hexdigest() == "016a48d797fc61e8e64ab89f12d217e650b9fc26497fb4cc3a82b4d795331144"


@pytest.mark.parametrize("cls", ["chipping", "lead_glue", "scratch", "foreign_material", "lead_defect"])
def test_real_look_defects_stay_visible(cls):
    for k, sev in enumerate((0.03, 0.5, 1.0)):
        img, clean, meta = render_pair(cls, (31, k), severity=sev, look="real")
        x0, y0, x1, y1 = meta["bbox"]
        diff = np.abs(img.astype(int) - clean.astype(int))
        assert diff[y0:y1, x0:x1].max() >= (20 if sev >= 0.5 else 8), (cls, sev)


def _refs(tmp_path, layout):
    for i, (cls, look) in enumerate([("good", "real"), ("chipping", "real"), ("good", "real"), ("scratch", "real")]):
        img, _ = render_image(cls, (77, i), look=look, size=(221, 215))
        if layout == "index":
            cv2.imwrite(str(tmp_path / f"{cls}__{i}.png"), img)
        else:
            os.makedirs(tmp_path / cls, exist_ok=True)
            cv2.imwrite(str(tmp_path / cls / f"{i}.png"), img)
    if layout == "index":
        rows = "file,label\n" + "".join(f"{c}__{i}.png,{c}\n" for i, c in enumerate(["good", "chipping", "good", "scratch"]))
        (tmp_path / "index.csv").write_text(rows)
        cv2.imwrite(str(tmp_path / "montage.png"), np.zeros((30, 30), np.uint8))  # not in index.csv: left out


@pytest.mark.parametrize("layout", ["index", "folders"])
def test_load_references_layouts(tmp_path, layout):
    _refs(tmp_path, layout)
    refs = load_references(str(tmp_path))
    assert sorted(lab for _, lab, _ in refs) == ["chipping", "good", "good", "scratch"]
    assert all(im.shape == (215, 221) for _, _, im in refs)


def test_load_references_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_references(str(tmp_path / "nope"))
    (tmp_path / "index.csv").write_text("file,label\nmissing.png,good\n")
    with pytest.raises(ValueError, match="missing.png"):
        load_references(str(tmp_path))


def test_region_and_spectrum_figures_see_a_difference():
    a = view(render_image("good", 1, look="legacy")[0], (221, 215))
    b = view(cv2.GaussianBlur(a, (0, 0), 2.0), (221, 215))
    assert view(a, (221, 215)).max() == 255 and view(a, (221, 215)).min() == 0
    sa, sb = noise_spectrum(a), noise_spectrum(b)
    assert np.isclose(sa[0].sum(), 1.0) and not np.allclose(sa[0], sb[0], atol=0.01)
    st = region_stats(a)
    assert set(st) == {"ring", "upper", "middle", "lower"} and st["upper"]["p95"] > st["upper"]["p50"]


def test_kid_is_zero_in_expectation_and_grows_with_shift():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    assert abs(kid(x, y)) < 0.05 < kid(x, y + 1.0)


def test_realism_report_ranks_the_closer_look(tmp_path, capsys):
    # References rendered in the real look: the real look must come out closer than legacy.
    os.makedirs(tmp_path / "refs")
    _refs(tmp_path / "refs", "folders")
    res = measure(load_references(str(tmp_path / "refs")), ["legacy", "real"], n=12, repeats=2)
    L = res["looks"]
    assert L["real"]["kid"] < L["legacy"]["kid"]
    assert L["real"]["region_gap_mean"] < L["legacy"]["region_gap_mean"]
    assert L["real"]["domain_accuracy"] <= L["legacy"]["domain_accuracy"]
    out = tmp_path / "r.json"
    assert main(["synth", "--realism", str(tmp_path / "refs"), "--realism-looks", "legacy,real", "--realism-n", "8",
                 "--realism-json", str(out), "--realism-figure", str(tmp_path / "side.png")]) == 0
    text = capsys.readouterr().out
    assert "KID x1000" in text and "domain clf" in text and "legacy" in text
    assert set(json.loads(out.read_text())["looks"]) == {"legacy", "real"}
    fig = cv2.imread(str(tmp_path / "side.png"), cv2.IMREAD_GRAYSCALE)
    assert fig.shape[0] == 22 + 3 * (215 + 3)  # header, references, one row per look


@pytest.mark.parametrize("argv, words", [
    (["synth", "--realism", "NOPE"], ["nope'", "does not exist"]),
    (["synth", "--realism", "REFS", "--realism-looks", "shiny"], ["'shiny'", "legacy"]),
    (["synth", "OUT", "--look", "shiny"], []),  # argparse rejects it (exit 2)
])
def test_realism_cli_errors(tmp_path, capsys, argv, words):
    _refs(tmp_path, "folders")
    argv = [str(tmp_path / "nope") if a == "NOPE" else str(tmp_path) if a == "REFS" else
            str(tmp_path / "o") if a == "OUT" else a for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc != 0
    err = capsys.readouterr().err
    for w in words:
        assert w in err
