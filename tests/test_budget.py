"""``nexedge train --budget``: duration parsing, the choice from given timings, one tiny real run."""

import json
import os

import pytest

from nexedge.train.budget import Candidate, Counts, Timings, choose_plan, parse_duration


@pytest.mark.parametrize("text, seconds", [
    ("900s", 900), ("15m", 900), ("1.5h", 5400), ("1h30m", 5400), (" 2m 30s ", 150), ("0.5M", 30), (".5h", 1800),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["15", "15x", "-5m", "0m", "m", "1h x", "15 minutes", "", "1h30"])
def test_parse_duration_refuses_with_the_expected_forms(text):
    with pytest.raises(ValueError, match="expected a positive duration with a unit: s, m or h"):
        parse_duration(text)


# 1000 train images at 0.1 s, 100 val + 100 test at 0.02 s, 1 s of checkpoints: 105 s per epoch;
# fixed: 1200 images decoded at 5 ms (6 s) + 2 s model + END_S 5 s = 13 s.
T = Timings(train_s=0.1, eval_s=0.02, decode_s=0.005, epoch_s=1.0, setup_s=2.0)
C = Counts(train=1000, val=100, test=100)


def _cand(crop, scale=1.0):
    t = Timings(T.train_s * scale, T.eval_s * scale, T.decode_s, T.epoch_s, T.setup_s)
    return Candidate(resize=(crop + crop // 8, crop + crop // 8), crop=(crop, crop), timings=t)


def test_epochs_fill_the_budget_less_margin_warmup_and_fixed_costs():
    plan = choose_plan(900, 20, [_cand(128)], C, max_epochs=30, margin=0.1)
    # 900 * 0.9 - 20 spent - 13 fixed = 777 s -> 7 epochs of 105 s (735 s)
    assert plan.epochs == 7 and plan.epoch_s == pytest.approx(105)
    assert plan.predicted_s == pytest.approx(20 + 13 + 7 * 105)
    assert "7 epochs of about 1 min 45 s each (the most that fit)" in plan.reason
    assert choose_plan(900, 20, [_cand(128)], C, max_epochs=5, margin=0.1).epochs == 5  # --epochs caps it
    assert choose_plan(900, 20, [_cand(128)], C).epochs == 6  # the default 15 % margin: 900 * 0.85 - 33 = 732 s
    assert "(the most allowed: --epochs 5)" in choose_plan(900, 20, [_cand(128)], C, max_epochs=5, margin=0.1).reason
    no_test = choose_plan(900, 20, [_cand(128)], Counts(1000, 100, 0), max_epochs=30, margin=0.1)
    assert no_test.epochs == 7 and no_test.epoch_s == pytest.approx(103)  # 777 / 103 = 7.5


def test_too_short_a_budget_names_the_budget_one_epoch_needs():
    with pytest.raises(ValueError) as e:
        choose_plan(100, 20, [_cand(128)], C, margin=0.1)
    msg = str(e.value)
    # (20 + 13 + 105) / 0.9 = 153 s
    assert "--budget 1 min 40 s is too short" in msg and "at least 2 min 33 s" in msg and "1000 training images" in msg


def test_resolution_the_largest_that_affords_the_minimum_epochs():
    cands = [_cand(160, 1.6), _cand(128, 1.0), _cand(96, 0.55)]  # largest first
    # 160: 1.6 * 104 + 1 = 167.4 s/epoch -> 4 epochs in 777 s; 128: 7; 96: 0.55 * 104 + 1 = 58.2 -> 13
    plan = choose_plan(900, 20, cands, C, max_epochs=30, min_epochs=6, margin=0.1)
    assert plan.crop == (128, 128) and plan.resize == (144, 144) and plan.epochs == 7
    assert plan.reason.startswith("crop 128x128: the largest crop that affords 6 epochs; 7 epochs")
    plan = choose_plan(900, 20, cands, C, max_epochs=30, min_epochs=20, margin=0.1)  # none affords 20: the most epochs
    assert plan.crop == (96, 96) and plan.epochs == 13 and "no size affords 20 epochs" in plan.reason
    assert choose_plan(900, 20, cands, C, max_epochs=3, min_epochs=10, margin=0.1).crop == (160, 160)  # the cap is enough
    rec = plan.record()
    assert [c["crop"] for c in rec["candidates"]] == [[160, 160], [128, 128], [96, 96]]
    assert [c["epochs"] for c in rec["candidates"]] == [4, 7, 13]


def test_budget_flags_are_checked_before_any_work(tmp_path, capsys):
    pytest.importorskip("torch")
    from nexedge.cli import main
    from nexedge.train.toydata import make_toy_imagefolder

    data = str(make_toy_imagefolder(str(tmp_path / "d"), ("good", "scratch"), {"train": [3, 3], "val": [2, 2]}))
    base = ["train", "--data", data, "--out", str(tmp_path / "r"), "--arch", "tiny"]
    assert main(base + ["--budget", "15"]) == 1
    assert "--budget '15': expected a positive duration with a unit" in capsys.readouterr().err
    assert main(base + ["--budget-kw", "resize=32"]) == 1
    assert "give --budget too" in capsys.readouterr().err
    assert main(base + ["--budget", "1m", "--budget-kw", "resize=32,big"]) == 1
    assert "--budget-kw resize='32,big'" in capsys.readouterr().err
    assert main(base + ["--budget", "1m", "--resume", "x.pt"]) == 1
    assert "--resume continues one" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text("{}")  # an earlier run
    assert main(base + ["--budget", "1m"]) == 1
    assert "already holds a run" in capsys.readouterr().err  # before the warm-up
    assert main(base + ["--budget", "1s", "--overwrite", "--resize", "36", "--crop", "32", "--threads", "1"]) == 1
    assert "--budget 1.0 s is too short" in capsys.readouterr().err
    assert (tmp_path / "r" / "config.json").exists()  # a budget that affords nothing replaces nothing


def test_tiny_budget_run_measures_chooses_and_records(tmp_path, capsys):
    pytest.importorskip("torch")
    from nexedge.cli import main
    from nexedge.train.toydata import make_toy_imagefolder

    data = str(make_toy_imagefolder(str(tmp_path / "d"), ("good", "scratch"),
                                    {"train": [8, 8], "val": [4, 4], "test": [3, 3]}, size=40))
    out = str(tmp_path / "run")
    assert main(["train", "--data", data, "--out", out, "--arch", "tiny", "--epochs", "2", "--budget", "2m",
                 "--budget-kw", "resize=32,24", "--resize", "40", "--crop", "32", "--batch-size", "8", "--threads", "1",
                 "--schedule", "cosine"]) == 0
    text = capsys.readouterr().out
    assert "warm-up at crop 32x32 (resize 40x40)" in text and "warm-up at crop 24x24 (resize 30x30)" in text
    assert "ms per training image" in text
    assert "chose crop 32x32: the largest crop that affords 2 epochs; 2 epochs" in text
    assert "(16 train, 8 val, 6 test images per epoch)" in text
    rec = json.load(open(os.path.join(out, "budget.json")))
    assert rec["epochs"] == 2 and rec["crop"] == [32, 32] and rec["budget_s"] == 120
    assert 0 < rec["actual_s"] and rec["within_budget"] == (rec["actual_s"] <= 120)
    assert all(c["timings"]["train_s"] > 0 and c["timings"]["eval_s"] > 0 for c in rec["candidates"])
    assert json.load(open(os.path.join(out, "config.json")))["budget"]["epochs"] == 2
    assert json.load(open(os.path.join(out, "summary.json")))["epochs"] == 2
    assert "budget: " in text and "of 2 min 00 s used (predicted" in text
