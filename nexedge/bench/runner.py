"""Measure one model on one backend: warm-up, then timed iterations per batch size.

Each iteration feeds one batch of prepared uint8 images to ``Backend.infer`` and
records the wall time plus the per-stage times the backend reports
(``InferenceResult.timings``: preprocess, h2d, inference, d2h, postprocess).
With real image files (``images=``), each iteration also decodes the encoded
bytes (JPEG/PNG, held in memory, so disk is not measured) and prepares them
(colour + resize per the card), recorded as the ``decode`` and ``resize`` stages.

Works for every backend ``nexedge.runtime.open_backend`` opens (ONNX Runtime,
TensorRT engines, torch checkpoints) and shares one result format and one
reporting path. Python 3.8, no torch import here.
"""

import glob
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from nexedge import preprocess as pp
from nexedge.bench import stats
from nexedge.images import READ_EXTS
from nexedge.runtime import registry

#: Stages in pipeline order; anything else a backend reports is printed after these.
STAGE_ORDER = ("decode", "resize", "preprocess", "h2d", "inference", "d2h", "postprocess", "total", "e2e")


def stage_order(names: Sequence[str]) -> List[str]:
    known = [s for s in STAGE_ORDER if s in names]
    return known + sorted(n for n in names if n not in STAGE_ORDER)


def parse_int_list(text: str, what: str) -> List[int]:
    """``"1,10"`` -> [1, 10]; every value a positive integer."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected comma-separated positive integers like 1,10") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} {text!r}: expected comma-separated positive integers like 1,10")
    return values


def list_images(source: str, limit: int = 256) -> List[str]:
    """Image files under a folder (recursive) or matching a glob, sorted, at most ``limit``."""
    if os.path.isdir(source):
        files = [
            os.path.join(d, f)
            for d, _, names in os.walk(source)
            for f in names
            if f.lower().endswith(READ_EXTS)
        ]
    else:
        files = [f for f in glob.glob(source) if f.lower().endswith(READ_EXTS)]
    files = sorted(files)[:limit]
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(READ_EXTS)}) found at {source!r}")
    return files


def load_encoded(files: Sequence[str]) -> List[np.ndarray]:
    """File bytes as uint8 arrays, each checked to decode (a broken file fails here, named)."""
    import cv2

    out = []
    for f in files:
        with open(f, "rb") as fh:
            buf = np.frombuffer(fh.read(), np.uint8)
        if cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) is None:
            raise ValueError(f"cannot decode image file {f}")
        out.append(buf)
    return out


def backend_kwargs(kind: str, threads: Optional[int], crop_mode: Optional[str],
                   providers: Optional[str]) -> Dict[str, Any]:
    """Constructor arguments for the backend ``kind`` from the generic flags, through the options each
    backend declares (nexedge.runtime.registry); a flag it has no option for, or an unknown backend,
    is a ValueError. The batch limit is the card's (graph.max_batch; an engine's profile), never raised here."""
    return registry.from_flags(kind, threads=threads, crop_mode=crop_mode, providers=providers)


def resolve_backend(model: str, backend: str) -> str:
    """Backend kind for ``model``: by suffix for ``auto``, else ``backend``, which must open the artifact
    (its spec's ``suffixes`` or ``also_opens``); the error says what to bench instead (its ``hint``)."""
    names = (registry.AUTO,) + registry.backend_names()
    if backend not in names:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(names)}")
    try:
        return registry.choose(model, backend, "--backend").name
    except ValueError:
        if backend == registry.AUTO:
            raise
    spec = registry.get(backend)
    kind = registry.backend_for(model).name
    hint = spec.hint or f"it opens {', '.join(spec.opens())} files"
    raise ValueError(f"--backend {backend} cannot run {model} (a {kind} artifact); {hint}")


def _random_batch(n: int, shape: Sequence[int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n,) + tuple(shape), dtype=np.uint8)


def run_batch(
    backend: Any,
    batch: int,
    warmup: int = 10,
    duration: Optional[float] = 5.0,
    iterations: Optional[int] = None,
    encoded: Optional[Sequence[np.ndarray]] = None,
    min_iterations: int = 5,
    seed: int = 0,
) -> Dict[str, Any]:
    """Time ``backend.infer`` at one batch size; returns throughput and per-stage latency stats (ms)."""
    import cv2

    if batch > backend.max_batch:
        raise ValueError(f"batch {batch} exceeds the model's maximum batch {backend.max_batch} "
                         "(card graph.max_batch; export or build with a larger --max-batch)")
    if iterations is None and (duration is None or duration <= 0):
        raise ValueError(f"duration {duration!r}: expected a positive number of seconds (or give iterations)")
    inp = backend.card.input
    fixed = None if encoded else _random_batch(batch, backend.input_shape, seed)
    cursor = [0]

    def next_batch(timings: Dict[str, float]) -> np.ndarray:
        if fixed is not None:
            return fixed
        t0 = time.perf_counter()
        decoded = []
        for _ in range(batch):
            decoded.append(cv2.imdecode(encoded[cursor[0] % len(encoded)], cv2.IMREAD_UNCHANGED))
            cursor[0] += 1
        t1 = time.perf_counter()
        prepared = np.stack([pp.prepare(img, inp) for img in decoded])
        timings["decode"] = t1 - t0
        timings["resize"] = time.perf_counter() - t1
        return prepared

    for _ in range(max(0, warmup)):
        backend.infer(next_batch({}))

    samples: Dict[str, List[float]] = {}
    n_iter = 0
    start = time.perf_counter()
    while True:
        timings: Dict[str, float] = {}
        t0 = time.perf_counter()
        result = backend.infer(next_batch(timings))
        t1 = time.perf_counter()
        timings.update(result.timings)
        timings["e2e"] = t1 - t0
        for k, v in timings.items():
            samples.setdefault(k, []).append(v * 1000.0)
        n_iter += 1
        elapsed = t1 - start
        if iterations is not None:
            if n_iter >= iterations:
                break
        elif elapsed >= duration and n_iter >= min_iterations:
            break
    wall = time.perf_counter() - start
    e2e_sum = sum(samples["e2e"]) / 1000.0
    return {
        "batch": batch,
        "crops": backend.crop_mode,
        "crops_where": "host" if backend.crops == "host" else "graph",
        "iterations": n_iter,
        "images": n_iter * batch,
        "wall_s": wall,
        "images_per_s": n_iter * batch / e2e_sum if e2e_sum > 0 else float("nan"),
        "batches_per_s": n_iter / e2e_sum if e2e_sum > 0 else float("nan"),
        "input": "files" if encoded else "random",
        "latency_ms": {k: stats.summarize(samples[k]) for k in stage_order(list(samples))},
    }


