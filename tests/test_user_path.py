"""Issue 14: the traps a new user met with their own class folders, one CLI-level test per item.

The data set is tests/support/userdata.py: three classes with ``ok`` as the negative class, PNG and
JPEG, non-ASCII names, a corrupt PNG, a text file, Thumbs.db and an empty class folder.
"""

import csv
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import yaml

from nexedge.cli import main
from tests.support.daemon import base_config, running
from tests.support.userdata import CORRUPT, make_user_dataset


def _train(epochs: int = 2) -> list:
    # --flip h: the model sees mirrored images in training, so the TenCrop export (mirrored crops) is allowed
    return ["--arch", "tiny", "--resize", "48", "--crop", "40", "--epochs", str(epochs), "--batch-size", "16",
            "--lr", "0.05", "--no-test-curves", "--flip", "h"]


TRAIN = _train()


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """photos/ (as delivered), data/ (split), run/ (trained) and run/best.ten.onnx."""
    root = tmp_path_factory.mktemp("user")
    photos, data, run = str(root / "photos"), str(root / "data"), str(root / "run")
    make_user_dataset(photos)
    old = os.umask(0o022)
    try:
        assert main(["split", photos, data, "--good-class", "ok", "--no-progress"]) == 0
        assert main(["train", "--data", data, "--out", run, "--no-progress"] + TRAIN) == 0
        assert main(["export", run, "--crops", "ten", "--parity-data", data]) == 0
    finally:
        os.umask(old)
    return {"root": str(root), "photos": photos, "data": data, "run": run,
            "onnx": os.path.join(run, "best.ten.onnx")}


def _err(capsys):
    return capsys.readouterr().err


# -- 1. a second run into the same --out -----------------------------------------------------
def test_train_refuses_a_used_run_folder_unless_overwrite(user, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--data", user["data"], "--out", out, "--no-progress"] + TRAIN) == 0
    capsys.readouterr()
    assert main(["train", "--data", user["data"], "--out", out, "--no-progress"] + _train(1)) == 1
    err = _err(capsys)
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert main(["train", "--data", user["data"], "--out", out, "--overwrite", "--no-progress"] + _train(1)) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["epochs"] == 1 and summary["best"]["epoch"] == 1
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt_e") and f.endswith(".pt")) == ["ckpt_e001.pt"]
    # --overwrite never deletes what a run did not write
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "my.txt").write_text("keep")
    assert main(["train", "--data", user["data"], "--out", str(tmp_path / "notes"), "--overwrite"] + TRAIN) == 1
    assert "my.txt" in _err(capsys) and (tmp_path / "notes" / "my.txt").exists()


