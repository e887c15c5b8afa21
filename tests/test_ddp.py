"""Two-process DistributedDataParallel run on CPU (gloo) through torchrun."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from nexedge.card import load_card  # noqa: E402
from nexedge.train.toydata import make_toy_imagefolder  # noqa: E402


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    root = str(tmp_path / "data")
    make_toy_imagefolder(root, ("good", "scratch"), {"train": [5, 4], "val": [4, 3]}, size=36)
    out = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd(), OMP_DISPLAY_ENV="VERBOSE")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nexedge.cli", "train", "--data", root, "--out", out, "--arch", "tiny", "--epochs", "2",
           "--batch-size", "2", "--resize", "36", "--crop", "32", "--keep", "1", "--device", "cpu",
           "--no-progress", "--loss", "sat", "--sat-es", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    if "GOMP_SPINCOUNT" in proc.stderr:  # libgomp reports its settings: both workers' threads sleep when idle
        assert proc.stderr.count("GOMP_SPINCOUNT = '0'") == 2, proc.stderr[-3000:]
    assert proc.stdout.count("epoch   2/2") == 1  # only rank 0 prints and writes
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["val"]["n"] == 7 and rows[-1]["train"]["n"] == 9  # gathered from both ranks, deduplicated
    card = load_card(os.path.join(out, "last.pt"))
    assert card.data["provenance"]["world_size"] == 2
    import numpy as np

    soft = np.load(os.path.join(out, "sat_state.npz"))["soft"]
    assert soft.shape == (9, 2) and (soft.max(1) < 1).all()  # every row updated, on one rank or the other
