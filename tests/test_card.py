import json

import pytest

from nexedge.card import CardError, ModelCard, card_path_for, load_card, read_card, verify_parent


def _card(**kw):
    return ModelCard.new(["good", "chipping", "scratch"], **kw)


def test_card_roundtrip_and_sha(tmp_path):
    art = tmp_path / "m.onnx"
    art.write_bytes(b"model-bytes")
    card = _card(resize=(64, 64), crop=(56, 56), crop_mode="ten")
    path = card.save_for(str(art))
    assert path == str(tmp_path / "m.card.json")
    loaded = load_card(str(art))
    assert loaded.classes == ["good", "chipping", "scratch"]
    assert loaded.good_index == 0
    assert loaded.input["crop_mode"] == "ten"
    assert loaded.model_id.startswith("m.onnx@")


def test_card_rejects_tampered_artifact(tmp_path):
    art = tmp_path / "m.onnx"
    art.write_bytes(b"model-bytes")
    _card().save_for(str(art))
    art.write_bytes(b"other-bytes")
    with pytest.raises(CardError) as e:
        load_card(str(art))
    assert "artifact.sha256" in str(e.value) and "m.card.json" in str(e.value)


def test_card_missing_names_file(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"model-bytes")
    with pytest.raises(CardError, match="card missing"):
        load_card(str(tmp_path / "x.onnx"))


def test_missing_artifact_is_reported_as_missing_not_as_missing_card(tmp_path):
    with pytest.raises(FileNotFoundError, match="x.onnx: no such file"):
        load_card(str(tmp_path / "x.onnx"))


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("good_class", "ok", "good_class"),
        ("classes", ["good"], "classes"),
        ("schema", "other/9", "schema"),
    ],
)
def test_card_validation_names_field(tmp_path, field, value, needle):
    data = _card().data
    data[field] = value
    p = tmp_path / "bad.card.json"
    p.write_text(json.dumps(data))
    with pytest.raises(CardError) as e:
        read_card(str(p))
    assert needle in str(e.value) and "bad.card.json" in str(e.value)


def test_card_bad_input_geometry():
    data = _card().data
    data["input"]["crop"] = [300, 300]
    with pytest.raises(CardError, match="input.crop"):
        ModelCard(data).validate()
    data = _card().data
    data["input"]["crop_mode"] = "seven"
    with pytest.raises(CardError, match="crop_mode"):
        ModelCard(data).validate()


def test_derive_and_parent(tmp_path):
    pt = tmp_path / "m.pt"
    pt.write_bytes(b"ckpt")
    parent = _card()
    parent.save_for(str(pt))
    child = parent.derive("onnx")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"graph")
    child.save_for(str(onnx))
    verify_parent(load_card(str(onnx)), str(pt))
    pt.write_bytes(b"changed")
    with pytest.raises(CardError, match="parent.sha256"):
        verify_parent(load_card(str(onnx)), str(pt))


def test_operating_point_lookup():
    card = _card()
    card.data["operating_points"] = [{"target_tpr": 0.995, "threshold": 0.2}, {"target_tpr": 1.0, "threshold": 0.05}]
    assert card.operating_point(99.5)["threshold"] == 0.2
    assert card.operating_point(1.0)["threshold"] == 0.05
    with pytest.raises(CardError, match="0.991"):
        card.operating_point(0.991)


def test_card_path_for():
    assert card_path_for("a/b/x.int8.onnx") == "a/b/x.int8.card.json"


def _ops(thresholds=(0.6, 0.4)):
    return [{"target_tpr": t, "threshold": th, "tpr": t, "fpr": 0.1, "n_good": 3, "n_defects": 2}
            for t, th in zip((0.9, 0.99), thresholds)]


def test_writers_validate_where_called_and_leave_the_card_unchanged_on_error():
    card = ModelCard.new(["good", "bad"])
    card.set_operating_points(_ops(), {"status": "measured", "split": "val", "n_good": 3, "n_defects": 2})
    before = json.loads(card.to_json())
    with pytest.raises(CardError, match=r"operating_points\[1\].threshold"):
        card.set_operating_points(_ops((0.4, 0.6)), {"status": "measured"})  # higher TPR, higher threshold
    with pytest.raises(CardError, match="operating_points_source.status"):
        card.update_ops_source(status="guessed")
    with pytest.raises(CardError, match="graph.crops"):
        card.set_graph("seven", "images", ["logits"], 8)
    with pytest.raises(CardError, match="metrics"):
        card.update_metrics(auc=object())
    assert json.loads(card.to_json()) == before


def test_edit_groups_writes_that_only_agree_together():
    card = ModelCard.new(["good", "bad"])
    card.set_score_reference({"edges": [0.0, 0.5, 1.0], "good": [4, 0], "defect": [0, 4]})
    # alone, 3 good / 2 defects disagree with the histogram's 4 / 4 ...
    with pytest.raises(CardError, match="histogram"):
        card.set_operating_points(_ops(), {"status": "measured"})
    # ... together with their own histogram they are one valid measurement
    with card.edit():
        card.set_operating_points(_ops(), {"status": "measured"})
        card.set_score_reference({"edges": [0.0, 0.5, 1.0], "good": [3, 0], "defect": [0, 2]}, {"gray": {}})
    assert card.operating_points[0]["n_good"] == 3 and card.data["image_stats"] == {"gray": {}}
    good = json.loads(card.to_json())
    with pytest.raises(CardError):
        with card.edit():
            card.set_operating_points(_ops(), {"status": "measured"})
            card.set_score_reference({"edges": [0.0, 0.5, 1.0], "good": [1, 0], "defect": [0, 1]})
    assert json.loads(card.to_json()) == good


def test_marking_from_parent_keeps_the_record_and_says_why():
    card = ModelCard.new(["good", "bad"])
    card.mark_ops_from_parent("no data")  # no operating points: nothing to mark
    assert "operating_points_source" not in card.data
    card.set_operating_points(_ops(), {"status": "measured", "split": "val"})
    card.set_cascade({"status": "measured", "bands": [{"lo": 0.1, "threshold": 0.4, "hi": 0.7}]})
    card.mark_ops_from_parent("no data")
    card.mark_cascade_from_parent("no stage-1 model")
    assert card.ops_source == {"status": "from_parent", "split": "val", "not_measured_reason": "no data",
                               "parent_status": "measured"}
    assert card.cascade["status"] == "from_parent" and card.cascade["not_measured_reason"] == "no stage-1 model"
    card.update_provenance(arch="resnet18", best_of_run="e3.pt")
    card.drop_provenance("best_of_run")
    assert card.provenance == {"arch": "resnet18"}