# -- 2. calibrate on other classes / over an earlier INT8 model --------------------------------
def test_calibrate_refuses_other_classes_and_overwriting(user, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(user["data"], other)
    for split in ("train", "val", "test"):
        os.rename(other / split / "ok", other / split / "good")
    onnx = str(tmp_path / "m.onnx")
    shutil.copy(user["onnx"], onnx)
    shutil.copy(user["onnx"].replace(".onnx", ".card.json"), onnx.replace(".onnx", ".card.json"))
    calib = ["--images", "16", "--targets", "ort", "--calib-root", str(tmp_path / "calibrate")]
    assert main(["calibrate", onnx, "--data", str(other)] + calib) == 1
    err = _err(capsys)
    assert "['chip', 'good', 'scratch']" in err and "['chip', 'ok', 'scratch']" in err
    assert not os.path.exists(str(tmp_path / "m.int8-ort.onnx"))
    assert main(["calibrate", onnx, "--data", user["data"]] + calib) == 0
    first = os.path.getmtime(str(tmp_path / "m.int8-ort.onnx"))
    assert main(["calibrate", onnx, "--data", user["data"]] + calib) == 1
    assert "--force" in _err(capsys) and os.path.getmtime(str(tmp_path / "m.int8-ort.onnx")) == first
    assert main(["calibrate", onnx, "--data", user["data"], "--force"] + calib) == 0


# -- 3. a negative class that is not called "good" ---------------------------------------------
def test_mislabel_review_and_cleanlab_with_ok_as_negative_class(user, tmp_path, capsys):
    csv_path = str(tmp_path / "m.csv")
    assert main(["mislabels", user["run"], "--data", user["data"], "--out", csv_path, "--top", "6",
                 "--no-progress"]) == 0
    rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    assert {"p_chip", "p_ok", "p_scratch"} <= set(rows[0])
    out = str(tmp_path / "review")
    assert main(["pull", "--mislabels", csv_path, "--dataset", user["data"], "--out", out,
                 "--format", "cleanlab,labelstudio"]) == 0
    probs = np.load(os.path.join(out, "cleanlab", "pred_probs.npy"))
    assert probs.shape == (6, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # without probabilities, a defect->good row is predicted as the data set's negative class, "ok"
    slim = str(tmp_path / "slim.csv")
    with open(slim, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["rank", "path", "given_label", "direction", "flagged"])
        r = next(r for r in rows if r["direction"] == "defect->good") if any(
            r["direction"] == "defect->good" for r in rows) else None
        path = r["path"] if r else next(p for p in _dataset_images(user["data"], "train") if "/chip/" in p)
        w.writerow([1, path, "chip", "defect->good", 1])
    out2 = str(tmp_path / "review2")
    assert main(["pull", "--mislabels", slim, "--dataset", user["data"], "--out", out2, "--format", "labelstudio"]) == 0
    (task,) = json.load(open(os.path.join(out2, "labelstudio", "tasks.json")))
    assert task["predictions"][0]["result"][0]["value"]["choices"] == ["ok"]


def _dataset_images(root, split):
    return sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                  for d, _, fs in os.walk(os.path.join(root, split)) for f in fs)


# -- 4. ties, best.pt, run folders as arguments ------------------------------------------------
def test_ties_on_val_auc_go_to_lower_val_loss_then_the_later_epoch(tmp_path):
    from nexedge.train.cardbuild import TopK

    tk = TopK(str(tmp_path), k=3)
    for epoch, auc, loss in [(1, 1.0, 0.9), (2, 1.0, 0.4), (3, 1.0, 0.4), (4, 0.9, 0.1)]:
        if tk.wants(auc, loss, epoch):
            tk.add(f"ckpt_e{epoch:03d}.pt", epoch, auc, loss)
    assert [e["epoch"] for e in tk.entries] == [3, 2, 1]


def test_best_pt_and_run_folders_for_export_eval_mislabels(user, tmp_path, capsys):
    run = user["run"]
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["best_file"] == "best.pt" and "val loss" in summary["best_rule"]
    from nexedge.card import load_card

    card = load_card(os.path.join(run, "best.pt"))  # its own card, sha256 verified
    assert card.data["provenance"]["best_of_run"] == summary["best"]["file"]
    assert os.path.exists(user["onnx"])  # `nexedge export RUN` used best.pt
    assert main(["mislabels", run, "--data", user["data"], "--out", str(tmp_path / "m.csv"), "--no-progress"]) == 0
    assert "with best.pt" in capsys.readouterr().out
    assert main(["export", str(tmp_path)]) == 1
    assert "without checkpoints" in _err(capsys)
    run = str(tmp_path / "copy")
    shutil.copytree(user["run"], run)
    assert main(["thresholds", run, "--data", user["data"]]) == 0
    assert "best.card.json" in capsys.readouterr().out


# -- 6. every config path relative to the config file ----------------------------------------
def test_store_path_resolves_against_the_config_file_not_the_cwd(user, tmp_path, monkeypatch, capsys):
    from nexedge.serve.daemon import main as daemon_main

    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(user["onnx"], etc / "m.onnx")
    shutil.copy(user["onnx"].replace(".onnx", ".card.json"), etc / "m.card.json")
    cfg = base_config("m.onnx", store={"path": "samples"}, auth=None)
    cfg.pop("auth")
    (etc / "line.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert daemon_main(["--config", str(etc / "line.yaml"), "--check-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["store"]["path"] == str(etc / "samples")
    assert printed["model"]["path"] == str(etc / "m.onnx")
    unit = open(os.path.join(os.path.dirname(__file__), "..", "deploy", "nexedge-daemon.service")).read()
    assert "StateDirectory=nexedge" in unit and "WorkingDirectory=/var/lib/nexedge" in unit


# -- 7. --check-config checks the files ---------------------------------------------------------
def test_check_config_fails_for_a_missing_or_unreadable_model(user, tmp_path, capsys):
    from nexedge.serve.daemon import main as daemon_main

    cfg = tmp_path / "line.yaml"
    cfg.write_text(yaml.safe_dump(base_config("missing.onnx")))
    assert daemon_main(["--config", str(cfg), "--check-config"]) == 2
    assert "model.path" in capsys.readouterr().err
    shutil.copy(user["onnx"], tmp_path / "m.onnx")
    card = tmp_path / "m.card.json"
    shutil.copy(user["onnx"].replace(".onnx", ".card.json"), card)
    cfg.write_text(yaml.safe_dump(base_config("m.onnx")))
    assert daemon_main(["--config", str(cfg), "--check-config"]) == 0
    capsys.readouterr()
    try:
        import pwd

        pwd.getpwnam("nobody")
    except (ImportError, KeyError):
        pytest.skip("no user 'nobody' to check permissions for")
    os.chmod(tmp_path, 0o755)
    os.chmod(card, 0o600)  # what mkstemp gave cards before: unreadable to the service user
    if os.stat(card).st_uid == pwd.getpwnam("nobody").pw_uid:
        pytest.skip("running as nobody")
    assert daemon_main(["--config", str(cfg), "--check-config", "--user", "nobody"]) == 2
    err = capsys.readouterr().err
    assert "m.card.json is not readable by user 'nobody'" in err


# -- 8. data as it really arrives -----------------------------------------------------------------
def test_split_verifies_images_and_reports_what_it_left_out(user, tmp_path):
    report = json.load(open(os.path.join(user["data"], "split_report.json")))
    assert [r["path"] for r in report["unreadable"]] == [CORRUPT.replace(os.sep, "/")]
    skipped = {r["path"] for r in report["skipped"]}
    assert {"ok/notes.txt", "ok/Thumbs.db", "unsortiert/"} <= skipped
    assert not any(CORRUPT.split(os.sep)[-1] in p for p in _dataset_images(user["data"], "train")
                   + _dataset_images(user["data"], "val") + _dataset_images(user["data"], "test"))
    info = json.load(open(os.path.join(user["data"], "dataset.json")))
    assert info["good_class"] == "ok" and info["n_unreadable"] == 1
    # the CLI without a TTY: no OpenCV warnings, no carriage returns, the bad file named
    r = subprocess.run([sys.executable, "-m", "nexedge.cli", "split", user["photos"], str(tmp_path / "d2")],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=_pypath()))
    assert r.returncode == 0, r.stderr
    assert "WARN" not in r.stderr and "libpng" not in r.stderr and "\r" not in r.stderr
    assert "Kratzer_kaputt.png" in r.stdout


def _pypath():
    return os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            os.environ.get("PYTHONPATH", "")])


