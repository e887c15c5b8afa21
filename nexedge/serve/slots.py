"""Opening one model as the daemon runs it: :func:`open_slot` (card, measured-operating-point rule,
batch size, warm-up, cascade plan) and the checks a replacement model must pass against the line
(:func:`check_compatible`). Used by :mod:`nexedge.serve.lifecycle` and by the load probe's child
process (:mod:`nexedge.serve.loadprobe`). Python 3.8, no torch.
"""

import logging
import os
import threading
import time
from typing import Any, Dict, Optional

from nexedge.card import ModelCard
from nexedge.serve import config as serve_config
from nexedge.serve.decide import Decider
from nexedge.serve.memory import rss_bytes

log = logging.getLogger("nexedge.serve")


class LifecycleError(ValueError):
    """A refused lifecycle operation; the message says what was wrong and what to do."""


class Slot:
    """One loaded model: backend, card, decision rule, and what it costs in memory."""

    def __init__(self, path: str, backend: Any, decider: Decider, footprint: int, source: str,
                 unmeasured: Optional[str] = None) -> None:
        self.path = path
        self.backend = backend
        self.card: ModelCard = backend.card
        self.decider = decider
        self.footprint = int(footprint)
        self.source = source
        self.unmeasured = unmeasured  # why its thresholds are not measured on it (decision.allow_unmeasured)
        self.load_peak: Optional[int] = None  # what it took while it was opened, measured by the load probe
        self.loaded_at = time.time()
        self.closed = False
        self.use_lock = threading.Lock()  # held while the shadow scorer runs it; close() waits for it

    @property
    def model_id(self) -> str:
        return self.card.model_id

    @property
    def sha256(self) -> str:
        return str(self.card.sha256 or "")

    def close(self) -> None:
        with self.use_lock:
            if not self.closed:
                self.closed = True
                self.backend.close()

    def info(self) -> Dict[str, Any]:
        d = self.decider.info
        return {"model_id": self.model_id, "sha256": self.sha256, "path": self.path, "source": self.source,
                "threshold": self.decider.threshold, "threshold_source": d.get("source"),
                "target_tpr": d.get("target_tpr"), "crop_mode": str(self.backend.crop_mode),
                "memory_bytes": self.footprint, "load_peak_bytes": self.load_peak, "loaded_at": self.loaded_at,
                "unmeasured": self.unmeasured}


def operating_points_problem(card: ModelCard, crop_mode: str) -> Optional[str]:
    """Why the card's operating points do not rest on a measurement of this artifact run with
    ``crop_mode``; None when they do."""
    if not card.operating_points:
        return "the card has no operating points; measure them with `nexedge thresholds`"
    problem = card.crop_mode_mismatch(str(crop_mode))
    if problem is not None:
        return problem
    ops = card.ops_source
    if ops.get("status") != "measured":
        return (f"operating points are {ops.get('status') or 'of unknown provenance'}, not measured on this "
                "artifact; run `nexedge thresholds` on it")
    measured_on = ops.get("artifact_sha256")
    if measured_on and card.sha256 and measured_on != card.sha256:
        return (f"operating points were measured on artifact {str(measured_on)[:12]}, not on this one "
                f"({card.sha256[:12]}); run `nexedge thresholds` on it")
    return None


def unmeasured_points(card: ModelCard, crop_mode: str, d: serve_config.DecisionCfg, error: type = LifecycleError) -> Optional[str]:
    """The one rule for start-up and every swap: thresholds must be measured on this artifact (or
    ``decision.threshold`` explicit). Raises ``error`` naming the problem; with
    ``decision.allow_unmeasured`` logs it as a WARNING and returns it instead."""
    if d.threshold is not None:
        return None
    problem = operating_points_problem(card, crop_mode)
    if problem is None:
        return None
    if not d.allow_unmeasured:
        raise error(f"{card.source}: {problem}; or set decision.allow_unmeasured: true to run on these unmeasured "
                    "thresholds anyway")
    log.warning("UNMEASURED OPERATING POINTS (decision.allow_unmeasured is set): %s: %s; the expected escape rate "
                "and TPR bound of this model are unknown (their gauges read NaN)", card.source, problem)
    return problem


