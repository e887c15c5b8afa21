"""nexedge demo: the stage runner, the verdict summary, and a real end-to-end run at --tiny size."""

import json
import os

import pytest

from nexedge.cli import main
from nexedge.demo import line as demo_line
from nexedge.demo import run as demo_run
from nexedge.demo import stages
from nexedge.demo.cli import configure_demo
from nexedge.demo.context import Demo
from nexedge.demo.profiles import resolve_settings


def test_stage_runner_stops_at_the_first_failure_and_cleans_up(tmp_path):
    lines = []

    class Out:
        def write(self, s):
            lines.append(s)

        def flush(self):
            pass

    demo = Demo(str(tmp_path), {}, stream=Out())
    ran, cleaned = [], []

    def ok(d):
        ran.append("a")
        d.cleanups.append(lambda: cleaned.append("a"))

    def boom(d):
        raise RuntimeError("piece missing")

    def never(d):
        ran.append("c")

    records = []
    with pytest.raises(RuntimeError, match="piece missing"):
        demo_run.run_stages(demo, [("a", "first", ok), ("b", "second", boom), ("c", "third", never)], records)
    assert ran == ["a"] and cleaned == ["a"]
    assert [(r["stage"], r["status"]) for r in records] == [("a", "ok"), ("b", "FAILED")]
    assert "piece missing" in records[1]["error"]
    assert any("[2/3] b" in s for s in lines)


def test_missing_command_fails_loudly():
    with pytest.raises(RuntimeError, match="no `nexedge no-such-stage` command"):
        stages._require("no-such-stage")


