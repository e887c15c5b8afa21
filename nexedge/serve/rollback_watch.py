"""Automatic rollback (``lifecycle.auto_rollback_*``): the reject-count chart of
:class:`~nexedge.serve.rules.RollbackChart`, armed at each change of the active model against the
model it replaced, disarmed when there is nothing to roll back to, and read after every batch.

The :class:`~nexedge.serve.lifecycle.Lifecycle` asks it and acts (rolls back, counts, records);
this module only decides and says why. Python 3.8, no torch.
"""

import logging
from typing import Any, Dict, List, Optional, Tuple

from nexedge.serve import config as serve_config
from nexedge.serve.rules import RollbackChart
from nexedge.serve.slots import Slot

log = logging.getLogger("nexedge.serve")


class RollbackWatch:
    """The rollback chart of one daemon, with the arming policy and its log lines."""

    def __init__(self, lc: serve_config.LifecycleCfg) -> None:
        self.lc = lc
        self.chart = RollbackChart(lc.auto_rollback.baseline, lc.auto_rollback.subgroup,
                                   lc.auto_rollback.watch, lc.auto_rollback.alpha)

    @property
    def enabled(self) -> bool:
        return self.lc.auto_rollback.baseline > 0

    @property
    def armed(self) -> Optional[Dict[str, Any]]:
        """The armed chart's limits (for ``status``), None when disarmed."""
        return self.chart.armed

    def baseline_of(self, outgoing: Optional[Slot]) -> Optional[Tuple[int, int]]:
        """(rejects, frames) of ``outgoing``'s recent decisions, read before the swap."""
        if not self.enabled or outgoing is None:
            return None
        return self.chart.baseline_of(outgoing)

    def rearm(self, old: Optional[Slot], new: Slot, previous: Optional[Slot], pre: Any,
              why: str) -> Optional[Dict[str, Any]]:
        """(under batch_lock, at a change of the active model) arm the chart for ``new`` against ``old``
        when ``old`` is kept as the rollback target (``previous``) and its baseline is long enough;
        else disarm it."""
        if not self.enabled:
            return None
        if old is None or previous is not old:
            self.disarm(f"{why}: no previous model to roll back to")
            return None
        if pre is None:
            self.disarm(f"{why}: fewer than lifecycle.auto_rollback.baseline ({self.lc.auto_rollback.baseline}) "
                        f"decisions of {old.model_id} were seen before the change")
            return None
        limits = self.chart.arm(old, new, new.model_id, pre)
        log.warning("automatic rollback armed for %s (%s): baseline %d rejects in %d frames of %s; checked every "
                    "%d frames for %d frames, false-rollback chance %g per change", new.model_id, why,
                    limits["baseline_rejects"], limits["baseline"], old.model_id, limits["every"], limits["watch"],
                    limits["alpha"], extra={"fields": {"event": "rollback_armed", "limits": limits}})
        if limits["lower_fires_from"] is None:
            log.warning("automatic rollback of %s cannot fire on a LOW reject rate: %d rejects in %d baseline frames "
                        "cannot tell 0 rejects in %d frames from chance at %g; a model that rejects nothing would "
                        "not be rolled back (raise lifecycle.auto_rollback.baseline and auto_rollback.watch)",
                        new.model_id, limits["baseline_rejects"], limits["baseline"], limits["watch"],
                        limits["alpha"])
        return limits

    def disarm(self, why: str) -> None:
        if not self.enabled:
            return
        was = self.chart.armed
        self.chart.disarm()
        log.warning("automatic rollback not armed%s: %s", "" if was is None else f" (was for {was['model_id']})",
                    why, extra={"fields": {"event": "rollback_disarmed", "reason": why}})

    def observe(self, slot: Optional[Slot], decisions: List[str]
                ) -> Optional[Tuple[Slot, Slot, str, Dict[str, Any]]]:
        """Decisions of one batch and the model that made them. When the chart fires: (the model to roll
        back, the one to go back to, why in words, the chart's numbers); else None."""
        if not self.enabled:
            return None
        hit = self.chart.observe(slot, [d == "REJECT" for d in decisions])
        if hit is None:
            return None
        bad, to = hit.pop("slot"), hit.pop("fallback")
        msg = (f"{hit['rejects']} rejects in the {hit['frames']} frames since the change, outside the limits "
               f"[{hit['lo'] + 1}, {hit['hi'] - 1}] predicted from {hit['baseline_rejects']} rejects in "
               f"{hit['baseline']} frames of the previous model (false-rollback chance {hit['alpha']:g} per change)")
        return bad, to, msg, hit
