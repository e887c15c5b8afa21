"""Run folders as arguments: ``nexedge export RUN``, ``eval RUN``, ``mislabels RUN``, ``thresholds RUN``.

A run folder written by ``nexedge train`` holds ``best.pt`` (the best checkpoint by the
rule in its ``summary.json``), ``ckpt_eNNN.pt`` (top-k, indexed by ``topk.json``) and
``last.pt``. Light: no torch.
"""

import json
import os
from typing import List, Optional


def is_run_folder(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("best.pt", "topk.json", "last.pt"))


def topk_files(run: str) -> List[str]:
    """Top-k checkpoints of a run folder, best first (``topk.json``; else ``ckpt_*.pt`` sorted)."""
    index = os.path.join(run, "topk.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = [os.path.join(run, e["file"]) for e in json.load(f)["checkpoints"]]
    else:
        files = sorted(os.path.join(run, f) for f in os.listdir(run) if f.startswith("ckpt_") and f.endswith(".pt"))
    return [f for f in files if os.path.exists(f)]


def resolve_artifact(path: str, what: str = "checkpoint") -> str:
    """A file as it is; a run folder -> its ``best.pt`` (else the first of ``topk.json``, else ``last.pt``).

    Errors say what was looked for, so ``export runs/x`` on an empty or wrong folder is clear.
    """
    if os.path.isfile(path):
        return path
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such {what} file or run folder")
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a {what} file or run folder")
    best = os.path.join(path, "best.pt")
    if os.path.exists(best):
        return best
    files = topk_files(path)
    if files:
        return files[0]
    last = os.path.join(path, "last.pt")
    if os.path.exists(last):
        return last
    raise FileNotFoundError(f"{path}: a folder without checkpoints (expected best.pt, topk.json or last.pt "
                            f"from `nexedge train --out {path}`)")


def run_dir_of(path: str) -> Optional[str]:
    """The run folder of a checkpoint or run folder argument."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