def test_training_skips_and_counts_a_file_that_became_unreadable(user, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(user["data"], data)
    shutil.copy(os.path.join(user["photos"], CORRUPT), data / "train" / "scratch" / "later_broken.png")
    out = str(tmp_path / "run")
    assert main(["train", "--data", str(data), "--out", out, "--no-progress"] + TRAIN) == 0
    assert "skipped unreadable image" in capsys.readouterr().out
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert [os.path.basename(p) for p in summary["unreadable"]] == ["later_broken.png"]


def test_camera_sim_skips_an_unreadable_file(user, tmp_path):
    from nexedge.serve.camerasim import load_images

    folder = tmp_path / "imgs"
    shutil.copytree(os.path.join(user["data"], "test"), folder)
    shutil.copy(os.path.join(user["photos"], CORRUPT), folder / "scratch" / "broken.png")
    skipped = []
    images = load_images(str(folder), skipped=skipped)
    assert [os.path.basename(p) for p in skipped] == ["broken.png"]
    assert len(images) == len(_dataset_images(user["data"], "test"))
    assert {im.label for im in images} == {"chip", "ok", "scratch"}


# -- 9. artifacts with the user's umask -------------------------------------------------------------
def test_cards_and_checkpoints_get_the_umask_not_0600(user):
    for name in ("best.pt", "best.card.json", "last.pt", "topk.json", "summary.json", "best.ten.card.json"):
        mode = stat.S_IMODE(os.stat(os.path.join(user["run"], name)).st_mode)
        assert mode == 0o644, (name, oct(mode))


# -- 10. eval: the best checkpoint, a confusion matrix, escapes and overkill ------------------------
def test_eval_shows_best_checkpoint_confusion_and_operating_point(user, tmp_path, capsys):
    run2 = str(tmp_path / "run2")
    shutil.copytree(user["run"], run2)
    assert main(["eval", user["run"], "--data", user["data"], "--crops", "center,ten", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "deployed model: " in out and "confusion matrix" in out and "recall" in out
    assert "escapes (defects PASSed)" in out and "overkill (ok REJECTed)" in out
    own = os.path.join(user["run"], "eval_test", "eval.json")
    res = json.load(open(own))
    best = next(iter(res["runs"].values()))["best"]
    n_test = len(_dataset_images(user["data"], "test"))
    assert sum(map(sum, best["confusion"])) == n_test
    assert best["operating_point"]["escapes"] + sum(
        best["operating_point"]["per_class"][c]["REJECT"] for c in ("chip", "scratch")) == best["operating_point"]["n_defects"]
    before = open(own).read()
    assert main(["eval", user["run"], run2, "--data", user["data"], "--crops", "center", "--no-progress"]) == 0
    assert "wrote " + os.path.join(os.path.dirname(user["run"]), "compare_test_") in capsys.readouterr().out
    assert open(own).read() == before  # the comparison did not overwrite the first run's eval


# -- 11 and 14 (daemon side): camera-sim by folder label, RECHECK reasons ----------------------------
def test_camera_sim_prints_decisions_by_folder_label(user, capsys):
    with running(user["onnx"]) as d:
        assert main(["camera-sim", os.path.join(user["data"], "test"), "--connect", d.endpoints["frames"],
                     "--cameras", "2", "--frames", "5", "--rate", "0", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["good_class"] == "ok"  # from the data set's dataset.json
    assert set(s["by_label"]) == {"chip", "ok", "scratch"}
    assert s["escapes"] == sum(s["by_label"][c].get("PASS", 0) for c in ("chip", "scratch"))
    assert s["overkill"] == s["by_label"]["ok"].get("REJECT", 0)


def test_daemon_answers_corrupt_png_and_text_with_recheck_undecodable(user):
    from nexedge.serve.client import CameraClient

    corrupt = open(os.path.join(user["photos"], CORRUPT), "rb").read()
    with running(user["onnx"]) as d, CameraClient(d.endpoints["frames"], "cam1") as cam:
        v1 = cam.wait_for(cam.send(corrupt), 10000)
        v2 = cam.wait_for(cam.send(b"Lot 4711, shift B\n"), 10000)
    assert (v1["decision"], v1["reason"]) == ("RECHECK", "undecodable")
    assert (v2["decision"], v2["reason"]) == ("RECHECK", "undecodable")


def test_imagezmq_numeric_frame_id_is_an_int():
    from nexedge.serve import protocol

    seq = protocol.SeqCounter()
    req = protocol.parse_body([b"i", b""], [json.dumps({"msg": "cam1|12"}).encode(), b"x"], seq)
    auto = protocol.parse_body([b"i", b""], [json.dumps({"msg": "cam1"}).encode(), b"x"], seq)
    named = protocol.parse_body([b"i", b""], [json.dumps({"msg": "cam1|a7"}).encode(), b"x"], seq)
    assert (req.frame_id, auto.frame_id, named.frame_id) == (12, 1, "a7")


def test_plots_have_labels_separate_axes_and_no_empty_zoom(user, tmp_path, monkeypatch):
    import matplotlib.figure

    from nexedge.train.history import History
    from nexedge.train.plots import plot_history, plot_roc

    figs = {}
    real = matplotlib.figure.Figure.savefig

    def keep(self, path, *a, **k):
        figs[os.path.basename(str(path))] = self
        return real(self, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    plot_history(History(user["run"]), ["chip", "ok", "scratch"], "ok", str(tmp_path))
    plot_roc({"r": [(np.array([0, 0.5, 1]), np.array([0, 1, 1]))]}, str(tmp_path / "roc.png"), n_defects=4)
    for name, fig in figs.items():
        for ax in fig.axes:
            if ax.get_visible() and ax.axison and ax.lines:
                assert ax.get_xlabel() or ax.get_shared_x_axes().get_siblings(ax) != [ax], (name, ax.get_title())
                assert ax.get_ylabel(), (name, ax.get_title())
    binary = [ax for ax in figs["curves_margin.png"].axes if ax.get_ylabel() == "binary accuracy"]
    assert len(binary) == 1  # accuracy on its own axis beside the margin
    assert len(figs["roc.png"].axes) == 1  # 4 defects: no empty high-TPR panel


# -- 13. progress without a terminal ---------------------------------------------------------------
def test_no_progress_bars_into_a_log(user, tmp_path, capsys):
    assert main(["eval", user["run"], "--data", user["data"], "--crops", "center", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err  # pytest's stderr is not a terminal, like a log file
    assert "\r" not in err
    assert "test: " in err and " in " in err  # one line per scored checkpoint instead


# -- 14. messages ---------------------------------------------------------------------------------------
def test_messages_name_the_real_problem(user, tmp_path, capsys):
    script = tmp_path / "make_data.py"
    script.write_text("print('hi')\n")
    assert main(["split", str(script), str(tmp_path / "out")]) == 1
    assert "is a file; expected a folder" in _err(capsys)
    assert main(["camera-sim", str(script)]) == 1  # sibling: camera-sim on a file
    assert "is a file; expected a folder of images" in _err(capsys)
    assert main(["train", "--data", user["photos"], "--out", str(tmp_path / "r")]) == 1  # sibling: unsplit folders
    assert "split it first: nexedge split" in _err(capsys)
    assert main(["bench", str(tmp_path / "nope.onnx")]) == 1
    err = _err(capsys)
    assert "nope.onnx: no such file" in err and "card missing" not in err
    from nexedge.store import SampleStore

    SampleStore(str(tmp_path / "store")).close()
    assert main(["pull", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    assert "nothing pending" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    helptext = capsys.readouterr().out
    assert "(default: 30)" in helptext and "small_max" in helptext


def test_busy_pull_bind_names_the_key(tmp_path):
    import zmq

    from nexedge.serve.pullserver import PullServer
    from nexedge.store import SampleStore

    SampleStore(str(tmp_path / "s")).close()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(RuntimeError, match=rf"pull\.bind='tcp://127\.0\.0\.1:{port}'"):
            PullServer(str(tmp_path / "s"), f"tcp://127.0.0.1:{port}").start()
    finally:
        sock.close(0)
        ctx.term()


# -- 15. pull formats validated before acking; one Label Studio task per image --------------------
def test_cleanlab_from_a_line_pull_is_refused_before_anything_is_acknowledged(tmp_path, capsys):
    from nexedge.store import SampleStore

    st = SampleStore(str(tmp_path / "s"))
    png = open(_any_png(tmp_path), "rb").read()
    for i in range(3):
        st.add(png, "png", {"camera": f"cam{i}", "frame_id": i, "ts": 1.0 + i, "score": 0.5, "decision": "PASS",
                            "reason": "band", "kind": "band", "probs": {"ok": 0.5, "chip": 0.3, "scratch": 0.2}})
    st.close()
    out = str(tmp_path / "out")
    assert main(["pull", "--store", str(tmp_path / "s"), "--out", out, "--format", "cleanlab,labelstudio"]) == 1
    assert "cleanlab" in _err(capsys)
    st = SampleStore(str(tmp_path / "s"), writer=False)
    assert st.stats()["pending"] == 3  # nothing acknowledged
    st.close()
    assert main(["pull", "--store", str(tmp_path / "s"), "--out", out, "--format", "labelstudio",
                 "--no-progress"]) == 0
    tasks = json.load(open(os.path.join(out, "labelstudio", "tasks.json")))
    assert len(tasks) == 1 and len(tasks[0]["data"]["sample_ids"]) == 3


def _any_png(tmp_path):
    import cv2

    p = str(tmp_path / "x.png")
    cv2.imwrite(p, np.full((20, 30), 128, np.uint8))
    return p


# -- 16. an annotator's correction of a data-set image -----------------------------------------------
def test_import_relabel_moves_a_corrected_dataset_image_and_recounts(user, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(user["data"], data)
    src = next(p for p in _dataset_images(str(data), "train") if "/ok/" in p)
    pulled = tmp_path / "pulled" / "images"
    pulled.mkdir(parents=True)
    shutil.copy(data / src, pulled / "copy.png")  # the same bytes, as a pull folder would hold them
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{pulled / 'copy.png'},scratch\n")
    assert main(["import-labels", str(labels), "--dataset", str(data)]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["label_conflicts"] == 1 and counts["relabel"] == 0 and (data / src).exists()
    before = json.load(open(data / "dataset.json"))["counts"]["train"]
    assert main(["import-labels", str(labels), "--dataset", str(data), "--relabel"]) == 0
    assert json.loads(capsys.readouterr().out)["relabel"] == 1
    assert not (data / src).exists()
    after = json.load(open(data / "dataset.json"))["counts"]["train"]
    assert after["ok"] == before["ok"] - 1 and after["scratch"] == before["scratch"] + 1
    prov = [json.loads(x) for x in open(data / "provenance.jsonl")]
    assert prov[-1]["action"] == "relabel" and prov[-1]["previous_label"] == "ok" and prov[-1]["from_path"] == src
    with pytest.raises(SystemExit):
        main(["import-labels", "--help"])
    assert "(default: train)" in capsys.readouterr().out
