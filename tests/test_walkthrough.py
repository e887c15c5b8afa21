"""docs/your-data.md as a script: a user's own class folders through every stage, tiny sizes.

split -> train -> eval -> mislabels -> export -> calibrate -> daemon (a real process) +
camera-sim over the labelled test folder -> pull -> import-labels. Each step is the command
the walkthrough prints, run through ``nexedge.cli.main`` (the daemon as ``nexedge-daemon``).
"""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from nexedge.cli import main
from tests.support.userdata import CORRUPT, make_user_dataset


def _daemon(cfg_path):
    cmd = [sys.executable, "-c", "import sys; from nexedge.serve.daemon import main; sys.exit(main())",
           "--config", cfg_path]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _ready(proc, timeout=60.0):
    end = time.monotonic() + timeout
    lines = []
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "ready":
            return rec["endpoints"]
    raise AssertionError("daemon not ready:\n" + "".join(lines))


def test_walkthrough_own_images_start_to_finish(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_user_dataset("photos")

    # 1. split: the corrupt PNG and the non-images are reported, not copied; ok is the negative class
    assert main(["split", "photos", "data", "--good-class", "ok"]) == 0
    out = capsys.readouterr().out
    assert "negative class: ok" in out and "left out (unreadable): " + CORRUPT.replace(os.sep, "/") in out
    assert "Thumbs.db" in out and "notes.txt" in out and "unsortiert/" in out
    assert not os.path.exists(os.path.join("data", "train", CORRUPT))

    # 2. train (takes --good-class ok from dataset.json)
    assert main(["train", "--data", "data", "--out", "runs/first", "--arch", "tiny", "--resize", "48", "--crop", "40",
                 "--epochs", "3", "--batch-size", "16", "--lr", "0.05"]) == 0
    out, err = capsys.readouterr()
    assert "negative='ok'" in out and "copied to best.pt" in out and "\r" not in err
    assert os.path.exists("runs/first/best.pt") and os.path.exists("runs/first/best.card.json")

    # 3. eval the deployed checkpoint (train's `next:`): confusion matrix, operating point, the misses
    assert main(["eval", "runs/first/best.pt", "--data", "data"]) == 0
    out = capsys.readouterr().out
    assert "deployed model: best.pt" in out and "confusion matrix" in out and "escapes (defects PASSed)" in out

    # 4. mislabels -> review export with class probabilities (cleanlab works)
    assert main(["mislabels", "runs/first", "--data", "data", "--top", "5"]) == 0
    assert main(["pull", "--mislabels", "runs/first/mislabels_train.csv", "--dataset", "data", "--out", "review",
                 "--format", "labelstudio,cleanlab"]) == 0
    capsys.readouterr()
    assert json.load(open("review/cleanlab/classes.json")) == ["chip", "ok", "scratch"]

    # 5. export the run folder (its best.pt) with the crops that measure best and 6. calibrate INT8 for ONNX Runtime
    assert main(["export", "runs/first", "--crops", "auto", "--parity-data", "data", "-o", "runs/first/model.onnx"]) == 0
    assert "crops auto: measured on 'val'" in capsys.readouterr().out
    assert main(["calibrate", "runs/first/model.onnx", "--data", "data", "--images", "32", "--targets", "ort"]) == 0
    capsys.readouterr()
    model = "runs/first/model.int8-ort.onnx"
    assert os.path.exists(model)

    # 7. the daemon with a config whose paths are relative to the config file
    os.makedirs("line")
    cfg = {"model": {"path": "../" + model, "warmup": 1, "options": {"intra_threads": 1}},
           "sockets": {"frames": "tcp://127.0.0.1:*", "verdicts": "tcp://127.0.0.1:*"},
           "uncertain": {"band": 1.0, "audit_fraction": 1.0}, "store": {"path": "samples"},
           "metrics": {"host": "127.0.0.1", "port": 0}, "pull": {"bind": "tcp://127.0.0.1:*"},
           "logging": {"level": "INFO", "format": "json"}}
    with open("line/line.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    proc = _daemon("line/line.yaml")
    try:
        ends = _ready(proc)
        # 8. camera-sim over the labelled test folder: decisions per class, escapes and overkill
        rc = main(["camera-sim", "data/test", "--connect", ends["frames"], "--cameras", "2", "--frames", "6",
                   "--rate", "0"])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "decisions by folder label:" in out and "(good)" in out and "escapes (defects PASSed)" in out
        # 9. pull the uncertain samples over the daemon's pull endpoint, for Label Studio. The store writes
        # samples after the verdicts went out, so on a loaded machine the first pull may come too early.
        for _ in range(40):
            assert main(["pull", "--connect", ends["pull"], "--out", "relabel", "--format", "labelstudio"]) == 0
            pulled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            if pulled["counts"]["received"] > 0:
                break
            time.sleep(0.5)
        assert pulled["counts"]["received"] > 0
    finally:
        proc.terminate()
        proc.wait(30)
    assert os.path.isdir("line/samples")  # the store went next to the config, not into the cwd

    # 10. an annotator's labels back into the data set: one task per distinct image
    tasks = json.load(open("relabel/labelstudio/tasks.json"))
    assert len(tasks) == len({t["data"]["sha256"] for t in tasks})
    with open("labels.csv", "w") as f:
        f.write("sha256,label\n" + "".join(f"{t['data']['sha256']},scratch\n" for t in tasks[:2]))
    assert main(["import-labels", "labels.csv", "--dataset", "data", "--images", "relabel", "--relabel"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["add"] + counts["relabel"] + counts["confirm"] == len(tasks[:2])
    info = json.load(open("data/dataset.json"))
    n_files = sum(len(fs) for d, _, fs in os.walk("data/train") if d.count(os.sep) == 2)
    assert sum(info["counts"]["train"].values()) == n_files


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
