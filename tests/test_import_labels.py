"""nexedge import-labels: validation with line numbers, atomicity, duplicates, provenance, relabel moves."""

import hashlib
import json
import os

import pytest

from nexedge.cli import main
from nexedge.relabel import importer
from nexedge.relabel.formats import export_formats, read_pull_manifest
from nexedge.relabel.importer import import_labels
from nexedge.relabel.pull import LocalSource, pull
from nexedge.relabel.review import export_mislabels
from nexedge.store import SampleStore


def make_dataset(root, with_manifest=True):
    rows = []
    for split in ("train", "val"):
        for cls in ("good", "scratch"):
            os.makedirs(os.path.join(root, split, cls))
            for i in range(2):
                rel = f"{split}/{cls}/{cls}{i}.png"
                with open(os.path.join(root, rel), "wb") as f:
                    f.write(f"{split}-{cls}-{i}".encode() * 20)
                rows.append({"path": rel, "split": split, "label": cls, "true_label": cls})
    if with_manifest:
        with open(os.path.join(root, "manifest.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f == ".import.lock":
                continue
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def pulled(tmp_path, n=4, dup_of=None):
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    with SampleStore(store) as st:
        for i in range(n):
            st.add(b"new%d" % i * 30, "png", {"camera": "c0", "frame_id": str(i), "score": 0.5,
                                               "probs": {"good": 0.5, "scratch": 0.5}, "kind": "band"})
        if dup_of:
            st.add(open(dup_of, "rb").read(), "png", {"camera": "c0", "frame_id": "dup", "kind": "band"})
    pull(LocalSource(store), out)
    export_formats(out, ["labelstudio"])
    return out


def ls_export(tasks_path, labels, annotator="alice@example.com"):
    """A Label Studio JSON export of our tasks: each task gains an 'annotations' list."""
    tasks = json.load(open(tasks_path))
    out = []
    for i, (t, lab) in enumerate(zip(tasks, labels), 1):
        t = dict(t, id=i)
        if lab is not None:
            t["annotations"] = [{
                "id": 100 + i, "completed_by": {"id": 7, "email": annotator}, "was_cancelled": False,
                "created_at": "2026-11-28T10:00:00Z", "updated_at": "2026-11-28T10:00:00Z",
                "result": [{"id": "r1", "from_name": "label", "to_name": "image", "type": "choices",
                            "value": {"choices": [lab]}}],
            }]
        out.append(t)
    return out


def write_json_lines(path, tasks):
    """One task per line so line numbers are easy to predict."""
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(t) for t in tasks) + "\n]\n")


def test_label_studio_export_adds_images_with_provenance_and_skips_duplicates(tmp_path):
    ds = str(tmp_path / "ds")
    make_dataset(ds)
    out = pulled(tmp_path, dup_of=os.path.join(ds, "train/good/good0.png"))
    exp = str(tmp_path / "export.json")
    write_json_lines(exp, ls_export(os.path.join(out, "labelstudio/tasks.json"),
                                    ["scratch", "good", None, "scratch", "good"]))
    assert main(["import-labels", exp, "--dataset", ds, "--images", out]) == 0
    prov = [json.loads(x) for x in open(os.path.join(ds, "provenance.jsonl"))]
    assert [p["action"] for p in prov] == ["add", "add", "add"]
    assert {p["annotator"] for p in prov} == {"alice@example.com"} and all(p["source"] == "export.json" for p in prov)
    for p in prov:
        path = os.path.join(ds, p["path"])
        assert p["path"].startswith(f"train/{p['label']}/") and hashlib.sha256(open(path, "rb").read()).hexdigest() == p["sha256"]
    man = {r["path"]: r for r in map(json.loads, open(os.path.join(ds, "manifest.jsonl")))}
    assert all(man[p["path"]]["label"] == p["label"] for p in prov)
    from nexedge.train.data import list_classes, scan_split

    listed = {p for p, _ in scan_split(ds, "train", list_classes(ds))}
    assert {p["path"] for p in prov} <= listed  # the trainer sees the new images
    before = snapshot(ds)
    res = import_labels(exp, ds, images_dir=out)  # again: every image is already there
    assert res["counts"]["add"] == 0 and res["counts"]["duplicate"] == 4 and res["counts"]["unlabelled"] == 1
    assert snapshot(ds) == before


def test_bad_rows_are_reported_by_line_and_nothing_is_written(tmp_path):
    ds = str(tmp_path / "ds")
    make_dataset(ds)
    out = pulled(tmp_path)
    tasks = ls_export(os.path.join(out, "labelstudio/tasks.json"), ["scratch", "crack", "good", "good"])
    tasks[2]["data"]["sha256"] = "0" * 64
    tasks[2]["data"]["image"] = "/x/unknown.png"
    tasks[3]["annotations"][0]["result"][0]["value"]["choices"] = ["good", "scratch"]
    exp = str(tmp_path / "bad.json")
    write_json_lines(exp, tasks)
    before = snapshot(ds)
    with pytest.raises(ValueError) as e:
        import_labels(exp, ds, images_dir=out)
    msg = str(e.value)
    assert "3 bad row(s)" in msg and "line 3" in msg and "'crack'" in msg and "line 4" in msg and "line 5" in msg
    assert "line 2" not in msg
    assert snapshot(ds) == before
    res = import_labels(exp, ds, images_dir=out, skip_bad=True)
    assert res["counts"]["add"] == 1 and res["counts"]["bad"] == 3


