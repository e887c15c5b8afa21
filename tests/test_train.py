"""Trainer: eval preprocessing equals the shared contract, crop averaging, top-k
retention, a real tiny training run (cards, metrics, plots, resume, SAT state)."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from nexedge import preprocess  # noqa: E402
from nexedge.card import load_card  # noqa: E402
from nexedge.train.cardbuild import TopK  # noqa: E402
from nexedge.train.data import ImageFolderSet, list_classes, load_image  # noqa: E402
from nexedge.train.loop import forward_crops  # noqa: E402
from nexedge.train.toydata import make_toy_imagefolder  # noqa: E402
from nexedge.train.trainer import TrainConfig, train  # noqa: E402
from nexedge.train.transforms import EvalTransform, TrainTransform  # noqa: E402

INP = {"color": "gray", "resize": [40, 40], "crop": [32, 32], "crop_mode": "center",
       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
SMALL = {"train": [6, 5, 5], "val": [5, 4, 4], "test": [4, 3, 3]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return str(make_toy_imagefolder(str(root), ("good", "scratch", "blob"), SMALL, size=44, noise=0.2))


def _cfg(data, out, **kw):
    base = dict(data=data, out=out, arch="tiny", epochs=2, batch_size=8, resize=(40, 40), crop=(32, 32), keep=1,
                progress=False, lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("mode", ["center", "five", "ten"])
def test_dataset_item_equals_shared_preprocessing(toy, mode):
    classes = list_classes(toy)
    ds = ImageFolderSet(toy, "val", classes, INP, EvalTransform(INP, mode))
    x, y, i = ds[3]
    img = preprocess.prepare(load_image(os.path.join(toy, ds.items[3][0]), "gray"), INP)
    ref = preprocess.host_batch(img[None], INP, mode)
    assert x.shape == (preprocess.n_crops(mode), 3, 32, 32)
    np.testing.assert_array_equal(x.numpy(), ref)
    assert y == ds.items[3][1] and i == 3


@pytest.mark.parametrize("crop,k", [("random", 1), ("center", 1), ("five", 5), ("ten", 10)])
def test_train_transform_shapes(crop, k):
    img = np.random.default_rng(0).integers(0, 255, (40, 40, 1), dtype=np.uint8)
    x = TrainTransform(INP, crop=crop)(img)
    assert x.shape == (k, 3, 32, 32) and x.dtype == torch.float32


def test_train_transform_without_jitter_equals_eval_preprocessing():
    img = np.random.default_rng(1).integers(0, 255, (40, 40, 1), dtype=np.uint8)
    for mode in ("center", "ten"):
        still = TrainTransform(INP, crop=mode, rotation=0, translate=0, scale=0, jitter=0)
        np.testing.assert_allclose(still(img).numpy(), EvalTransform(INP, mode)(img).numpy(), atol=1e-5)
    torch.manual_seed(0)
    moved = TrainTransform(INP, crop="center")(img)
    assert not np.allclose(moved.numpy(), EvalTransform(INP, "center")(img).numpy(), atol=1e-3)


@pytest.mark.parametrize("flip,axes", [("h", {"h"}), ("v", {"v"}), ("hv", {"h", "v", "hv"})])
def test_train_transform_flips_only_the_asked_axes(flip, axes):
    img = np.random.default_rng(2).integers(0, 255, (40, 40, 1), dtype=np.uint8)
    still = dict(crop="center", rotation=0, translate=0, scale=0, jitter=0)
    views = {"none": img, "h": img[:, ::-1], "v": img[::-1], "hv": img[::-1, ::-1]}
    ref = {k: EvalTransform(INP, "center")(np.ascontiguousarray(v)).numpy() for k, v in views.items()}
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        x = TrainTransform(INP, flip=flip, **still)(img).numpy()
        seen |= {k for k, r in ref.items() if np.allclose(x, r, atol=1e-5)}
    assert seen == axes | {"none"}


def test_train_transform_rejects_an_unknown_flip():
    with pytest.raises(ValueError, match="'x'.*expected one of"):
        TrainTransform(INP, flip="x")


def test_train_cli_choices_match_the_transforms():
    # one definition, in the torch-free nexedge.train.config, so that `nexedge train --help` does not import torch
    from nexedge.train import cli, config, losses, transforms

    assert cli.FLIPS is transforms.FLIPS is config.FLIPS and cli.LOSSES is losses.LOSSES is config.LOSSES
    assert cli.PHOTOMETRIC is transforms.PHOTOMETRIC is config.PHOTOMETRIC


@pytest.mark.parametrize("kw", [dict(flip="hv"), dict(photometric="shift")])
def test_no_augment_refuses_flips_and_photometric_shift_it_would_ignore(kw):
    with pytest.raises(ValueError, match="--no-augment.*drop --no-augment"):
        _cfg("data", "out", augment=False, **kw).check()
    _cfg("data", "out", augment=False).check()


def test_shift_photometric_changes_gamma_blur_and_noise_only_when_asked():
    img = np.random.default_rng(3).integers(0, 255, (40, 40, 1), dtype=np.uint8)
    still = dict(crop="center", rotation=0, translate=0, scale=0, jitter=0)
    ref = EvalTransform(INP, "center")(img).numpy()
    torch.manual_seed(0)
    np.testing.assert_allclose(TrainTransform(INP, photometric="report", **still)(img).numpy(), ref, atol=1e-5)
    t = TrainTransform(INP, photometric="shift", **still)
    outs = [t(img).numpy() for _ in range(8)]
    assert all(not np.allclose(o, ref, atol=1e-3) for o in outs)
    assert all(np.isfinite(o).all() and o.shape == ref.shape for o in outs)
    with pytest.raises(ValueError, match="'strong'.*expected one of"):
        TrainTransform(INP, photometric="strong")


def test_forward_crops_averages_logits_before_softmax():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    x = torch.randn(2, 10, 3, 4, 4)
    out = forward_crops(model, x)
    per = model(x.flatten(0, 1)).detach().numpy()
    np.testing.assert_allclose(out.detach().numpy(), preprocess.average_crops(per, 10), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="B x K x 3 x h x w"):
        forward_crops(model, x[0])


def test_topk_keeps_best_and_deletes_the_rest(tmp_path):
    tk = TopK(str(tmp_path), k=2)
    for epoch, auc in enumerate([0.5, 0.7, 0.6, 0.9, 0.65], 1):
        name = f"ckpt_e{epoch:03d}.pt"
        if tk.wants(auc):
            (tmp_path / name).write_bytes(b"x")
            (tmp_path / f"ckpt_e{epoch:03d}.card.json").write_text("{}")
            tk.add(name, epoch, auc)
    assert [e["epoch"] for e in tk.entries] == [4, 2]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ckpt_e002.pt", "ckpt_e004.pt"]
    assert not (tmp_path / "ckpt_e003.card.json").exists()
    assert TopK(str(tmp_path), k=2).entries == tk.entries  # reloads topk.json
    with pytest.raises(ValueError, match="--keep"):
        TopK(str(tmp_path), k=0)


def test_train_run_writes_cards_metrics_plots_and_resumes(toy, tmp_path):
    out = str(tmp_path / "run")
    summary = train(_cfg(toy, out, loss="sat_good", sat_es=1))
    files = set(os.listdir(out))
    assert {"last.pt", "last.card.json", "topk.json", "metrics.jsonl", "metrics.csv", "sat_state.npz",
            "curves_acc.png", "curves_loss.png", "curves_margin.png", "fpr_at_tpr100.png", "config.json"} <= files
    ckpts = [f for f in files if f.startswith("ckpt_") and f.endswith(".pt")]
    assert len(ckpts) == 1 and summary["best"]["file"] == ckpts[0]
    card = load_card(os.path.join(out, ckpts[0]))  # sha256 verified
    assert card.classes == ["blob", "good", "scratch"] and card.good_class == "good"
    assert card.input["resize"] == [40, 40] and card.input["crop"] == [32, 32]
    ops = card.operating_points
    assert [op["target_tpr"] for op in ops] == [0.991, 0.993, 0.995, 0.997, 1.0]
    assert all(op["n_defects"] == 8 and op["n_good"] == 5 and 0 <= op["tpr_lower95"] <= op["tpr"] for op in ops)
    vs = card.data["val_scores"]
    assert sum(vs["good"]) == 5 and sum(vs["defect"]) == 8
    assert set(card.data["image_stats"]) == {"brightness", "contrast", "sharpness"}
    prov = card.data["provenance"]
    assert prov["arch"] == "tiny" and prov["loss"] == "sat_good" and len(prov["data_hash"]) == 64
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]["val"]["per_class"]) == {"blob", "good", "scratch"}
    assert set(rows[0]["val"]["fpr_at_tpr"]) == {"99.1", "99.3", "99.5", "99.7", "100"}
    assert "test" in rows[0]
    header = open(os.path.join(out, "metrics.csv")).readline().strip().split(",")
    assert "val.auc" in header and "val.good.margin" in header and "test.fpr@100" in header
    sat = np.load(os.path.join(out, "sat_state.npz"))
    good = sat["labels"] == 1
    assert sat["soft"].shape == (16, 3)
    assert not np.allclose(sat["soft"][good], np.eye(3)[sat["labels"][good]])  # updated after es
    np.testing.assert_array_equal(sat["soft"][~good], np.eye(3)[sat["labels"][~good]])  # sat_good: untouched

    train(_cfg(toy, out, loss="sat_good", sat_es=1, epochs=3, resume=os.path.join(out, "last.pt")))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert load_card(os.path.join(out, "last.pt")).data["provenance"]["epoch"] == 3


def test_train_rejects_bad_config(toy, tmp_path):
    with pytest.raises(ValueError, match="--good-class 'ok' is not one of"):
        train(_cfg(toy, str(tmp_path / "a"), good_class="ok"))
    with pytest.raises(ValueError, match="--crop .* larger than --resize"):
        train(_cfg(toy, str(tmp_path / "b"), crop=(48, 48)))
    with pytest.raises(ValueError, match="unknown --arch 'resnet9'"):
        train(_cfg(toy, str(tmp_path / "c"), arch="resnet9"))
    with pytest.raises(FileNotFoundError, match="data split folder not found"):
        train(_cfg(str(tmp_path), str(tmp_path / "d")))


def test_cli_train_other_good_class_and_weighted_loss(toy, tmp_path, capsys):
    from nexedge.cli import main

    out = str(tmp_path / "cli")
    rc = main(["train", "--data", toy, "--out", out, "--arch", "tiny", "--epochs", "1", "--resize", "40",
               "--crop", "32", "--good-class", "scratch", "--loss", "wbce", "--wbce-start", "blob=2",
               "--boost", "good=2", "--no-progress", "--no-test-curves", "--schedule", "cosine"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "negative='scratch'" in text and "best:" in text
    card = load_card(os.path.join(out, "last.pt"))
    assert card.good_class == "scratch"
    assert card.data["provenance"]["class_weights"] == [1.0, 2.0, 1.0]
    assert main(["train", "--data", toy, "--out", out, "--arch", "tiny", "--boost", "nope=2"]) == 1
    assert "'nope' is not one of" in capsys.readouterr().err


def test_topk_select_last_keeps_the_latest_epochs_newest_first(tmp_path):
    tk = TopK(str(tmp_path), k=2, select="last")
    for epoch, auc in enumerate([0.9, 0.5, 0.7, 0.6], 1):
        assert tk.wants(auc, 0.1, epoch)  # every new epoch is the latest
        (tmp_path / f"ckpt_e{epoch:03d}.pt").write_bytes(b"x")
        tk.add(f"ckpt_e{epoch:03d}.pt", epoch, auc, 0.1)
    assert [e["epoch"] for e in tk.entries] == [4, 3]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ckpt_e003.pt", "ckpt_e004.pt"]
    saved = json.load(open(tmp_path / "topk.json"))
    assert saved["select"] == "last" and "last epoch" in saved["rule"]
    assert [e["epoch"] for e in TopK(str(tmp_path), k=2).entries] == [3, 4]  # read back under val_auc: re-sorted
    with pytest.raises(ValueError, match="--select 'best'"):
        TopK(str(tmp_path), select="best")


def test_select_last_deploys_the_final_epoch(toy, tmp_path, capsys):
    from nexedge.cli import main

    out = str(tmp_path / "last")
    assert main(["train", "--data", toy, "--out", out, "--arch", "tiny", "--epochs", "3", "--resize", "40",
                 "--crop", "32", "--keep", "2", "--select", "last", "--no-progress", "--no-test-curves",
                 "--lr", "0.05"]) == 0
    assert "copied to best.pt (the last epoch" in capsys.readouterr().out
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["best"]["epoch"] == 3 and "last epoch" in summary["best_rule"]
    assert [e["epoch"] for e in summary["topk"]] == [3, 2]
    prov = load_card(os.path.join(out, "best.pt")).data["provenance"]
    assert prov["best_of_run"] == "ckpt_e003.pt" and prov["epoch"] == 3 and "last epoch" in prov["best_rule"]
    with pytest.raises(ValueError, match="--select 'first'"):
        train(_cfg(toy, str(tmp_path / "bad"), select="first"))


def test_evaluation_loaders_do_not_change_training(tmp_path):
    from nexedge.models.checkpoint import load_checkpoint
    from nexedge.train.toydata import make_toy_imagefolder
    from nexedge.train.trainer import TrainConfig, train

    root = str(make_toy_imagefolder(str(tmp_path / "d"), ("good", "chip"), {"train": [6, 6], "val": [3, 3],
                                                                            "test": [3, 3]}, size=36))
    weights = []
    for curves in (True, False):
        out = str(tmp_path / f"r{curves}")
        train(TrainConfig(data=root, out=out, arch="tiny", epochs=2, batch_size=4, resize=(36, 36), crop=(32, 32),
                          progress=False, plots=False, keep=1, test_curves=curves, lr=0.05, next_hint=False))
        weights.append(load_checkpoint(out + "/last.pt")["state_dict"])
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=0)


def test_train_help_names_the_score_as_computed(capsys):
    from nexedge.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "defect score is the sum of the defect classes' probabilities" in text
    assert "The model's score is 1 - p(good class)" not in text