def test_demo_refuses_a_used_run_folder_and_bad_sizes(tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    assert main(["demo", "--tiny", "--out", str(tmp_path)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x").read_text() == "keep me"
    assert main(["demo", "--tiny", "--images", "5", "--out", str(tmp_path / "new")]) == 1
    assert "at least 40 images" in capsys.readouterr().err


def test_verdict_summary_counts_confusion_and_latency():
    images = [("a", "good"), ("b", "good"), ("c", "good"), ("d", "scratch"), ("e", "chipping"), ("f", "chipping")]
    dec = ["PASS", "REJECT", "PASS", "REJECT", "PASS", "RECHECK"]
    verdicts = {i: {"frame_id": i, "decision": d, "latency_ms": float(i + 1), "rtt_ms": 10.0 + i,
                    "uncertain": i in (1, 4), "reason": "deadline_passed" if d == "RECHECK" else "",
                    "threshold": 0.5, "model_id": "m@1234"} for i, d in enumerate(dec)}
    s = demo_line.summarize_verdicts(images, verdicts, wall=2.0)
    assert s["decisions"] == {"PASS": 3, "REJECT": 2, "RECHECK": 1}
    assert s["binary"]["good"] == {"PASS": 2, "REJECT": 1, "RECHECK": 0}
    assert s["binary"]["defect"] == {"PASS": 1, "REJECT": 1, "RECHECK": 1}
    assert s["escapes"] == 1 and s["escape_rate"] == pytest.approx(1 / 3)
    assert s["overkill"] == 1 and s["overkill_rate"] == pytest.approx(1 / 3)
    assert s["per_class"]["chipping"] == {"PASS": 1, "REJECT": 0, "RECHECK": 1}
    assert s["recheck_reasons"] == {"deadline_passed": 1} and s["uncertain"] == 2
    assert s["daemon_latency_ms"]["max"] == 6.0 and s["client_rtt_ms"]["median"] == 12.0
    assert s["frames_per_s"] == 3.0
    text = "\n".join(demo_line.format_verdicts(s))
    assert "PASS 3  REJECT 2  RECHECK 1" in text and "escapes (defect PASSed): 1 (33.3%)" in text


def _demo_args(*argv):
    import argparse

    p = argparse.ArgumentParser()
    configure_demo(p)
    return p.parse_args(list(argv))


def test_demo_default_is_the_pretrained_lite0_on_the_full_class_mix():
    s = resolve_settings(_demo_args())
    assert s["profile"] == "default" and s["arch"] == "efficientnet_lite0" and s["pretrained"] == "imagenet"
    assert not s.get("class_counts") and s["good_fraction"] == 0.5  # every class of the batch, chipping too
    assert s["freeze"] > 0 and s["channels_last"] and s["val_crop"] == "center"
    old = resolve_settings(_demo_args("--arch", "small_max"))
    assert old["profile"] == "small_max" and old.get("pretrained", "none") == "none"
    assert old["arch"] == "small_max" and "chipping" not in old["class_counts"]
    other = resolve_settings(_demo_args("--arch", "resnet18"))
    assert other["arch"] == "resnet18" and other["pretrained"] == "none" and other["freeze"] == 0


def test_verdict_summary_prints_escapes_per_class_and_the_tpr_lower_bound():
    images = [("a", "good"), ("b", "good"), ("c", "chipping"), ("d", "scratch"), ("e", "scratch")]
    dec = ["PASS", "REJECT", "REJECT", "PASS", "REJECT"]
    verdicts = {i: {"frame_id": i, "decision": d, "latency_ms": 1.0, "threshold": 0.3, "model_id": "m"}
                for i, d in enumerate(dec)}
    s = demo_line.summarize_verdicts(images, verdicts, wall=1.0)
    s["operating_point"] = {"target_tpr": 1.0, "threshold": 0.3, "tpr": 1.0, "fpr": 0.25, "tpr_lower95": 0.9624,
                            "n_defects": 78, "n_good": 100}
    text = "\n".join(demo_line.format_verdicts(s))
    assert "escapes per class: chipping 0/1, scratch 1/2" in text
    assert "overkill per class: good 1/2 REJECTed" in text
    assert "95 % lower bound 96.2 %, 78 defects" in text
    # 1/79 of a new defect escapes a threshold that caught all 78 on average over validation draws; this one
    # threshold guarantees at most 1 - 0.9624 with 95 % confidence, printed beside it
    assert "expected escape rate 1.27 % (mean over validation draws" in text
    assert "at most 3.76 % with 95 % confidence (1 - TPR lower bound); in 3 new defects: 0.0 expected, at most 0.1" \
        in text


@pytest.mark.slow
def test_demo_tiny_runs_the_real_pipeline_end_to_end(tmp_path, capsys):
    import torch

    torch.set_num_threads(1)
    out = tmp_path / "run"
    rc = main(["demo", "--tiny", "--threads", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    summary = json.loads((out / "demo-summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == [s[0] for s in demo_run.stages()]
    assert all(r["status"] == "ok" for r in summary["stages"])
    res = summary["results"]
    n_test = res["data"]["counts"]["test"]
    st = res["stream"]
    assert st["frames"] == n_test == sum(st["decisions"].values())
    assert sum(sum(r.values()) for r in st["per_class"].values()) == n_test
    assert st["decisions"]["RECHECK"] == 0, st["recheck_reasons"]
    assert st["daemon_latency_ms"]["p99"] > 0
    assert res["daemon"]["exit_status"] == 0
    # the deployed crops were measured (`export --crops auto`), not assumed; TenCrop is no candidate for a
    # model trained without mirrors; they are scored once, on the exported artifact (not again in torch)
    chosen = res["export"]["crops"]
    sel = res["export"]["crop_selection"]
    assert chosen == sel["chosen"]["crops"] and {r["crops"] for r in sel["candidates"]} == {"center", "five"}
    crops = res["eval"]["crops"]
    assert set(crops) == {"center", f"{chosen} (ORT fp32)"}, crops
    assert crops[f"{chosen} (ORT fp32)"]["auc"] == res["int8"]["metrics"]["auc_fp32"]
    from nexedge.card import OPS_MEASURED, load_card

    # validation during training is one CenterCrop pass; the deployed artifact's operating points are
    # measured on the artifact itself, with its own crops
    assert load_card(res["train"]["best"], verify=False).input["crop_mode"] == "center"
    for art in (res["export"]["onnx"], res["int8"]["onnx"]):
        card = load_card(art)
        assert card.runtime_crop_mode == chosen and card.ops_source["crop_mode"] == chosen, card.ops_source
        assert card.ops_source["status"] == OPS_MEASURED and card.ops_source["split"] == "val"
    for path in (res["train"]["best"], res["export"]["onnx"], res["int8"]["onnx"], res["daemon"]["config"],
                 res["daemon"]["log"]):
        assert os.path.exists(path) and path.startswith(str(out))
    # every uncertain verdict was stored by the daemon and pulled out (manifest rows = images pulled)
    manifest = out / "pulled" / "manifest.jsonl"
    rows = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()] if manifest.exists() else []
    assert res["pull"]["samples"] == len(rows) >= st["uncertain"]
    assert "verdict summary" in text and "stage timings" in text and "total" in text


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
