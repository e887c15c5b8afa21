"""Cross-validated operating points (issue 27 item 2): `nexedge train --cv K` scores every train+val
image out of fold, `nexedge export RUN` builds the fold ensemble whose threshold rests on every labelled
defect, and the ensemble's decision is the one its guarantee is about."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
torch.set_num_threads(1)

from nexedge import metrics  # noqa: E402
from nexedge.card import load_card  # noqa: E402
from nexedge.train.cv import fold_assignment, fold_offsets, normalized_scores  # noqa: E402


def test_folds_are_stratified_deterministic_and_cover_every_image():
    labels = np.array([0] * 50 + [1] * 11 + [2] * 4)
    f = fold_assignment(labels, 5, seed=3)
    np.testing.assert_array_equal(f, fold_assignment(labels, 5, seed=3))
    assert not np.array_equal(f, fold_assignment(labels, 5, seed=4))
    for c, n in ((0, 50), (1, 11), (2, 4)):
        counts = np.bincount(f[labels == c], minlength=5)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    from nexedge.train.cv import check_folds

    with pytest.raises(ValueError, match="at most 4 folds"):
        check_folds(np.array([0] * 9 + [1] * 4), 0, 5)


def test_normalised_scores_align_the_folds_good_tails_and_ignore_an_outlier_defect():
    rng = np.random.default_rng(1)
    folds = np.repeat(np.arange(3), 40)
    y = np.tile(np.r_[np.zeros(30, int), np.ones(10, int)], 3)
    z = rng.normal(0, 1, 120) + 3 * y + np.repeat([-2.0, 0.0, 2.0], 40)  # folds on other scales
    s = metrics.expit(z)
    off = fold_offsets(s, y, folds, 3)
    norm, c = normalized_scores(s, folds, off)
    for f in range(3):  # every fold's good 95th percentile lands on the same normalised value
        m = (folds == f) & (y == 0)
        assert metrics.logit(np.quantile(norm[m], 0.95)) == pytest.approx(c, abs=0.05)  # up to interpolation
    assert metrics.roc_auc(y, norm) > metrics.roc_auc(y, s)  # the fold shift no longer mixes the ranking
    s2 = s.copy()
    s2[39] = 3e-5  # fold 0's weakest defect an outlier, as one fray of the tiles was
    np.testing.assert_allclose(fold_offsets(s2, y, folds, 3), off)


def test_ensemble_graph_rejects_when_any_fold_reaches_its_own_threshold():
    from nexedge.export.graph import EnsembleInGraph

    torch.manual_seed(0)
    inp = {"resize": [8, 8], "crop": [8, 8], "mean": [0.5] * 3, "std": [0.5] * 3}
    models = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3)) for _ in range(3)]
    offsets = [-1.0, 0.5, 2.0]
    ens = EnsembleInGraph(models, inp, "center", 1, 3, "mean", offsets).eval()
    imgs = torch.randint(0, 255, (16, 8, 8, 3), dtype=torch.uint8)
    with torch.no_grad():
        probs, score, logits = ens(imgs)
        x = ens.crops_of(imgs)
        s_f = np.stack([metrics.defect_score(m(x).double().numpy(), 1) for m in models])  # F x N
    want = metrics.expit(np.max(metrics.logit(s_f) - np.asarray(offsets)[:, None], axis=0))
    np.testing.assert_allclose(score.numpy(), want, rtol=1e-4)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(1 - probs[:, 1].numpy(), want, rtol=1e-4)
    # the runtimes score from the logits output, in float64 on the host: the same score
    np.testing.assert_allclose(metrics.defect_score(logits.double().numpy(), 1), want, rtol=1e-4)
    for t in (0.2, 0.5, 0.8):  # one threshold on the score == "some fold at its own threshold"
        own = np.any(s_f >= metrics.expit(metrics.logit(t) + np.asarray(offsets)[:, None]), axis=0)
        np.testing.assert_array_equal(want >= t, own)


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    from nexedge.cli import main
    from nexedge.train.toydata import make_toy_imagefolder

    d = tmp_path_factory.mktemp("cv")
    root = str(make_toy_imagefolder(str(d / "data"), ("good", "scratch", "blob"),
                                    {"train": [10, 6, 6], "val": [5, 3, 3], "test": [6, 4, 4]}, size=36, noise=0.2,
                                    seed=2))
    out = str(d / "cv")
    assert main(["train", "--data", root, "--out", out, "--arch", "tiny", "--epochs", "1", "--resize", "36",
                 "--crop", "32", "--cv", "3", "--no-progress", "--lr", "0.05", "--batch-size", "8"]) == 0
    return root, out


def test_train_cv_scores_every_labelled_image_out_of_fold(cv_run, capsys):
    root, out = cv_run
    summary = json.load(open(os.path.join(out, "cv.json")))
    z = np.load(os.path.join(out, "oof.npz"))
    n_def = sum(len(os.listdir(os.path.join(root, sp, c))) for sp in ("train", "val") for c in ("scratch", "blob"))
    assert summary["k"] == 3 and summary["n_images"] == 33 and summary["n_defects"] == n_def
    assert z["logits"].shape == (33, 5, 3) and str(z["crops"]) == "five"  # no mirrors trained: FiveCrop
    assert set(np.bincount(z["folds"])) <= {10, 11, 12} and not np.all(z["logits"] == 0, axis=(1, 2)).any()
    assert not any(p.startswith("test") for p in z["paths"])  # the test split is never touched
    for f in (1, 2, 3):  # each fold model trained on the other folds only, its last epoch
        card = load_card(os.path.join(out, f"fold{f}", "best.pt"))
        assert card.data["provenance"]["select"] == "last"
        held = set(os.listdir(os.path.join(out, "folds", f"f{f}", "val", "good")))
        trained = set(os.listdir(os.path.join(out, "folds", f"f{f}", "train", "good")))
        assert held and not held & trained
    cand = {(c["crops"], c["aggregate"]): c for c in summary["candidates"]}
    assert set(cand) == {("center", "mean"), ("five", "mean"), ("five", "max")}
    op = next(o for o in cand[("center", "mean")]["operating_points"] if o["target_tpr"] == 1.0)
    assert op["n_defects"] == n_def and op["tpr_lower95"] == pytest.approx(0.05 ** (1 / n_def))  # every defect
    assert len(cand[("center", "mean")]["folds"]) == 3 and "std" in cand[("center", "mean")]["spread"]["auc"]


def test_export_cv_builds_the_ensemble_with_out_of_fold_points(cv_run, tmp_path, capsys):
    from nexedge.cli import main

    root, out = cv_run
    dest = str(tmp_path / "ens.onnx")
    assert main(["export", out, "-o", dest, "--threads", "1", "--parity-images", "4"]) == 0
    text = capsys.readouterr().out
    assert "fold ensemble of 3 models" in text and "escape rate guaranteed" in text and "fold-to-fold" in text
    card = load_card(dest)
    op = card.operating_point(1.0)
    assert op["n_defects"] == json.load(open(os.path.join(out, "cv.json")))["n_defects"] and len(op["per_fold"]) == 3
    assert op["guaranteed_escape_rate"] == pytest.approx(min((p["missed"] + 1) / (p["n_defects"] + 1)
                                                             for p in op["per_fold"]))
    assert all(p["missed"] == 0 for p in op["per_fold"])  # TPR 100 %: below every OOF defect of every fold
    assert card.ops_source["split"].startswith("out-of-fold") and card.data["cv"]["k"] == 3
    assert card.crop_mode_mismatch() is None
    from nexedge.runtime import open_backend

    with open_backend(dest, intra_threads=1) as be:  # the daemon's runtime runs it like any in-graph model
        r = be.infer(np.zeros((2,) + be.input_shape, np.uint8))
        assert r.probs.shape == (2, 3) and np.isfinite(r.defect_score).all()
    from nexedge.export.thresholds import measure_artifact

    with pytest.raises(ValueError, match="fold ensemble whose models trained on 'val'"):
        measure_artifact(dest, root, "val")
    assert main(["eval", dest, "--data", root, "--split", "test", "--no-progress", "--out",
                 str(tmp_path / "ev")]) == 0
    assert "the card promises" in capsys.readouterr().out
