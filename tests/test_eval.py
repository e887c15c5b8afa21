"""nexedge eval (Table 3 layout over top-k checkpoints and crop styles) and nexedge mislabels."""

import csv
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from nexedge.cli import main  # noqa: E402
from nexedge.train.evaluate import format_table, resolve_checkpoints, score_checkpoint  # noqa: E402
from nexedge.train.mislabels import precision_recall  # noqa: E402
from nexedge.train.toydata import make_toy_imagefolder  # noqa: E402
from nexedge.train.trainer import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toy"))
    make_toy_imagefolder(root, ("good", "scratch", "blob"), {"train": [8, 6, 6], "val": [5, 4, 4], "test": [5, 4, 4]},
                         size=44, noise=0.25, seed=1)
    out = str(tmp_path_factory.mktemp("run") / "sat")
    train(TrainConfig(data=root, out=out, arch="tiny", epochs=3, batch_size=8, resize=(40, 40), crop=(32, 32),
                      keep=2, progress=False, loss="sat", sat_es=1, lr=0.05, test_curves=False))
    return root, out


def test_resolve_checkpoints_uses_topk_order(run):
    _, out = run
    label, files = resolve_checkpoints(out)
    assert label == "sat" and len(files) == 2
    aucs = [e["auc"] for e in json.load(open(os.path.join(out, "topk.json")))["checkpoints"]]
    assert aucs == sorted(aucs, reverse=True)
    assert resolve_checkpoints(out, top=1)[1] == files[:1]
    with pytest.raises(FileNotFoundError, match="not a checkpoint file or run folder"):
        resolve_checkpoints(out + "_missing")


def test_center_and_five_from_one_tencrop_pass_equal_own_passes(run):
    root, out = run
    ckpt = resolve_checkpoints(out)[1][0]
    both = score_checkpoint(ckpt, root, "test", ["center", "five", "ten"], progress=False)
    center = score_checkpoint(ckpt, root, "test", ["center"], progress=False)
    five = score_checkpoint(ckpt, root, "test", ["five"], progress=False)
    np.testing.assert_allclose(both["center"], center["center"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both["five"], five["five"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(both["ten"], both["center"])


def test_eval_cli_prints_table_and_writes_files(run, tmp_path, capsys):
    root, out = run
    dest = str(tmp_path / "ev")
    assert main(["eval", out, "--data", root, "--split", "test", "--crops", "center,ten", "--out", dest,
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "CenterCrop" in text and "TenCrop" in text and "FPR at TPR >= 99.7" in text and "AUC" in text
    assert "over 2 checkpoint(s)" in text
    assert {"eval.json", "eval.csv", "roc_center.png", "roc_ten.png"} <= set(os.listdir(dest))
    res = json.load(open(os.path.join(dest, "eval.json")))
    crops = res["runs"]["sat"]["crops"]
    assert set(crops) == {"center", "ten"} and crops["ten"]["auc"]["n"] == 2
    rows = list(csv.DictReader(open(os.path.join(dest, "eval.csv"))))
    assert len(rows) == 4 and "fpr@100" in rows[0]
    md = format_table({**res, "runs": res["runs"]}, markdown=True)
    assert md.startswith("| mean (std) % | CenterCrop | TenCrop |")
    assert main(["eval", out, "--data", root, "--crops", "center,seven"]) == 1
    assert "--crops 'center,seven'" in capsys.readouterr().err


def test_mislabels_cli_uses_sat_and_reports_precision_recall(run, tmp_path, capsys):
    root, out = run
    dest = str(tmp_path / "m.csv")
    assert main(["mislabels", out, "--data", root, "--top", "4", "--out", dest, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "SAT soft labels" in text and "binary_flips" in text and "precision" in text
    rows = list(csv.DictReader(open(dest)))
    assert len(rows) == 20 and sum(int(r["flagged"]) for r in rows) == 4
    assert {r["source"] for r in rows} == {"sat"}  # --loss sat updates every row
    susp = [float(r["suspicion"]) for r in rows]
    assert susp == sorted(susp, reverse=True)
    manifest = [json.loads(line) for line in open(os.path.join(root, "manifest.jsonl"))]
    noisy = {os.path.normpath(m["path"]) for m in manifest if m["noisy"] and m["split"] == "train"}
    flagged = {r["path"] for r in rows if r["flagged"] == "1"}
    pr = precision_recall(np.array([r["path"] in flagged for r in rows]), np.array([r["path"] in noisy for r in rows]))
    assert f"precision {pr['precision']:.3f} recall {pr['recall']:.3f}" in text
    assert main(["mislabels", out, "--data", root, "--by", "model", "--out", dest, "--no-progress"]) == 0
    assert {r["source"] for r in csv.DictReader(open(dest))} == {"model"}


def test_precision_recall_hand_checked():
    f = np.array([1, 1, 0, 0, 1], bool)
    t = np.array([1, 0, 1, 0, 0], bool)
    pr = precision_recall(f, t)
    assert pr["precision"] == pytest.approx(1 / 3) and pr["recall"] == pytest.approx(0.5)
