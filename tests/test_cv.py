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


def test_offsets_put_every_fold_at_its_own_tpr100_threshold_and_isolate_an_outlier_fold():
    rng = np.random.default_rng(1)
    folds = np.repeat(np.arange(3), 40)
    y = np.tile(np.r_[np.zeros(30, int), np.ones(10, int)], 3)
    z = rng.normal(0, 1, 120) + 3 * y + np.repeat([-2.0, 0.0, 2.0], 40)  # folds on other scales
    s = metrics.expit(z)
    s[39] = 3e-5  # fold 0's weakest defect an outlier, as one fray of the tiles was
    off = fold_offsets(s, y, folds, 3)
    norm, c = normalized_scores(s, folds, off)
    t = metrics.operating_point(y, norm, 1.0)["threshold"]
    for f in range(3):  # each fold's own TPR-100 % threshold lands on the pooled one
        m = folds == f
        own = metrics.operating_point(y[m], s[m], 1.0)["threshold"]
        assert metrics.logit(own) - off[f] + c == pytest.approx(metrics.logit(t), abs=1e-9)
        assert (norm[m & (y == 1)] >= t).all()
    from nexedge.export.ensemble import fold_guarantees

    ops = [metrics.operating_point(y, norm, 1.0)]
    fold_guarantees(s, y, folds, off - c, ops, "median")
    per = ops[0]["per_fold"]
    assert [p["missed"] for p in per] == [0, 0, 0]  # every fold at its own conformal point
    assert per[0]["fpr"] > 0.9 and max(p["fpr"] for p in per[1:]) < 0.5  # the outlier fold REJECTs nearly all good


def _fold_models(n: int, seed: int = 0):
    torch.manual_seed(seed)
    return [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3)) for _ in range(n)]


@pytest.mark.parametrize("rule", ["median", "mean", "max"])
def test_ensemble_graph_scores_by_its_rule_over_the_aligned_fold_log_odds(rule):
    from nexedge.export.graph import EnsembleInGraph

    inp = {"resize": [8, 8], "crop": [8, 8], "mean": [0.5] * 3, "std": [0.5] * 3}
    models = _fold_models(5)
    offsets = np.array([-1.0, 0.5, 2.0, 0.0, -0.3])
    ens = EnsembleInGraph(models, inp, "center", 1, 3, "mean", offsets, rule).eval()
    imgs = torch.randint(0, 255, (32, 8, 8, 3), dtype=torch.uint8)
    with torch.no_grad():
        probs, score, logits = ens(imgs)
        x = ens.crops_of(imgs)
        s_f = np.stack([metrics.defect_score(m(x).double().numpy(), 1) for m in models])  # F x N
    u = metrics.logit(s_f) - offsets[:, None]
    want = metrics.expit({"median": np.median, "mean": np.mean, "max": np.max}[rule](u, axis=0))
    np.testing.assert_allclose(score.numpy(), want, rtol=1e-4)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, rtol=1e-5)
    # the runtimes score from the logits output, in float64 on the host: the same score
    np.testing.assert_allclose(metrics.defect_score(logits.double().numpy(), 1), want, rtol=1e-4)
    own = s_f >= metrics.expit(np.log(0.5 / 0.5) + offsets[:, None])  # each fold at its own threshold for T = 0.5
    reached = own.sum(axis=0)
    if rule == "median":  # REJECT exactly when at least 3 of 5 fold models reach their own thresholds
        np.testing.assert_array_equal(want >= 0.5, reached >= 3)
    elif rule == "max":
        np.testing.assert_array_equal(want >= 0.5, reached >= 1)
    else:  # the mean: REJECT needs one, PASS needs one below
        assert ((want >= 0.5) <= (reached >= 1)).all() and ((want < 0.5) <= (reached <= 4)).all()
    with pytest.raises(ValueError, match="ensemble rule 'vote'"):
        EnsembleInGraph(models, inp, "center", 1, 3, "mean", offsets, "vote")


def test_fold_guarantees_and_the_cards_promise_follow_the_rule():
    from nexedge.export.ensemble import fold_guarantees, votes

    assert votes("median", 5) == {"pass": 3, "reject": 3} and votes("median", 4) == {"pass": 2, "reject": 2}
    assert votes("max", 5) == {"pass": 5, "reject": 1} and votes("mean", 5) == {"pass": 1, "reject": 1}
    rng = np.random.default_rng(0)
    folds = np.repeat(np.arange(5), 30)
    y = np.tile(np.r_[np.zeros(20, int), np.ones(10, int)], 5)
    s = metrics.expit(rng.normal(0, 1, 150) + 2.5 * y)
    off = fold_offsets(s, y, folds, 5)
    norm, c = normalized_scores(s, folds, off)
    got = {}
    for rule in ("median", "mean", "max"):
        ops = [metrics.operating_point(y, norm, 1.0)]
        fold_guarantees(s, y, folds, off - c, ops, rule)
        got[rule] = op = ops[0]
        conformal = [(p["missed"] + 1) / (p["n_defects"] + 1) for p in op["per_fold"]]
        assert conformal == [1 / 11] * 5
        fpr = sum(p["fpr"] for p in op["per_fold"])
        r = {"median": 3, "mean": 1, "max": 5}[rule]
        assert op["guaranteed_escape_rate"] == pytest.approx(min(conformal) if rule == "max" else
                                                             min(1.0, sum(conformal) / r))
        assert op["escape_factor"] == pytest.approx(1.0 if rule == "max" else 50 / (r * 10))
        assert op["fpr_bound"] == pytest.approx(min(1.0, fpr / (3 if rule == "median" else 1)))
        # what eval checks: the pooled OOF promise times the rule's factor
        assert metrics.escape_bound(op) == pytest.approx(min(1.0, op["escape_factor"] * (1 - op["tpr_lower95"])))
        assert metrics.expected_escape_rate(op) == pytest.approx(min(1.0, op["escape_factor"] / 51))
    assert got["max"]["guaranteed_escape_rate"] < got["median"]["guaranteed_escape_rate"] < got["mean"][
        "guaranteed_escape_rate"]
    with pytest.raises(ValueError, match="escape_factor 0.5"):
        metrics.escape_bound(dict(got["max"], escape_factor=0.5))


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
    assert "fold ensemble of 3 models, rule median" in text and "guaranteed <=" in text and "fold-to-fold" in text
    card = load_card(dest)
    op = card.operating_point(1.0)
    assert op["n_defects"] == json.load(open(os.path.join(out, "cv.json")))["n_defects"] and len(op["per_fold"]) == 3
    assert card.data["cv"]["rule"] == "median" and card.data["cv"]["votes"] == {"pass": 2, "reject": 2}
    assert op["guaranteed_escape_rate"] == pytest.approx(min(1.0, sum((p["missed"] + 1) / (p["n_defects"] + 1)
                                                                      for p in op["per_fold"]) / 2))
    assert op["escape_factor"] == pytest.approx(op["n_defects"] / (2 * min(p["n_defects"] for p in op["per_fold"])))
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
