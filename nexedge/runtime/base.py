"""One interface for every inference backend (ONNX Runtime, TensorRT, torch).

A backend takes *prepared* images (uint8 N x H x W x C, see
:func:`nexedge.preprocess.prepare`) and returns class probabilities and the
defect score per image. Whether crops happen in the graph or on the host is the
backend's business, read from the card: ``graph.crops == "host"`` means the
model takes float32 (N*K) x 3 x h x w and returns logits; anything else means
the model takes the uint8 images and returns ``logits`` (the mean over its crops),
``probs`` and ``defect_score``. Scores always come from logits, in float64 on the
host (:func:`nexedge.metrics.defect_score`), whatever precision the model ran in;
only graphs exported before in-graph models had ``logits`` are scored from ``probs``.

Python 3.8, no torch.
"""

import copy
import time
from typing import Dict, NamedTuple, Optional

import numpy as np

from nexedge import metrics
from nexedge import preprocess as pp
from nexedge.card import ModelCard


class BackendError(RuntimeError):
    """Inference failed (bad batch, runtime error); the caller answers RECHECK."""


class ArtifactIncompatible(BackendError):
    """The artifact cannot run on this machine as built (an engine from another TensorRT version, or for
    a DLA core the device lacks): retrying will not help; rebuild it here (``nexedge build-engine``)."""


class InferenceResult(NamedTuple):
    probs: np.ndarray  # N x C float32
    defect_score: np.ndarray  # N float64 (nexedge.metrics.defect_score: precise near 0)
    timings: Dict[str, float]  # stage -> seconds for this call


class Backend:
    """Base class: subclasses implement :meth:`_run_host` and/or :meth:`_run_graph`."""

    name = "base"

    def __init__(self, card: ModelCard, max_batch: Optional[int] = None) -> None:
        self.card = card
        self.crops = card.graph.get("crops", "host")
        self.crop_mode = card.input["crop_mode"] if self.crops == "host" else self.crops
        self.k = pp.n_crops(self.crop_mode)
        self.aggregate = card.aggregate  # host crops: done here; in-graph crops: done by the graph
        self.max_batch = int(max_batch or card.graph.get("max_batch") or 64)
        self.input_shape = (int(card.input["resize"][0]), int(card.input["resize"][1]),
                            1 if card.input["color"] == "gray" else 3)

    # -- subclass hooks ------------------------------------------------
    def _run_host(self, x: np.ndarray, timings: Dict[str, float]) -> np.ndarray:
        """float32 (N*K) x 3 x h x w -> logits (N*K) x C."""
        raise NotImplementedError

    #: What :meth:`_run_graph` returns: "logits" (per-image mean over the crops) or, for in-graph
    #: models exported without a ``logits`` output, "probs".
    graph_output = "logits"

    def _run_graph(self, images: np.ndarray, timings: Dict[str, float]) -> np.ndarray:
        """uint8 N x H x W x C -> N x C :attr:`graph_output` (the graph's own defect_score is not used)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the backend allocated. Idempotent."""

    # -- shared logic --------------------------------------------------
    def check_batch(self, images: np.ndarray) -> np.ndarray:
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise BackendError("expected a uint8 numpy batch, got {}".format(getattr(images, "dtype", type(images))))
        if images.ndim == 3 and self.input_shape[2] == 1:
            images = images[..., None]
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise BackendError(
                f"batch shape {images.shape} does not match the card's prepared input N x {self.input_shape}"
            )
        n = images.shape[0]
        if n < 1 or n > self.max_batch:
            raise BackendError(f"batch of {n} images; this backend accepts 1..{self.max_batch}")
        return images

    def infer(self, images: np.ndarray) -> InferenceResult:
        """Run one batch of prepared images."""
        images = self.check_batch(images)
        timings: Dict[str, float] = {}
        t0 = time.perf_counter()
        if self.crops == "host":
            x = pp.host_batch(images, self.card.input, self.crop_mode)
            timings["preprocess"] = time.perf_counter() - t0
            logits = np.asarray(self._run_host(x, timings), np.float64)
            t1 = time.perf_counter()
            if logits.ndim != 2 or logits.shape[0] != images.shape[0] * self.k:
                raise BackendError(f"model returned logits {logits.shape} for {images.shape[0]} images x {self.k} crops")
            probs, score = metrics.aggregate_crops(logits.reshape(images.shape[0], self.k, -1), self.card.good_index,
                                                   self.aggregate)
        else:
            timings["preprocess"] = 0.0
            out = np.asarray(self._run_graph(np.ascontiguousarray(images), timings), np.float64)
            t1 = time.perf_counter()
            if self.graph_output == "logits":
                probs = pp.softmax(out)
                score = metrics.defect_score(out, self.card.good_index)
            else:
                probs = out
                score = metrics.defect_score_from_probs(out.astype(np.float32), self.card.good_index)
        timings["postprocess"] = time.perf_counter() - t1
        timings["total"] = time.perf_counter() - t0
        return InferenceResult(probs.astype(np.float32), score, timings)

    def crop_view(self, crop_mode: str, aggregate: Optional[str] = None) -> "Backend":
        """The same loaded model run with another host crop mode (and crop ``aggregate``, default this
        backend's; shares the session/engine; closing the view closes nothing). Host-crop models only:
        an in-graph model's crops are in the graph."""
        if self.crops != "host":
            raise BackendError(f"{self.card.model_id} does its crops in the graph ({self.crops}); a "
                               f"{crop_mode!r} view needs a host-crop model or a graph exported with those crops")
        view = copy.copy(self)
        view.crop_mode, view.k = crop_mode, pp.n_crops(crop_mode)
        if aggregate is not None:
            if aggregate not in metrics.AGGREGATES:
                raise BackendError(f"crop aggregate {aggregate!r}: expected one of {', '.join(metrics.AGGREGATES)}")
            view.aggregate = aggregate
        view.close = lambda: None  # type: ignore[method-assign]
        return view

    def warmup(self, n: int = 2) -> None:
        """Run a few zero batches so the first real frame does not pay for lazy init."""
        dummy = np.zeros((1,) + self.input_shape, np.uint8)
        for _ in range(n):
            self.infer(dummy)

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