def check_card_compatible(line: ModelCard, card: ModelCard) -> None:
    """Card-level part of :func:`check_compatible` (no backend needed: checked before anything opens)."""
    src = card.source
    if card.classes != line.classes or card.good_class != line.good_class:
        raise LifecycleError(f"{src}: classes {card.classes} (negative class {card.good_class!r}) differ from the "
                             f"line's {line.classes} (negative class {line.good_class!r}); a model for this line "
                             "must be trained on the same class list")
    for key in ("resize", "color", "resize_mode"):
        if card.input.get(key) != line.input.get(key):
            raise LifecycleError(f"{src}: input.{key} {card.input.get(key)!r} differs from the line's "
                                 f"{line.input.get(key)!r}; frames are prepared once for both models, so they must "
                                 "share the prepared input (resize, color, resize_mode)")


def check_compatible(line: ModelCard, card: ModelCard, backend: Any, cfg: serve_config.Config) -> None:
    """Refuse a model that cannot replace ``line`` (the active model's card) on this line."""
    check_card_compatible(line, card)
    if backend.max_batch < cfg.batching.max_batch:
        raise LifecycleError(f"{card.source}: the backend accepts batches up to {backend.max_batch}, the line runs "
                             f"batching.max_batch {cfg.batching.max_batch}")


def open_slot(cfg: serve_config.Config, path: str, source: str, given: Any = None) -> Slot:
    """Open, check (the measured-operating-point rule, batch size) and warm one artifact, as the
    daemon runs it (cascade plan included). Used by the daemon and by the load probe."""
    from nexedge.runtime import open_backend, registry

    try:  # the options of the backend that opens this file (an engine loaded on an ONNX line too)
        kind = registry.choose(path, cfg.model.backend, "model.backend").name
        opts = registry.options_for(path, cfg.model.options, backend=kind)
    except ValueError as e:
        raise serve_config.ConfigError(str(e)) from None
    if not cfg.model.verify_card:
        opts["verify"] = False
    t0, rss0 = time.monotonic(), rss_bytes()
    backend = given if given is not None else open_backend(path, kind, **opts)
    try:
        card = backend.card
        log.info("card %s: %s", card.model_id, card.ops_status_line(),
                 extra={"fields": {"operating_points_source": card.ops_source}})
        unmeasured = unmeasured_points(card, str(backend.crop_mode), cfg.decision, serve_config.ConfigError)
        if backend.max_batch < cfg.batching.max_batch:
            raise serve_config.ConfigError(f"batching.max_batch: {cfg.batching.max_batch} exceeds what the backend accepts "
                                f"({backend.max_batch}, from the card's graph.max_batch or model.options)")
        if cfg.model.warmup:
            import numpy as np

            backend.warmup(cfg.model.warmup)
            backend.infer(np.zeros((cfg.batching.max_batch,) + tuple(backend.input_shape), np.uint8))
        decider = Decider(card, cfg.decision, cfg.uncertain)
        from nexedge.runtime.cascade import plan_for_daemon

        backend = plan_for_daemon(backend, cfg.model, decider.threshold, opts, artifact=path)  # model.cascade
    except BaseException:
        if given is None:
            backend.close()
        raise
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    slot = Slot(path, backend, decider, max(rss_bytes() - rss0, size), source, unmeasured)
    info = decider.info
    log.info("model %s loaded and warmed up in %.2f s; threshold %.6f from %s (target TPR %s, TPR lower95 %s)",
             card.model_id, time.monotonic() - t0, info["threshold"], info["source"], info.get("target_tpr"),
             info.get("tpr_lower95"), extra={"fields": {"model_id": card.model_id, "threshold_info": info}})
    return slot