def test_csv_labels_paths_conflicts_and_traversal(tmp_path):
    ds = str(tmp_path / "ds")
    make_dataset(ds, with_manifest=False)
    imgs = tmp_path / "incoming"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"{i}.png").write_bytes(b"incoming%d" % i * 10)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label,annotator\nincoming/0.png,../../etc,bob\nincoming/1.png,good,bob\n"
                        "incoming/1.png,scratch,eve\nincoming/9.png,good,bob\n")
    with pytest.raises(ValueError) as e:
        import_labels(str(csv_path), ds)
    msg = str(e.value)
    assert "line 2: label '../../etc' is not a class" in msg and "line 4: same image as line 3" in msg
    assert "line 5: image 'incoming/9.png' not found" in msg
    assert not os.path.exists(os.path.join(ds, "provenance.jsonl"))
    csv_path.write_text("path,label\nincoming/0.png,scratch\nincoming/2.png,good\n")
    res = import_labels(str(csv_path), ds, split="val", dry_run=True)
    assert res["counts"]["add"] == 2 and not os.path.exists(os.path.join(ds, "provenance.jsonl"))
    res = import_labels(str(csv_path), ds, split="val")
    assert res["counts"]["add"] == 2
    assert len(os.listdir(os.path.join(ds, "val", "scratch"))) == 3


def test_failure_while_copying_leaves_no_files(tmp_path, monkeypatch):
    ds = str(tmp_path / "ds")
    make_dataset(ds)
    out = pulled(tmp_path)
    exp = str(tmp_path / "export.json")
    write_json_lines(exp, ls_export(os.path.join(out, "labelstudio/tasks.json"), ["scratch"] * 4))
    before = snapshot(ds)
    real = importer.write_atomic
    calls = []

    def failing(path, data):  # injected disk error on the third copy
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(importer, "write_atomic", failing)
    with pytest.raises(OSError):
        import_labels(exp, ds, images_dir=out)
    assert snapshot(ds) == before  # no temp files, no partial images, no provenance
    # an import killed mid-copy leaves temp files; the next import clears them
    leftover = os.path.join(ds, "train", "good", ".tmp-import-deadbeef")
    open(leftover, "wb").write(b"half")
    monkeypatch.setattr(importer, "write_atomic", real)
    assert import_labels(exp, ds, images_dir=out)["counts"]["add"] == 4
    assert not os.path.exists(leftover)


def test_mislabel_review_round_trip_moves_files_between_class_folders(tmp_path):
    ds = str(tmp_path / "ds")
    make_dataset(ds)
    csv_path = tmp_path / "mislabels_train.csv"
    csv_path.write_text("rank,path,given_label,direction,suspicion,defect_score,flagged\n"
                        "1,train/good/good1.png,good,good->defect,0.97,0.97,1\n"
                        "2,train/scratch/scratch0.png,scratch,defect->good,0.91,0.09,1\n")
    review = str(tmp_path / "review")
    export_mislabels(str(csv_path), ds, review)
    export_formats(review, ["labelstudio"])
    rows = read_pull_manifest(review)
    assert [r["dataset_path"] for r in rows] == ["train/good/good1.png", "train/scratch/scratch0.png"]
    exp = str(tmp_path / "reviewed.json")
    # the annotator moves good1 to scratch and confirms scratch0
    write_json_lines(exp, ls_export(os.path.join(review, "labelstudio/tasks.json"), ["scratch", "scratch"]))
    res = import_labels(exp, ds, images_dir=review)
    assert res["counts"]["relabel"] == 1 and res["counts"]["confirm"] == 1
    assert not os.path.exists(os.path.join(ds, "train/good/good1.png"))
    assert os.path.exists(os.path.join(ds, "train/scratch/good1.png"))
    prov = [json.loads(x) for x in open(os.path.join(ds, "provenance.jsonl"))]
    assert prov[0]["action"] == "relabel" and prov[0]["from_path"] == "train/good/good1.png"
    assert prov[0]["previous_label"] == "good" and prov[1]["action"] == "confirm"
    man = {r["path"]: r for r in map(json.loads, open(os.path.join(ds, "manifest.jsonl")))}
    assert man["train/scratch/good1.png"]["label"] == "scratch" and "train/good/good1.png" not in man
    assert man["train/scratch/good1.png"]["true_label"] == "good"  # ground truth untouched


def test_json_min_export_and_clear_errors(tmp_path):
    ds = str(tmp_path / "ds")
    make_dataset(ds)
    out = pulled(tmp_path, n=2)
    rows = read_pull_manifest(out)
    exp = tmp_path / "min.json"
    exp.write_text(json.dumps([{"id": 1, "image": "/data/upload/1/5a3b-" + os.path.basename(rows[0]["path"]),
                                "label": "scratch", "annotator": "carol"},
                               {"id": 2, "image": "/x/" + os.path.basename(rows[1]["path"])}]))
    res = import_labels(str(exp), ds, images_dir=out)
    assert res["counts"]["add"] == 1 and res["counts"]["unlabelled"] == 1
    with pytest.raises(FileNotFoundError):
        import_labels(str(tmp_path / "none.json"), ds)
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(ValueError, match="JSON array"):
        import_labels(str(tmp_path / "obj.json"), ds)
    with pytest.raises(ValueError, match="split"):
        import_labels(str(exp), ds, split="holdout")
    # Label Studio's CSV export: the image URL column carries the content hash
    lscsv = tmp_path / "ls.csv"
    lscsv.write_text("image,id,label,annotator\n" + f"/data/local-files/?d=x/{os.path.basename(rows[1]['path'])},2,good,dan\n")
    res = import_labels(str(lscsv), ds, images_dir=out)
    assert res["counts"]["add"] == 1
