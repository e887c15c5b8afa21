import numpy as np
import pytest

from nexedge import preprocess as pp

INP = {"color": "gray", "resize": [20, 22], "crop": [16, 18], "crop_mode": "ten",
       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_tencrop_matches_torchvision():
    torch = pytest.importorskip("torch")
    from torchvision.transforms import functional as F

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(2, 20, 22, 1), dtype=np.uint8)
    ours = pp.host_batch(img, INP)
    assert ours.shape == (20, 3, 16, 18)
    for i in range(2):
        t = torch.from_numpy(pp.normalize(img[i], INP["mean"], INP["std"]))
        ref = torch.stack(F.ten_crop(t, [16, 18])).numpy()
        np.testing.assert_allclose(ours[i * 10:(i + 1) * 10], ref, atol=0)


@pytest.mark.parametrize("mode,k", [("center", 1), ("five", 5), ("ten", 10)])
def test_crop_counts(mode, k):
    img = np.zeros((3, 20, 22, 1), np.uint8)
    assert pp.host_batch(img, INP, mode).shape[0] == 3 * k


def test_as_model_color_variants():
    g = np.full((5, 6), 7, np.uint8)
    assert pp.as_model_color(g, "gray").shape == (5, 6, 1)
    assert pp.as_model_color(np.dstack([g, g, g]), "gray").shape == (5, 6, 1)
    assert pp.as_model_color(g, "rgb").shape == (5, 6, 3)
    assert pp.as_model_color((g.astype(np.uint16) << 8), "gray").max() == 7
    with pytest.raises(ValueError, match="float64"):
        pp.as_model_color(g.astype(np.float64), "gray")
    with pytest.raises(ValueError, match="empty"):
        pp.as_model_color(np.zeros((0, 4), np.uint8), "gray")
    with pytest.raises(ValueError, match="shape"):
        pp.as_model_color(np.zeros((4, 4, 2), np.uint8), "gray")


def test_prepare_resizes():
    img = np.random.default_rng(1).integers(0, 256, size=(275, 267, 3), dtype=np.uint8)
    out = pp.prepare(img, INP)
    assert out.shape == (20, 22, 1) and out.dtype == np.uint8


def test_average_and_defect_score():
    logits = np.array([[2.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], np.float32)
    avg = pp.average_crops(logits, 2)
    np.testing.assert_allclose(avg, [[1.0, 0.0], [1.0, 1.0]])
    probs = pp.softmax(avg)
    from nexedge.metrics import defect_score, defect_score_from_probs

    want = [1 - np.exp(1) / (np.exp(1) + 1), 0.5]
    np.testing.assert_allclose(defect_score(avg, 0), want, rtol=1e-6)
    np.testing.assert_allclose(defect_score_from_probs(probs, 0), want, rtol=1e-6)
    with pytest.raises(ValueError):
        pp.average_crops(logits[:3], 2)


def test_image_stats_orders_blur_and_brightness():
    import cv2

    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(32, 32, 1), dtype=np.uint8)
    b, c, s = pp.image_stats(img)
    blurred = cv2.GaussianBlur(img, (5, 5), 2.0)[:, :, None]
    assert pp.image_stats(blurred)[2] < s
    assert pp.image_stats((img // 2).astype(np.uint8))[0] < b
    assert 0 < c < 1
