"""Decisions: threshold from the card (or explicit), PASS/REJECT, uncertain band, audit sampling.

REJECT when score >= threshold, PASS otherwise. A frame is *uncertain* when
``|logit(score) - logit(threshold)| <= band`` (log-odds). Scores are not clamped:
card thresholds near 0 (5e-8 is common at TPR 100 %) keep their meaning.
Python 3.8, no torch.
"""

import logging
import random
from typing import Any, Dict, Optional, Tuple

from nexedge.card import ModelCard
from nexedge.metrics import logit_exact
from nexedge.serve.config import DecisionCfg, UncertainCfg

log = logging.getLogger("nexedge.serve")


def resolve_threshold(card: ModelCard, cfg: DecisionCfg) -> Tuple[float, Dict[str, Any]]:
    """(threshold, info) where info says where it came from and the TPR bound it carries."""
    if cfg.threshold is not None:
        info = {"source": "explicit", "threshold": float(cfg.threshold), "target_tpr": None, "tpr_lower95": None}
        return float(cfg.threshold), info
    target = 1.0 if cfg.target_tpr is None else float(cfg.target_tpr)
    op = card.operating_point(target)  # CardError names the available targets
    thr = float(op["threshold"])
    info = {
        "source": "card",
        "threshold": thr,
        "target_tpr": float(op["target_tpr"]),
        "tpr": op.get("tpr"),
        "fpr": op.get("fpr"),
        "tpr_lower95": op.get("tpr_lower95"),
        "n_defects": op.get("n_defects"),
        "n_good": op.get("n_good"),
    }
    return thr, info


class Decider:
    """Per-frame decision, uncertainty and audit draw."""

    def __init__(self, card: ModelCard, decision: DecisionCfg, uncertain: UncertainCfg) -> None:
        self.threshold, self.info = resolve_threshold(card, decision)
        self.band = float(uncertain.band)
        self.audit_fraction = float(uncertain.audit_fraction)
        self._t_logit = logit_exact(self.threshold)
        self._rng = random.Random(uncertain.seed)

    def decide(self, score: float) -> Tuple[str, bool]:
        """(PASS | REJECT, uncertain)."""
        decision = "REJECT" if score >= self.threshold else "PASS"
        gap = logit_exact(score) - self._t_logit
        uncertain = score == self.threshold or abs(gap) <= self.band  # inf - inf is NaN at threshold 1
        return decision, uncertain

    def audit(self, rate: Optional[float] = None) -> bool:
        """Random draw for the audit sample of confident frames."""
        r = self.audit_fraction if rate is None else rate
        return r > 0 and self._rng.random() < r
