"""The numeric review of issue 27: escape rates printed with their 95 % bound, a warning when the split that
picked the model also set its thresholds, evaluation loaders that leave training's random stream alone,
frozen stages without stochastic depth, the score named as it is computed, and INT8 AUC deltas with an
interval."""

import numpy as np
import pytest

from nexedge import metrics
from nexedge.card import ModelCard

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


def _op(n=35, tpr=1.0):
    return {"target_tpr": 1.0, "threshold": 0.1, "tpr": tpr, "fpr": 0.2, "n_defects": n, "n_good": 86,
            "tpr_lower95": metrics.clopper_pearson_lower(int(round(tpr * n)), n)}


def test_format_points_prints_the_95_bound_beside_the_expected_escape_rate():
    from nexedge.export.thresholds import format_points

    card = ModelCard.new(["good", "chip"])
    card.data["operating_points"] = [_op()]
    text = format_points(card)
    # 35 defects all caught: 1/36 = 2.8 % on average over validation draws, at most 8.2 % for this threshold
    assert "new defect escapes: expected / 95% bound" in text and "2.8 % / 8.2 %" in text
    assert "not a promise for this one threshold" in text


def test_selection_warning_when_val_picked_the_checkpoint_and_set_its_threshold():
    from nexedge.export.thresholds import format_points

    card = ModelCard.new(["good", "chip"])
    card.data["operating_points"] = [_op()]
    card.data["operating_points_source"] = {"status": "measured", "split": "val", "crop_mode": "center"}
    card.data["provenance"] = {"select": "val_auc", "best_of_run": "ckpt_e004.pt"}
    assert "the split that also picked this checkpoint" in card.selection_warning()
    assert "WARNING: the operating points were measured on 'val'" in format_points(card)
    for prov, split in (({"select": "last", "best_of_run": "ckpt_e005.pt"}, "val"),
                        ({"select": "val_auc", "best_of_run": "ckpt_e004.pt"}, "holdout")):
        card.data["provenance"] = prov
        card.data["operating_points_source"]["split"] = split
        assert card.selection_warning() is None


def test_promise_check_says_whether_test_escapes_fit_the_bound():
    op = _op(332)  # the tiles' train+val defects under --cv: bound 0.9 %
    assert metrics.promise_check(0, 40, op)["within"]
    assert metrics.promise_check(1, 40, op)["within"]  # P(>= 1 of 40 at 0.9 %) = 0.30
    assert not metrics.promise_check(3, 40, op)["within"]
    assert metrics.binomial_tail(1, 40, 0.009) == pytest.approx(1 - (1 - 0.009) ** 40)
    assert metrics.promise_check(0, 0, op) is None


def test_delong_paired_difference_hand_checked():
    y = [1, 1, 0, 0]
    d = metrics.auc_difference(y, [0.9, 0.4, 0.5, 0.1], [0.9, 0.6, 0.5, 0.1])
    # AUCs 0.75 and 1; structural components give var = 0.125/2 + 0.125/2
    assert d["delta"] == pytest.approx(0.25) and d["se"] == pytest.approx(0.125 ** 0.5)
    assert d["lo"] == pytest.approx(0.25 - 1.959964 * 0.125 ** 0.5, abs=1e-5)
    same = metrics.auc_difference(y, [0.9, 0.4, 0.5, 0.1], [0.9, 0.4, 0.5, 0.1])
    assert same["delta"] == 0 and same["se"] == 0
    rng = np.random.default_rng(0)
    yy = rng.integers(0, 2, 300)
    a = rng.normal(0, 1, 300) + yy
    b = a + rng.normal(0, 0.3, 300)
    d = metrics.auc_difference(yy, a, b)
    assert d["delta"] == pytest.approx(metrics.roc_auc(yy, b) - metrics.roc_auc(yy, a))
    assert d["lo"] < d["delta"] < d["hi"] and 0 < d["se"] < 0.05


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


def test_frozen_efficientnet_stages_apply_no_stochastic_depth():
    from nexedge.models import create_model
    from nexedge.models.freeze import freeze_stages

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 3, drop_path=0.9)
    freeze_stages(model, 4)  # stem + three block stages
    frozen_last = model.stages()[3][-1]
    trained_last = model.stages()[5][-1]
    assert frozen_last.drop_path > 0 and trained_last.drop_path > 0 and frozen_last.residual
    seen = {"frozen": [], "trained": []}
    frozen_last.register_forward_hook(lambda m, i, o: seen["frozen"].append(o.detach().clone()))
    trained_last.register_forward_hook(lambda m, i, o: seen["trained"].append(o.detach().clone()))
    model.train()
    x = torch.randn(8, 3, 64, 64)
    model(x)
    model(x)
    torch.testing.assert_close(seen["frozen"][0], seen["frozen"][1], rtol=0, atol=0)  # no random drop
    assert not torch.equal(seen["trained"][0], seen["trained"][1])  # the trained stages keep drop-path


def test_train_help_names_the_score_as_computed(capsys):
    from nexedge.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "defect score is the sum of the defect classes' probabilities" in text
    assert "The model's score is 1 - p(good class)" not in text


def test_demo_recap_names_both_decision_change_rates():
    import io

    from nexedge.demo.context import Demo
    from nexedge.demo.run import print_recap

    buf = io.StringIO()
    demo = Demo("/tmp/x", {"arch": "tiny"}, stream=buf)
    demo.results["int8"] = {"onnx": "m.int8-ort.onnx", "bytes": 1e6, "fp32_bytes": 4e6,
                            "decision_flips": {"good": 0.02, "defect": 0.05},
                            "metrics": {"split": "test", "n_images": 122, "auc_int8": 0.98, "auc_fp32": 0.985,
                                        "auc_delta_points": -0.5, "auc_delta_ci95_points": [-1.4, 0.4],
                                        "max_abs_score_diff": 0.01}}
    print_recap(demo)
    text = buf.getvalue()
    assert "delta -0.50 points, 95 % CI -1.40 to +0.40" in text
    assert "decisions that differ at the deployed point: 2.0% of good, 5.0% of defects" in text
