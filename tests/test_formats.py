"""Export formats in the shapes their consumers document (Label Studio, ImageFolder, cleanlab)."""

import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from nexedge.cli import main
from nexedge.relabel.formats import export_formats, labeling_config, read_pull_manifest, safe_name
from nexedge.relabel.pull import LocalSource, pull
from nexedge.relabel.review import export_mislabels
from nexedge.store import SampleStore

CLASSES = ["good", "scratch", "chipping"]


def _pulled(tmp_path, n=9, classes=CLASSES):
    root, out = str(tmp_path / "store"), str(tmp_path / "out")
    with SampleStore(root) as st:
        for i in range(n):
            p = np.full(len(classes), 0.1 / (len(classes) - 1))
            p[i % len(classes)] = 0.9
            st.add(b"x%d" % i * 40, "png", {"camera": "cam/../0", "frame_id": str(i), "ts": 1.7e9 + i,
                                             "model_id": "net@abcdef12", "threshold": 0.3, "score": 1 - p[0],
                                             "probs": dict(zip(classes, p.tolist())), "decision": "PASS",
                                             "reason": "band", "kind": "band"})
    pull(LocalSource(root), out)
    return out


def test_labelstudio_tasks_and_config_match(tmp_path):
    out = _pulled(tmp_path)
    written = export_formats(out, ["labelstudio"], ls_url_prefix="/data/local-files/?d=exports/")
    tasks = json.load(open(written["labelstudio"][0]))
    cfg = ET.parse(written["labelstudio"][1]).getroot()
    assert cfg.tag == "View"
    image = cfg.find("Image")
    choices = cfg.find("Choices")
    assert image.get("value") == "$image" and choices.get("toName") == image.get("name")
    assert [c.get("value") for c in choices.findall("Choice")] == CLASSES
    assert len(tasks) == 9
    for t in tasks:
        # Label Studio import shape: {"data": {...}, "predictions": [{"model_version", "score", "result": [...]}]}
        assert set(t) == {"data", "predictions"}
        assert t["data"]["image"].startswith("/data/local-files/?d=exports/images/")
        assert os.path.exists(os.path.join(out, t["data"]["image"].split("?d=exports/")[1]))
        (pred,) = t["predictions"]
        assert pred["model_version"] == "net@abcdef12" and pred["score"] == pytest.approx(0.9)
        (res,) = pred["result"]
        assert res["from_name"] == choices.get("name") and res["to_name"] == image.get("name")
        assert res["type"] == "choices" and len(res["value"]["choices"]) == 1
        assert res["value"]["choices"][0] in CLASSES
    preds = [t["predictions"][0]["result"][0]["value"]["choices"][0] for t in tasks]
    assert preds == [CLASSES[i % 3] for i in range(9)]


def test_labeling_config_escapes_names():
    xml = labeling_config(['a"b', "<c>"])
    values = [c.get("value") for c in ET.fromstring(xml).iter("Choice")]
    assert values == ['a"b', "<c>"]


def test_class_folders_by_prediction_and_safe_names(tmp_path):
    out = _pulled(tmp_path, classes=["good", "../escape", ".hidden"])
    written = export_formats(out, ["folders"])
    top = os.path.join(out, "folders")
    assert sorted(os.listdir(top)) == ["_escape", "good", "hidden"]
    for p in written["folders"]:
        assert os.path.realpath(p).startswith(os.path.realpath(top) + os.sep)
    for r in read_pull_manifest(out):
        linked = os.path.join(top, safe_name(r["predicted"]), os.path.basename(r["path"]))
        assert open(linked, "rb").read() == open(os.path.join(out, r["path"]), "rb").read()
    assert export_formats(out, ["folders"])["folders"] == []  # idempotent
    assert safe_name("..") == "_" and safe_name("a/b\\c") == "a_b_c" and safe_name("") == "_"


def test_cleanlab_arrays_from_mislabel_csv(tmp_path):
    ds = tmp_path / "ds"
    rows = ["rank,path,given_label,direction,suspicion,defect_score,flagged,p_good,p_scratch,p_chipping"]
    for i in range(6):
        cls = CLASSES[i % 3]
        (ds / "train" / cls).mkdir(parents=True, exist_ok=True)
        (ds / "train" / cls / f"{i}.png").write_bytes(b"png%d" % i * 30)
        p = [0.2, 0.3, 0.5] if i % 2 else [0.7, 0.2, 0.1]
        rows.append(f"{i + 1},train/{cls}/{i}.png,{cls},x,0.9,{1 - p[0]},{int(i < 5)},{p[0]},{p[1]},{p[2]}")
    csv_path = tmp_path / "mislabels_train.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "review")
    assert main(["pull", "--mislabels", str(csv_path), "--dataset", str(ds), "--out", out,
                 "--format", "cleanlab,labelstudio", "--classes", ",".join(CLASSES)]) == 0
    labels = np.load(os.path.join(out, "cleanlab", "labels.npy"))
    probs = np.load(os.path.join(out, "cleanlab", "pred_probs.npy"))
    assert labels.shape == (5,) and labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 0, 1]
    assert probs.shape == (5, 3) and np.allclose(probs.sum(axis=1), 1.0)
    assert json.load(open(os.path.join(out, "cleanlab", "classes.json"))) == CLASSES
    tasks = json.load(open(os.path.join(out, "labelstudio", "tasks.json")))
    assert tasks[1]["data"]["dataset_path"] == "train/scratch/1.png" and tasks[1]["data"]["given_label"] == "scratch"
    # re-running adds nothing
    assert export_mislabels(str(csv_path), str(ds), out)["new"] == 0


def test_cleanlab_without_labels_is_a_clear_error(tmp_path):
    out = _pulled(tmp_path)
    with pytest.raises(ValueError, match="cleanlab format needs rows with a given label"):
        export_formats(out, ["cleanlab"])
    with pytest.raises(ValueError, match="unknown export format"):
        export_formats(out, ["coco"])


def test_mislabel_rows_outside_the_dataset_are_refused(tmp_path):
    (tmp_path / "ds" / "train" / "good").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,given_label\n../secret.png,good\n")
    with pytest.raises(ValueError, match="line 2"):
        export_mislabels(str(csv_path), str(tmp_path / "ds"), str(tmp_path / "out"))
    assert not os.listdir(tmp_path / "out" / "images")


def test_mislabel_export_uses_the_dataset_classes(tmp_path):
    ds = tmp_path / "ds"
    for cls in ("good", "scratch", "chipping"):
        (ds / "train" / cls).mkdir(parents=True)
    (ds / "train" / "scratch" / "a.png").write_bytes(b"a" * 50)
    csv_path = tmp_path / "m.csv"  # the trainer's columns, no class probabilities
    csv_path.write_text("rank,path,given_label,direction,suspicion,source,defect_score,sat_weight,flagged,true_label\n"
                        "1,train/scratch/a.png,scratch,defect->good,0.8,model,0.2,,1,scratch\n")
    out = str(tmp_path / "out")
    assert main(["pull", "--mislabels", str(csv_path), "--dataset", str(ds), "--out", out, "--format", "labelstudio"]) == 0
    cfg = ET.parse(os.path.join(out, "labelstudio", "labeling_config.xml")).getroot()
    assert [c.get("value") for c in cfg.iter("Choice")] == ["chipping", "good", "scratch"]
    (task,) = json.load(open(os.path.join(out, "labelstudio", "tasks.json")))
    assert task["predictions"][0]["result"][0]["value"]["choices"] == ["good"] and "score" not in task["predictions"][0]
