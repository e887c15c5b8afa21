"""``nexedge explain``: occlusion maps on a real ONNX Runtime session of a model whose answer is known.

The model calls an image defective by the brightest (or a black) pixel in one window of
its crop, so the region that drives its defect score is known exactly: the map must find
it there and nowhere else, and occluding plain ground (filled with its local median, not
black) must change nothing.
"""

import json
import os

import numpy as np
import pytest

from nexedge.explain import occlusion_map, peak_box

CLASSES = ["good", "spot"]
SIZE, CROP = 36, 32
WINDOW = (8, 24, 4, 20)  # rows y0:y1, cols x0:x1 of the crop the model looks at


@pytest.fixture(scope="module")
def spot_model(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from nexedge.card import ModelCard

    class Spot(torch.nn.Module):
        def forward(self, x):  # normalised gray in [-1, 1]; a bright spot or a black pit in the window: "defect"
            y0, y1, x0, x1 = WINDOW
            w = x[:, 0, y0:y1, x0:x1]
            m = torch.maximum(w.amax(dim=(1, 2)) - 0.2, -0.9 - w.amin(dim=(1, 2)))
            return torch.stack([torch.zeros_like(m), 12.0 * m], 1)

    d = tmp_path_factory.mktemp("explain")
    path = str(d / "spot.onnx")
    torch.onnx.export(Spot(), (torch.zeros(2, 3, CROP, CROP),), path, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    card = ModelCard.new(CLASSES, resize=(SIZE, SIZE), crop=(CROP, CROP), crop_mode="center", color="gray",
                         kind="onnx")
    card.data["input"].update({"mean": [0.5] * 3, "std": [0.5] * 3})
    card.data["graph"].update({"crops": "host", "input_name": "input", "output_names": ["logits"], "max_batch": 16})
    card.save_for(path)
    return path


def _image(spot=None):
    img = np.full((SIZE, SIZE, 1), 80, np.uint8)
    if spot is not None:
        y, x = spot
        img[y:y + 2, x:x + 2] = 250
    return img


def test_the_map_finds_the_region_that_makes_the_defect(spot_model):
    from nexedge.runtime import open_backend

    off = (SIZE - CROP) // 2
    spot = (off + 14, off + 10)  # inside the window, in prepared-image pixels
    with open_backend(spot_model, intra_threads=1) as be:
        r = occlusion_map(be, _image(spot), patch=4, stride=2)
        assert r["score"] > 0.99 and r["value"] > 4
        heat = r["map"]
        y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        assert abs(y - (spot[0] + 1)) <= 2 and abs(x - (spot[1] + 1)) <= 2, (y, x)
        # only patches over the spot lower the score; everywhere else the map is zero (a black fill would
        # read as a pit there)
        far = np.ones_like(heat, bool)
        far[spot[0] - 4:spot[0] + 6, spot[1] - 4:spot[1] + 6] = False
        assert heat.max() > 4 and np.abs(heat[far]).max() < 1e-6
        box = peak_box(heat, 4, (SIZE * 3, SIZE * 2))  # box in original pixels: 3x taller, 2x wider image
        assert box[0] <= (spot[1] + 1) * 2 <= box[2] and box[1] <= (spot[0] + 1) * 3 <= box[3]

        # a spot outside the model's window changes nothing: an empty map
        outside = occlusion_map(be, _image((off + 28, off + 28)), patch=4, stride=2)
        assert outside["score"] < 0.2 and np.abs(outside["map"]).max() < 1e-6

        # explaining p(good) instead: removing the spot raises it, so its map is negative there, zero elsewhere
        good = occlusion_map(be, _image(spot), patch=4, stride=2, target=0)
        assert good["map"].min() < -4 and good["map"].max() < 1e-6


def test_explain_command_writes_figures_and_json(spot_model, tmp_path, capsys):
    import cv2

    from nexedge.cli import main

    off = (SIZE - CROP) // 2
    folder = tmp_path / "imgs"
    folder.mkdir()
    big = cv2.resize(_image((off + 14, off + 10))[:, :, 0], (SIZE * 4, SIZE * 4), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(folder / "a_spot.png"), big)
    cv2.imwrite(str(folder / "b_plain.png"), np.full((SIZE * 4, SIZE * 4), 80, np.uint8))
    (folder / "c_broken.png").write_bytes(b"not an image")
    cv2.imwrite(str(folder / "d_float.tif"), np.full((40, 40), 0.5, np.float32))  # decodes, but no 8/16-bit image
    cv2.imwrite(str(folder / "e_bgra16.png"), np.full((SIZE * 2, SIZE * 2, 4), 80 * 257, np.uint16))
    out = tmp_path / "out"
    assert main(["explain", spot_model, str(folder), "--out", str(out), "--occlusion-kw", "patch=0.12", "--occlusion-kw", "stride=0.5",
                 "--threads", "1"]) == 0
    rep = json.loads((out / "explain.json").read_text())
    rows = {os.path.basename(r["image"]): r for r in rep["images"]}
    assert set(rows) == {"a_spot.png", "b_plain.png", "e_bgra16.png"}  # the broken files are skipped, not fatal
    a, b = rows["a_spot.png"], rows["b_plain.png"]
    assert a["defect_score"] > 0.99 and b["defect_score"] < 0.2
    assert a["max_drop"] > 4 and abs(b["max_drop"]) < 1e-6
    x0, y0, x1, y1 = a["peak_box"]  # in the 144 x 144 original: the spot sits at (4 * (off + 11)) +- 4
    cx, cy = 4 * (off + 11), 4 * (off + 15)
    assert x0 <= cx <= x1 and y0 <= cy <= y1
    for r in rows.values():
        fig = cv2.imread(r["figure"])
        assert fig is not None and fig.shape[1] > 2 * 144
    assert rows["e_bgra16.png"]["defect_score"] < 0.2
    text = capsys.readouterr().out
    assert "a_spot.png" in text and "spot 1.00" in text and "skipping" in text and "d_float.tif" in text


def test_explain_rejects_bad_arguments_naming_them(spot_model, tmp_path, capsys):
    from nexedge.cli import main

    img = tmp_path / "x.png"
    import cv2

    cv2.imwrite(str(img), np.full((40, 40), 80, np.uint8))
    assert main(["explain", spot_model, str(img), "--target", "chipping", "--out", str(tmp_path / "o")]) == 1
    assert "'chipping'" in capsys.readouterr().err
    assert main(["explain", spot_model, str(img), "--occlusion-kw", "patch=1.5", "--out", str(tmp_path / "o")]) == 1
    assert "--occlusion-kw patch=1.5" in capsys.readouterr().err
    assert main(["explain", spot_model, str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "nope" in capsys.readouterr().err
    cv2.imwrite(str(tmp_path / "y.png"), np.full((40, 40), 80, np.uint8))
    assert main(["explain", spot_model, str(tmp_path), "--limit", "1", "--out", str(tmp_path / "o")]) == 0
    assert "the first 1 of 2 images" in capsys.readouterr().out


def test_maps_of_a_short_side_resize_land_on_the_cropped_middle_of_the_original():
    from nexedge.explain import heat_on_original

    # a 100 x 200 image, `resize_mode: short` to 36 x 36: scaled to 36 x 72, then the middle 36 columns kept
    heat = np.zeros((36, 36), np.float32)
    heat[16:20, 16:20] = 1.0  # the prepared image's centre
    x0, y0, x1, y1 = peak_box(heat, 4, (100, 200), "short")
    assert x0 <= 100 <= x1 and y0 <= 50 <= y1 and x1 - x0 < 15 and y1 - y0 < 15
    full = heat_on_original(heat, (100, 200), "short")
    assert full.shape == (100, 200)
    ys, xs = np.nonzero(full > 0.5 * full.max())
    assert abs(ys.mean() - 50) <= 2 and abs(xs.mean() - 100) <= 2
    assert np.abs(full[:, :45]).max() == 0 and np.abs(full[:, 155:]).max() == 0  # cropped away: no map
    # stretch keeps the plain per-axis scaling
    assert peak_box(heat, 4, (72, 36)) == [14, 28, 18, 36]  # around the first maximum, (16, 16)
