"""Write a synthetic data set: ImageFolder split, manifest.jsonl and dataset.json.

The plan (class, given label, split of every image) is drawn in the parent process from
the seed; image ``i`` is rendered from seed ``(seed, i)``, so the output does not depend
on the worker count, and any image can be re-rendered (with its clean twin) from its
manifest row: ``render_image(row["true_label"], (row["seed"], row["index"]), row["batch"], size,
look=row["look"])``.
"""

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from nexedge import __version__
from nexedge.data.spec import (
    DEFAULT_LOOK,
    GOOD,
    MIN_PER_CLASS,
    NOT_NOISABLE,
    check_batch,
    check_look,
    resolve_counts,
)
from nexedge.data.split import _progress, assign_splits, check_out_dir, count_table, write_json_atomic
from nexedge.data.synth import NATIVE_WH, check_size, render_image

FORMAT_VERSION = 1
# Huffman-only PNG: lossless, about 2x faster than zlib level 1 on noisy images and no larger.
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]


@dataclass
class PlanItem:
    index: int
    true_label: str
    label: str  # given label (differs from true_label for noisy rows)
    split: str
    noisy: bool

    def path(self, batch: int) -> str:
        return f"{self.split}/{self.label}/b{batch}_{self.index:06d}.png"


def plan_dataset(counts: Mapping[str, int], seed: int, noise: float = 0.01) -> List[PlanItem]:
    """Classes interleaved in random order; ``noise`` of the defect images relabelled good; split by given label."""
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"--noise {noise!r} out of range; expected 0 <= noise < 1")
    rng = np.random.default_rng([int(seed), 0xDA7A])
    labels = [c for c in sorted(counts) for _ in range(int(counts[c]))]
    order = rng.permutation(len(labels))
    true = [labels[int(i)] for i in order]
    given = list(true)
    candidates = [i for i, c in enumerate(true) if c not in NOT_NOISABLE]
    n_noisy = int(round(noise * len(candidates)))
    left = {c: int(k) for c, k in counts.items()}
    noisy = set()
    for i in rng.permutation(candidates) if candidates else []:
        if len(noisy) >= n_noisy:
            break
        c = true[int(i)]
        if left[c] > MIN_PER_CLASS:  # keep every class splittable under its given label
            left[c] -= 1
            noisy.add(int(i))
            given[int(i)] = GOOD
    if len(noisy) < n_noisy:
        raise ValueError(f"--noise {noise} asks for {n_noisy} noisy labels but only {len(noisy)} defect images "
                         f"can be relabelled while keeping {MIN_PER_CLASS} per class; lower --noise or raise --n")
    if noisy and GOOD not in counts:
        raise ValueError("label noise needs a 'good' class; set --noise 0 or include good in --class-counts")
    by_class: Dict[str, List[int]] = {}
    for i, c in enumerate(given):
        by_class.setdefault(c, []).append(i)
    where = assign_splits(by_class, seed)
    return [PlanItem(i, true[i], given[i], where[i], i in noisy) for i in range(len(true))]


def _render_write(job: Tuple[str, int, int, str, int, Tuple[int, int], str, str]) -> Dict[str, Any]:
    out, seed, index, cls, batch, size, rel, look = job
    img, meta = render_image(cls, (seed, index), batch=batch, size=size, look=look)
    path = os.path.join(out, rel)
    if not cv2.imwrite(path, img, PNG_PARAMS):
        raise RuntimeError(f"could not write image {path!r}")
    return meta


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV threads would oversubscribe


def _pool_map(jobs: List[Any], workers: int, bar: Any) -> List[Dict[str, Any]]:
    metas: List[Dict[str, Any]] = []
    if workers <= 1:
        for j in jobs:
            metas.append(_render_write(j))
            bar.update(1)
        return metas
    # Not "fork": a caller with live threads (ONNX Runtime, torch, a daemon in the same process)
    # can leave a lock held in the forked child, and the pool then hangs forever.
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        for m in pool.imap(_render_write, jobs, chunksize=8):
            metas.append(m)
            bar.update(1)
    return metas


def resolve_workers(workers: int) -> int:
    if workers < 0:
        raise ValueError(f"--workers {workers} must be >= 0 (0 = one per CPU core)")
    return workers or (os.cpu_count() or 1)


def generate(out: str, n: Optional[int] = 2000, seed: int = 0, batch: int = 2, noise: float = 0.01,
             size: Sequence[int] = NATIVE_WH, workers: int = 0, progress: bool = True,
             class_counts: Optional[Mapping[str, int]] = None,
             good_fraction: Optional[float] = None, look: str = DEFAULT_LOOK) -> Dict[str, Any]:
    """Render ``n`` images into ``out/{train,val,test}/<label>/`` with manifest.jsonl and dataset.json.

    ``class_counts`` (exact per-class counts) or ``good_fraction`` override the batch's class mix.
    ``workers``: processes (0 = one per core); the images do not depend on it. ``look``: renderer
    look ("real" calibrated against real line images, or "legacy"). Returns a summary
    (counts per split and class, noisy count, seconds, images per second).
    """
    check_batch(batch)
    check_look(look)
    size = check_size(size)
    workers = resolve_workers(workers)
    counts = resolve_counts(n, batch, good_fraction, class_counts)
    plan = plan_dataset(counts, seed, noise)
    check_out_dir(out)
    for d in sorted({os.path.dirname(p.path(batch)) for p in plan}):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    jobs = [(out, int(seed), p.index, p.true_label, batch, size, p.path(batch), look) for p in plan]
    bar = _progress(len(jobs), f"synth b{batch}", progress)
    t0 = time.perf_counter()
    try:
        metas = _pool_map(jobs, min(workers, max(1, len(jobs))), bar)
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    rows = []
    for p, m in zip(plan, metas):
        rows.append({
            "path": p.path(batch), "split": p.split, "label": p.label, "true_label": p.true_label,
            "bbox": m["bbox"], "severity": m["severity"], "batch": batch, "noisy": p.noisy,
            "variant": m["variant"], "seed": int(seed), "index": p.index, "marking": m["marking"],
            "flip": m["flip"], "pose": m["pose"], "defect_mode": m.get("defect", {}).get("mode"), "look": look,
        })
    write_json_atomic(os.path.join(out, "manifest.jsonl"), rows, lines=True)
    args = {"n": len(plan), "seed": seed, "batch": batch, "noise": noise, "size": list(size),
            "class_counts": dict(class_counts) if class_counts else None, "good_fraction": good_fraction,
            "look": look}
    given = count_table(rows)
    info = {
        "format": "nexedge-synth", "version": FORMAT_VERSION, "nexedge_version": __version__,
        "classes": sorted(counts), "good_class": GOOD if GOOD in counts else None,
        "counts": given, "true_counts": count_table(rows, "true_label"),
        "n_images": len(rows), "n_noisy": sum(p.noisy for p in plan), "args": args,
        "bbox_format": "[x0, y0, x1, y1] pixels, x1 and y1 exclusive; null for good",
        "render": "nexedge.data.synth.render_image(true_label, (seed, index), batch, size, look=look)",
    }
    write_json_atomic(os.path.join(out, "dataset.json"), info)
    return {"out": out, "n": len(rows), "counts": given, "n_noisy": info["n_noisy"], "seconds": round(dt, 3),
            "images_per_s": round(len(rows) / dt, 1) if dt > 0 else None, "workers": workers}
