"""The report's split rule and ``nexedge split`` on a folder of images sorted by class."""

import json
import os

import cv2
import numpy as np
import pytest

from nexedge.cli import main
from nexedge.data.split import assign_splits, split_counts, split_folder


@pytest.mark.parametrize("n, expected", [
    (2, (1, 1, 0)), (3, (1, 1, 1)), (5, (1, 1, 3)), (9, (1, 1, 7)), (10, (1, 1, 8)), (25, (3, 2, 20)),
    (30523, (3052, 2747, 24724)),  # the report's good class: val 2,747, train 24,724
])
def test_split_counts_follow_the_report(n, expected):
    assert split_counts(n) == expected


def test_split_counts_refuses_a_single_image():
    with pytest.raises(ValueError, match="'lonely' has 1 image"):
        split_counts(1, "lonely")


def test_assign_splits_per_class_is_stable():
    a = assign_splits({"x": list(range(40)), "y": list(range(100, 112))}, seed=5)
    b = assign_splits({"x": list(range(40)), "y": list(range(100, 112)), "z": list(range(200, 230))}, seed=5)
    assert {k: a[k] for k in a} == {k: b[k] for k in a}  # adding a class leaves the others alone
    c = assign_splits({"x": list(range(40))}, seed=6)
    assert [a[k] for k in range(40)] != [c[k] for k in range(40)]


def _make_src(root, sizes):
    rng = np.random.default_rng(0)
    for cls, n in sizes.items():
        d = root / cls
        d.mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(d / f"img_{i:03d}.png"), rng.integers(0, 255, (20, 22), dtype=np.uint8))
        (d / "notes.txt").write_text("not an image")
    return root


def _rows(out):
    with open(os.path.join(out, "manifest.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_split_folder_copies_by_the_rule(tmp_path):
    src = _make_src(tmp_path / "src", {"good": 25, "scratch": 12, "pocket_damage": 3})
    out = tmp_path / "out"
    s = split_folder(str(src), str(out), seed=1, progress=False)
    assert s["n"] == 40
    for cls, n in {"good": 25, "scratch": 12, "pocket_damage": 3}.items():
        test, val, train = split_counts(n)
        for split, k in (("test", test), ("val", val), ("train", train)):
            assert len(os.listdir(out / split / cls)) == k, (cls, split)
    rows = _rows(out)
    assert len(rows) == 40
    for r in rows:
        dst = out / r["path"]
        assert dst.is_file() and not dst.is_symlink()
        assert dst.read_bytes() == open(r["source"], "rb").read()
        assert r["label"] == r["path"].split("/")[1] and r["true_label"] is None
    info = json.loads((out / "dataset.json").read_text())
    assert info["counts"]["test"] == {"good": 3, "pocket_damage": 1, "scratch": 1}
    assert (src / "good" / "img_000.png").is_file()  # source untouched


def test_split_folder_is_deterministic_and_links(tmp_path):
    src = _make_src(tmp_path / "src", {"good": 30, "chipping": 11})
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    split_folder(str(src), str(a), seed=3, progress=False)
    split_folder(str(src), str(b), seed=3, link="hard", progress=False)
    split_folder(str(src), str(c), seed=4, link="sym", progress=False)
    ra, rb, rc = _rows(a), _rows(b), _rows(c)
    assert [r["path"] for r in ra] == [r["path"] for r in rb]
    assert [r["path"] for r in ra] != [r["path"] for r in rc]
    r = rb[0]
    assert os.path.samefile(b / r["path"], r["source"])
    assert os.path.islink(c / rc[0]["path"]) and os.path.samefile(c / rc[0]["path"], rc[0]["source"])


def test_split_folder_refuses_bad_input(tmp_path):
    src = _make_src(tmp_path / "src", {"good": 5, "chipping": 1})
    with pytest.raises(ValueError, match="'chipping' has 1 image"):
        split_folder(str(src), str(tmp_path / "o1"), progress=False)
    assert not (tmp_path / "o1" / "manifest.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="nope"):
        split_folder(str(tmp_path / "nope"), str(tmp_path / "o2"), progress=False)
    with pytest.raises(ValueError, match="link mode 'soft'"):
        split_folder(str(src), str(tmp_path / "o3"), link="soft", progress=False)
    ok = _make_src(tmp_path / "ok", {"good": 4, "scratch": 4})
    split_folder(str(ok), str(tmp_path / "o4"), progress=False)
    with pytest.raises(ValueError, match="already holds a data set"):
        split_folder(str(ok), str(tmp_path / "o4"), progress=False)
    with pytest.raises(ValueError, match="looks already split"):
        split_folder(str(tmp_path / "o4"), str(tmp_path / "o5"), progress=False)


def test_cli_split(tmp_path, capsys):
    src = _make_src(tmp_path / "src", {"good": 12, "scratch": 4})
    out = tmp_path / "out"
    assert main(["split", str(src), str(out), "--seed", "2", "--link", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 16
    assert len(_rows(out)) == 16
    assert main(["split", str(tmp_path / "missing"), str(tmp_path / "o")]) == 1
    assert "missing" in capsys.readouterr().err
