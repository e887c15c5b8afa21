"""Mixed aspect ratios are named at split time, the resize mode is advised from them, and train
warns when the chosen mode is a bad fit."""

import json

import cv2
import numpy as np
import pytest

from nexedge.cli import main
from nexedge.data import aspect

# the magnetic tiles' spread: 120x280 to 600x240 (width x height)
MIXED = [280 / 120, 600 / 240, 0.43, 0.8, 0.85, 0.9, 1.0, 1.3, 2.4, 0.5]


def test_summary_names_the_range_with_the_extreme_images():
    s = aspect.summarize([(120, 280), (600, 240), (200, 200), (100, 100)], ["a", "b", "a", "b"])
    assert s["min"] == pytest.approx(0.429, abs=1e-3) and s["max"] == 2.5
    assert s["narrowest"] == [120, 280] and s["widest"] == [600, 240]
    assert s["class_median"] == {"a": pytest.approx(0.714, abs=1e-3), "b": 1.75}
    assert "0.43 to 2.50" in aspect.describe(s) and "narrowest 120x280" in aspect.describe(s)
    assert "classes differ in aspect ratio" in aspect.class_note(s)
    assert aspect.class_note(aspect.summarize([(100, 100), (110, 100)], ["a", "b"])) is None


def test_mixed_aspect_ratios_advise_stretch_and_short_is_warned():
    adv = aspect.advise(MIXED, (72, 72))
    assert adv["mode"] == "stretch" and "mixed aspect ratios" in adv["reason"] and "short would cut" in adv["reason"]
    w = aspect.fit_warning(MIXED, "short", (72, 72))
    assert w and "--resize-mode short cuts more than 20 %" in w and "off 60 %" in w  # 6 of the 10 lose > 20 %
    assert aspect.fit_warning(MIXED, "stretch", (72, 72)) is None


def test_one_shared_aspect_ratio():
    square = [1.0, 1.02, 0.98] * 5
    assert aspect.advise(square)["mode"] == "stretch" and "share the input's" in aspect.advise(square)["reason"]
    assert aspect.fit_warning(square, "short", (72, 72)) is None and aspect.fit_warning(square, "stretch", (72, 72)) is None
    wide = [2.0, 2.02, 1.98] * 5  # all 2:1 into a square input: squeezed alike; an input of their shape fits
    w = aspect.fit_warning(wide, "stretch", (72, 72))
    assert w and "--resize 72x144 --crop 64x128" in w
    assert "--resize 72x144" in aspect.advise(wide)["reason"]
    assert aspect.fit_warning(wide, "stretch", (72, 144)) is None
    assert aspect.fit_warning(wide, "short", (72, 72))  # would cut half of every image
    tall = [0.5] * 6
    assert "--resize 144x72 --crop 128x64" in aspect.advise(tall)["reason"]


def _mixed_src(root, n=12):
    rng = np.random.default_rng(0)
    shapes = [(28, 12), (24, 60), (20, 20), (30, 26)]  # (height, width)
    for cls in ("good", "crack"):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(n):
            h, w = shapes[i % len(shapes)]
            cv2.imwrite(str(d / f"{i:02d}.png"), rng.integers(0, 255, (h, w), dtype=np.uint8))
    return root


def test_split_names_the_spread_and_advises_the_mode(tmp_path, capsys):
    src = _mixed_src(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["split", str(src), str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "aspect ratio (width/height) 0.43 to 2.50" in text and "narrowest 12x28, widest 60x24" in text
    assert "--resize-mode stretch: mixed aspect ratios" in text
    info = json.load(open(out / "dataset.json"))
    assert info["aspect"]["min"] == pytest.approx(12 / 28, abs=1e-3) and info["aspect"]["advice"]["mode"] == "stretch"


def test_train_warns_when_short_cuts_the_training_images(tmp_path, capsys):
    pytest.importorskip("torch")
    src = _mixed_src(tmp_path / "src")
    data = tmp_path / "data"
    assert main(["split", str(src), str(data), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--arch", "tiny", "--epochs", "1", "--resize", "24", "--crop", "20",
                 "--batch-size", "8", "--threads", "1", "--no-test-curves", "--out", str(tmp_path / "a"),
                 "--resize-mode", "short"]) == 0
    assert "WARNING: --resize-mode short cuts more than 20 % of the image off 50 %" in capsys.readouterr().out
