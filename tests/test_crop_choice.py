"""Crops by measurement (issue 27 item 1): the card records training flips, TenCrop's mirrored crops
are refused for a model trained without them, the crop aggregate (mean of logits or max defect score)
is honoured by the host runtime, the in-graph crops and the cascade, and `export --crops auto` keeps
the candidate with the best tail."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
torch.set_num_threads(1)

from nexedge import metrics  # noqa: E402
from nexedge import preprocess as pp  # noqa: E402
from nexedge.card import CardError, ModelCard, load_card  # noqa: E402
from nexedge.export.auto import choose  # noqa: E402
from nexedge.export.onnx_export import export_onnx  # noqa: E402
from nexedge.export.toy import toy_images, train_toy_checkpoint, write_toy_dataset  # noqa: E402
from nexedge.runtime import open_backend  # noqa: E402

INP = {"color": "gray", "resize": [40, 44], "crop": [32, 36], "crop_mode": "center"}


def _with_flip(ckpt, flip):
    """Stamp the training flip into a toy checkpoint's card (the trainer writes it into provenance)."""
    card = load_card(ckpt)
    card.data["provenance"] = dict(card.data.get("provenance") or {}, flip=flip)
    card.save_for(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("crops")
    data = write_toy_dataset(str(d / "data"), dict(INP), {"train": 6, "val": 48, "test": 6})
    return str(d), data, train_toy_checkpoint(str(d / "toy.pt"), inp=dict(INP), steps=25)


def test_aggregate_crops_mean_is_the_softmax_of_the_mean_and_max_takes_the_top_crop():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (7, 5, 4))
    probs, s = metrics.aggregate_crops(z, 1, "mean")
    np.testing.assert_allclose(probs, pp.softmax(z.mean(axis=1)), rtol=1e-12)
    np.testing.assert_allclose(s, metrics.defect_score(z.mean(axis=1), 1), rtol=1e-12)
    probs, s = metrics.aggregate_crops(z, 1, "max")
    per = metrics.defect_score(z.reshape(-1, 4), 1).reshape(7, 5)
    np.testing.assert_allclose(s, per.max(axis=1), rtol=1e-12)
    np.testing.assert_allclose(probs, pp.softmax(z[np.arange(7), per.argmax(axis=1)]), rtol=1e-12)
    np.testing.assert_allclose(1.0 - probs[:, 1], s, rtol=1e-9)  # the score is the shown probabilities' defect sum
    assert (s >= metrics.aggregate_crops(z, 1, "mean")[1] - 1e-12).sum() >= 6  # max dilutes nothing
    with pytest.raises(ValueError, match="unknown crop aggregate 'median'"):
        metrics.aggregate_crops(z, 1, "median")


def test_card_records_the_aggregate_and_refuses_an_unknown_one():
    card = ModelCard.new(["good", "chip"], aggregate="max")
    assert card.aggregate == "max" and ModelCard.new(["good", "chip"]).aggregate == "mean"
    card.data["input"]["aggregate"] = "median"
    with pytest.raises(CardError, match="input.aggregate.*'median'"):
        card.validate()
    old = ModelCard.new(["good", "chip"])
    del old.data["input"]["aggregate"]  # cards from before the field: mean, as before
    assert old.validate().aggregate == "mean"


@pytest.mark.parametrize("flip,train_crop,kind", [("none", "random", "unseen"), ("v", "random", "unseen"),
                                                  (None, "random", "unknown"), ("h", "random", None),
                                                  ("hv", "random", None), ("none", "ten", None)])
def test_mirror_problem_follows_the_training_flips(flip, train_crop, kind):
    card = ModelCard.new(["good", "chip"], crop_mode="ten")
    card.data["provenance"] = {"train_crop": train_crop, **({} if flip is None else {"flip": flip})}
    got = card.mirror_problem()
    assert (got or {}).get("kind") == kind
    assert card.mirror_problem("five") is None and card.mirror_problem("center") is None


def test_host_runtime_honours_max_and_its_crop_view(toy, tmp_path):
    _, data, ckpt = toy
    res = export_onnx(ckpt, out=str(tmp_path / "host.onnx"), crops="host", parity_images=2, threads=1, data=data)
    imgs, _ = toy_images(6, load_card(res.path).input, seed=3)
    with open_backend(res.path, intra_threads=1) as be:
        x = pp.host_batch(imgs, be.card.input, "five")
        logits = be.session.run(None, {be.input_name: x})[0].reshape(6, 5, -1)
        want_p, want_s = metrics.aggregate_crops(logits, be.card.good_index, "max")
        got = be.crop_view("five", "max").infer(imgs)
        np.testing.assert_allclose(got.defect_score, want_s, rtol=1e-6)
        np.testing.assert_allclose(got.probs, want_p, atol=1e-6)
        mean = be.crop_view("five").infer(imgs)  # a view keeps the backend's aggregate (mean)
        np.testing.assert_allclose(mean.defect_score, metrics.aggregate_crops(logits, be.card.good_index)[1],
                                   rtol=1e-6)
        assert not np.allclose(mean.defect_score, got.defect_score)
    card = load_card(res.path)  # a card that says max makes the backend itself aggregate by max
    card.data["input"].update(crop_mode="five", aggregate="max")
    card.save_for(res.path)
    with open_backend(res.path, intra_threads=1) as be:
        np.testing.assert_allclose(be.infer(imgs).defect_score, want_s, rtol=1e-6)
        from nexedge.runtime.cascade import CascadePlan

        plan = CascadePlan(be.crop_view("center"), be, {"lo": 0.0, "threshold": 0.5, "hi": 1.0})  # all in band
        np.testing.assert_allclose(plan.infer(imgs).defect_score, want_s, rtol=1e-6)


