"""Balanced sampling, optimizer and warm-up options of ``nexedge train``."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from nexedge.train.sampling import BalancedSampler, sample_weights  # noqa: E402
from nexedge.train.toydata import make_toy_imagefolder  # noqa: E402
from nexedge.train.trainer import TrainConfig, _optimizer, _schedule  # noqa: E402

LABELS = np.array([0] * 80 + [1] * 15 + [2] * 5)  # 0 = good


def _class_mass(w: np.ndarray) -> np.ndarray:
    return np.array([w[LABELS == c].sum() for c in range(3)])


@pytest.mark.parametrize("mode,mass", [
    ("class", [1 / 3, 1 / 3, 1 / 3]),
    ("binary", [0.5, 0.375, 0.125]),
    ("sqrt", np.sqrt([80, 15, 5]) / np.sqrt([80, 15, 5]).sum()),
])
def test_sample_weights_class_mass(mode, mass):
    w = sample_weights(LABELS, mode, good_index=0)
    assert w.shape == LABELS.shape and abs(w.sum() - 1) < 1e-12
    np.testing.assert_allclose(_class_mass(w), mass, atol=1e-12)
    assert np.ptp(w[LABELS == 2]) == 0  # equal within a class


def test_sample_weights_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown balance mode 'even'"):
        sample_weights(LABELS, "even", 0)
    with pytest.raises(ValueError, match="needs good and defect images"):
        sample_weights(np.zeros(5, np.int64), "binary", 0)


def test_balanced_sampler_draws_balanced_reproducible_and_per_epoch():
    s = BalancedSampler(LABELS, "class", 0, seed=3)
    draws = []
    for e in range(40):
        s.set_epoch(e)
        draws.extend(s)
    assert len(s) == 100 and len(list(s)) == 100
    frac = np.bincount(LABELS[np.asarray(draws)], minlength=3) / len(draws)
    np.testing.assert_allclose(frac, [1 / 3] * 3, atol=0.03)  # 4000 draws; unbalanced would be .80/.15/.05
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(2)
    assert list(s) != first
    s.set_epoch(1)
    assert list(s) == first
    halves = [BalancedSampler(LABELS, "class", 0, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    assert [len(h) for h in halves] == [50, 50] and list(halves[0]) != list(halves[1])


def test_adamw_warmup_cosine_schedule():
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(data="x", out="y", epochs=5, lr=0.01, optimizer="adamw", warmup_epochs=2,
                      schedule="cosine", weight_decay=0.05)
    opt = _optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.05
    sched = _schedule(cfg, opt)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs[:3], [0.01 / 3, 0.02 / 3, 0.01], rtol=1e-6)
    assert lrs[3] < lrs[2] and lrs[4] < lrs[3]
    for bad, match in ((dict(optimizer="lion"), "--optimizer 'lion'"), (dict(warmup_epochs=5), "--optimizer-kw warmup_epochs"),
                       (dict(balanced="yes"), "--balanced 'yes'")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(data="x", out="y", epochs=5, **bad).check()


def test_cli_train_balanced_adamw_records_options(tmp_path, capsys):
    from nexedge.cli import main

    data = make_toy_imagefolder(str(tmp_path / "d"), ("good", "blob"), {"train": [10, 3], "val": [3, 3]},
                                size=36, noise=0.2)
    out = str(tmp_path / "run")
    rc = main(["train", "--data", str(data), "--out", out, "--arch", "tiny", "--epochs", "2", "--resize", "36",
               "--crop", "32", "--batch-size", "4", "--balanced", "--optimizer", "adamw", "--lr", "0.003",
               "--optimizer-kw", "warmup_epochs=1", "--no-progress", "--keep", "1"])
    assert rc == 0
    assert "adamw lr 0.003" in capsys.readouterr().out
    conf = json.load(open(os.path.join(out, "config.json")))
    assert conf["balanced"] == "class" and conf["optimizer"] == "adamw" and conf["warmup_epochs"] == 1