def model_info(path: str, card: Any) -> Dict[str, Any]:
    art = card.data.get("artifact", {})
    prov = card.data.get("provenance") or {}
    return {
        "path": path,
        "file": os.path.basename(path),
        "sha256": art.get("sha256"),
        "kind": art.get("kind"),
        "precision": art.get("precision"),
        "arch": prov.get("arch"),
        "input": dict(card.input),
        "graph_crops": card.graph.get("crops"),
        "quantization": card.graph.get("quantization"),
        "classes": len(card.classes),
    }


def bench_model(
    model: str,
    backend: str = "auto",
    precision: Optional[str] = None,
    batches: Sequence[int] = (1, 10),
    crops: Sequence[Optional[str]] = (None,),
    warmup: int = 10,
    duration: Optional[float] = 5.0,
    iterations: Optional[int] = None,
    threads: Optional[int] = None,
    providers: Optional[str] = None,
    images: Optional[str] = None,
    progress: Any = None,
    cascade: Optional[float] = None,
) -> Dict[str, Any]:
    """Benchmark ``model`` at every (crop mode, batch) pair; one backend session per crop mode.

    ``cascade`` (a target TPR): also run the cascade plan (nexedge.runtime.cascade) at the card's
    threshold for that TPR and report its stage-2 share (meaningful only with real ``images``)."""
    from nexedge.card import load_card
    from nexedge.runtime import open_backend

    kind = resolve_backend(model, backend)
    # a backend other than the suffix's own is named when opening (stage 1 of a cascade too)
    named = {} if kind == registry.backend_for(model).name else {"backend": kind}
    card = load_card(model, verify=True)
    if precision and precision != card.precision:
        raise ValueError(
            f"--precision {precision} requested but {model} is a {card.precision} artifact (its card says so); "
            "bench the artifact of that precision (nexedge calibrate / build-engine make them)"
        )
    encoded = load_encoded(list_images(images)) if images else None
    results = []
    graph_crops = card.graph.get("crops", "host")
    for crop in crops:
        if crop and graph_crops != "host" and crop != graph_crops:
            raise ValueError(f"--crops {crop}: {model} does its crops in the graph ({graph_crops}); "
                             "export a host-crop model (nexedge export --crops host) to compare crop modes")
        if crop == graph_crops:
            crop = None
        kw = backend_kwargs(kind, threads, crop, providers)
        with open_backend(model, **named, **kw) as be:
            for b in batches:
                if progress:
                    progress(f"{kind} {card.precision} crops={be.crop_mode} batch={b}: measuring ...")
                r = run_batch(be, b, warmup=warmup, duration=duration, iterations=iterations, encoded=encoded)
                r.update(backend=kind, precision=card.precision,
                         providers=list(getattr(be, "providers", []) or []) or None)
                results.append(r)
    if cascade is not None:
        from nexedge.runtime.cascade import make_plan, opener

        kw = backend_kwargs(kind, threads, None, providers)
        thr = float(card.operating_point(cascade)["threshold"])
        with open_backend(model, **named, **kw) as be:
            plan = make_plan(be, model, thr, "on", None, opener(named.get("backend", "auto")), **kw)
            assert plan is not None  # "on" raises instead of returning None
            try:
                for b in batches:
                    if progress:
                        progress(f"{kind} {card.precision} {plan.name} batch={b}: measuring ...")
                    before = dict(plan.frames)
                    r = run_batch(plan, b, warmup=warmup, duration=duration, iterations=iterations, encoded=encoded)
                    n = {k: plan.frames[k] - before[k] for k in plan.frames}
                    r.update(backend=kind, precision=card.precision, crops="cascade", plan=plan.name,
                             stage2_fraction=(n[2] + n[0]) / max(1, sum(n.values())), threshold=thr)
                    results.append(r)
            finally:
                if plan.own_stage1:
                    plan.stage1.close()
    return {"model": model_info(model, card), "results": results}