def test_ingraph_max_matches_the_host_max_and_parity_holds(toy, tmp_path):
    _, data, ckpt = toy
    _with_flip(ckpt, "h")
    res = export_onnx(ckpt, out=str(tmp_path / "ten_max.onnx"), crops="ten", aggregate="max", parity_images=4,
                      threads=1, data=data)
    assert res.parity["max_abs_diff"] <= 1e-4
    card = load_card(res.path)
    assert card.aggregate == "max" and card.ops_source["aggregate"] == "max"
    host = export_onnx(ckpt, out=str(tmp_path / "h.onnx"), crops="host", parity_images=2, threads=1, data=data)
    imgs, _ = toy_images(8, card.input, seed=5)
    with open_backend(res.path, intra_threads=1) as g, open_backend(host.path, intra_threads=1) as h:
        np.testing.assert_allclose(g.infer(imgs).defect_score, h.crop_view("ten", "max").infer(imgs).defect_score,
                                   rtol=1e-4, atol=1e-7)
    from nexedge.export import onnx_check as oc

    for target in oc.TARGETS:
        assert not oc.errors(oc.check_onnx(res.path, target))


def test_export_refuses_tencrop_for_a_model_trained_without_mirrors(toy, tmp_path, caplog):
    _, data, ckpt = toy
    _with_flip(ckpt, "none")
    with pytest.raises(ValueError, match="trained with --flip none.*--auto-kw allow_unseen_mirrors=true"):
        export_onnx(ckpt, out=str(tmp_path / "t.onnx"), crops="ten", threads=1, data=data)
    assert not (tmp_path / "t.onnx").exists()
    res = export_onnx(ckpt, out=str(tmp_path / "t.onnx"), crops="ten", threads=1, data=data, parity_images=2,
                      allow_unseen_mirrors=True)
    assert load_card(res.path).runtime_crop_mode == "ten"
    assert any("never saw" in r.getMessage() for r in caplog.records)


def test_choose_takes_the_lowest_fpr_then_auc_then_fewest_crops():
    rows = [{"crops": "center", "aggregate": "mean", "fpr": 0.25, "auc": 0.99},
            {"crops": "five", "aggregate": "mean", "fpr": 0.10, "auc": 0.98},
            {"crops": "five", "aggregate": "max", "fpr": 0.10, "auc": 0.99},
            {"crops": "ten", "aggregate": "mean", "fpr": 0.10, "auc": 0.99}]
    assert (choose(rows)["crops"], choose(rows)["aggregate"]) == ("five", "max")
    rows[2]["auc"] = 0.98
    assert (choose(rows)["crops"], choose(rows)["aggregate"]) == ("ten", "mean")
    rows[3]["auc"] = 0.98
    assert (choose(rows)["crops"], choose(rows)["aggregate"]) == ("five", "mean")


def test_export_auto_measures_the_candidates_side_by_side_and_keeps_the_best(toy, tmp_path, capsys):
    _, data, ckpt = toy
    _with_flip(ckpt, "none")
    from nexedge.cli import main

    out = str(tmp_path / "auto.onnx")
    assert main(["export", ckpt, "--crops", "auto", "--aggregate", "mean,max", "--data", data, "--threads", "1",
                 "--parity-images", "2", "-o", out]) == 0
    text = capsys.readouterr().out
    assert "crops auto: measured on 'val'" in text and "<- chosen" in text
    assert "ten     mean      skipped: model trained with --flip none" in text
    card = load_card(out)
    sel = card.data["crop_selection"]
    measured = {(r["crops"], r["aggregate"]) for r in sel["candidates"]}
    assert measured == {("center", "mean"), ("five", "mean"), ("five", "max")}
    best = choose(sel["candidates"])
    assert (card.runtime_crop_mode, card.aggregate) == (best["crops"], best["aggregate"]) == \
        (sel["chosen"]["crops"], sel["chosen"]["aggregate"])
    op = card.operating_point(1.0)  # the kept artifact's own measurement equals its candidate row
    assert op["fpr"] == pytest.approx(best["fpr"]) and json.dumps(sel)
    assert main(["export", ckpt, "--crops", "auto", "--aggregate", "mean,median", "--data", data]) == 1
    assert "mean,median" in capsys.readouterr().err
