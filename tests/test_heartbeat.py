"""A heartbeat line at least every 30 s when output is not a terminal: batches done, images/s, ETA."""

import pytest

from nexedge.progress import LineProgress, format_seconds, heartbeat_interval


class _Clock:
    def __init__(self, step: float) -> None:
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_heartbeat_every_interval_with_batches_images_rate_and_eta(capsys):
    batches = [(None, list(range(8)))] * 6  # six batches of eight images
    clock = _Clock(10.0)  # every clock reading is 10 s after the one before
    for _ in LineProgress(batches, desc="epoch 3 train", unit="batches", images=lambda b: len(b[1]), heartbeat=30,
                          stage_line=False, clock=clock):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines  # readings 10 s apart: a line at 30 s and 60 s of the 70 s, none at close
    assert lines[0] == "epoch 3 train: 3/6 batches, 24 images, 0.8 images/s, ETA 30 s"
    assert lines[1].startswith("epoch 3 train: 6/6 batches, 48 images,") and "ETA 0.0 s" in lines[1]


def test_update_driven_heartbeat_and_stage_line(capsys):
    bar = LineProgress(desc="thresholds m.onnx val", total=100, unit="images", heartbeat=30, clock=_Clock(20.0))
    bar.update(40)  # 20 s after the start
    bar.update(60)  # 40 s: a heartbeat
    bar.close()
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "thresholds m.onnx val: 100/100 images, 2.5 images/s, ETA 0.0 s"
    assert err[1].startswith("thresholds m.onnx val: 100 images in")


def test_interval_from_the_environment(monkeypatch):
    assert heartbeat_interval() == 30.0
    monkeypatch.setenv("NEXEDGE_HEARTBEAT_S", "5")
    assert heartbeat_interval() == 5.0
    monkeypatch.setenv("NEXEDGE_HEARTBEAT_S", "0")
    with pytest.raises(ValueError, match="NEXEDGE_HEARTBEAT_S='0'"):
        heartbeat_interval()
    assert [format_seconds(s) for s in (4.24, 42, 200, 3900)] == ["4.2 s", "42 s", "3 min 20 s", "1 h 05 min"]


def test_train_eval_and_mislabels_beat_into_a_log(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from nexedge.cli import main
    from nexedge.train.toydata import make_toy_imagefolder

    data = str(make_toy_imagefolder(str(tmp_path / "d"), ("good", "scratch"),
                                    {"train": [8, 8], "val": [4, 4], "test": [3, 3]}, size=40))
    run = str(tmp_path / "run")
    monkeypatch.setenv("NEXEDGE_HEARTBEAT_S", "1e-9")  # a line at every batch
    assert main(["train", "--data", data, "--out", run, "--arch", "tiny", "--epochs", "1", "--resize", "40",
                 "--crop", "32", "--batch-size", "8", "--threads", "1"]) == 0
    err = capsys.readouterr().err  # pytest's stderr is not a terminal, like a log file
    assert "epoch 1 train: 1/2 batches, 8 images, " in err and "images/s, ETA " in err
    assert "epoch 1 val: 1/1 batches, 8 images, " in err
    assert main(["eval", run, "--data", data, "--crops", "center", "--out", str(tmp_path / "e"), "--threads", "1",
                 "--batch-size", "4"]) == 0
    assert ".pt test: 4/6 images, " in capsys.readouterr().err
    assert main(["mislabels", run, "--data", data, "--batch-size", "8", "--threads", "1"]) == 0
    assert ".pt train: 8/16 images, " in capsys.readouterr().err
