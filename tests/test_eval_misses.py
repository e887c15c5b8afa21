"""Eval a user can act on (issue 27 item 5): train's `next:` evaluates the deployed checkpoint only, and
eval lists every escape and every overkill at the card's operating point (path, class probabilities,
score) with a contact sheet of them."""

import contextlib
import io
import json
import os

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from nexedge.cli import main  # noqa: E402
from nexedge.train.toydata import make_toy_imagefolder  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toy"))
    make_toy_imagefolder(root, ("good", "scratch", "blob"), {"train": [8, 6, 6], "val": [5, 4, 4], "test": [8, 6, 6]},
                         size=40, noise=0.3, seed=4)
    out = str(tmp_path_factory.mktemp("run") / "r")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["train", "--data", root, "--out", out, "--arch", "tiny", "--epochs", "2", "--resize", "40",
                     "--crop", "32", "--no-progress", "--no-test-curves", "--lr", "0.05", "--keep", "2"]) == 0
    return root, out, buf.getvalue()


def test_next_hint_evaluates_the_deployed_checkpoint_and_warns_on_val_selection(run):
    root, out, text = run
    assert f"next: nexedge eval {os.path.join(out, 'best.pt')} --data {root} --split test\n" in text
    assert "--crops center,five,ten` compares the kept checkpoints" in text  # the top-k table stays an option
    # --select val_auc (the default) picked the epoch on val and val set the threshold: said before `next:`
    assert "WARNING: the operating points were measured on 'val', the split that also picked this checkpoint" in text


def test_eval_lists_every_escape_and_overkill_and_draws_them(run, tmp_path, capsys):
    root, out, _ = run
    dest = str(tmp_path / "ev")
    assert main(["eval", os.path.join(out, "best.pt"), "--data", root, "--out", dest, "--no-progress"]) == 0
    text = capsys.readouterr().out
    res = json.load(open(os.path.join(dest, "eval.json")))
    assert res["crops"] == ["center"]  # default: the crops the card runs, one pass
    op = res["runs"]["best"]["best"]["operating_point"]
    esc, ovk = op["escaped_images"], op["overkill_images"]
    assert len(esc) == op["escapes"] and len(ovk) == op["overkill"] and esc + ovk, "toy model should miss some"
    t = op["threshold"]
    assert all(r["score"] < t and r["class"] != "good" for r in esc)
    assert all(r["score"] >= t and r["class"] == "good" for r in ovk)
    assert [r["score"] for r in esc] == sorted(r["score"] for r in esc)
    for r in esc + ovk:
        assert os.path.exists(os.path.join(root, r["path"])) and r["path"].startswith("test")
        assert set(r["probs"]) == {"blob", "good", "scratch"} and sum(r["probs"].values()) == pytest.approx(1, abs=1e-5)
        assert 1 - r["probs"]["good"] == pytest.approx(r["score"], abs=1e-5)
        assert f"{r['path']}  {r['class']}  score {r['score']:.4g}" in text
    sheet = op["contact_sheet"]
    assert sheet == os.path.join(dest, "misses.png") and f"contact sheet of the escapes and overkill: {sheet}" in text
    import cv2

    img = cv2.imread(sheet)
    assert img is not None and img.shape[0] > 128 and img.std() > 10
    assert op["promise"]["n_defects"] == op["n_defects"] and "the card promises" in text


def test_eval_of_a_clean_model_writes_no_contact_sheet(tmp_path):
    from nexedge.train.evaluate import write_misses_sheet

    best = {"checkpoint": "x", "crop": "center", "operating_point": {"escaped_images": [], "overkill_images": [],
                                                                        "escapes": 0, "overkill": 0, "threshold": 0.5}}
    assert write_misses_sheet(best, str(tmp_path), str(tmp_path / "m.png")) is None
    assert not (tmp_path / "m.png").exists()
