"""Model slots of a running daemon: ``active``, optional ``candidate`` and ``previous``.

* A load opens and warms the new artifact on the caller's thread (control
  endpoint, SIGHUP helper), never on the inference thread, and checks its card
  against the line (:func:`check_compatible`) before anything changes; with
  ``memory_limit`` (or when a slot must be unloaded to make room) it is first
  opened in a child process (:mod:`nexedge.serve.loadprobe`). A refused load
  leaves every slot as it was.
* The inference worker holds :attr:`Lifecycle.batch_lock` for each batch; a
  swap takes the same lock, so it happens between batches: a batch finishes on
  the model it started with and every verdict names the model that decided it.
* ``promote`` makes the candidate active and keeps the replaced model as
  ``previous`` (``lifecycle.keep_previous``) for an instant ``rollback``.
* Optional rules (:mod:`nexedge.serve.rules`; the rollback chart's arming in
  :mod:`nexedge.serve.rollback_watch`): promotion after N shadow frames
  when the candidate's escapes (REJECT/PASS) and all disagreements are bounded;
  automatic rollback when the new model's cumulative reject count leaves the
  predictive limits from the previous model's last K decisions. Both act only
  on the model they judged.
* With ``lifecycle.models_dir`` (:mod:`nexedge.serve.versions`) loaded artifacts are copied into
  ``models_dir/versions/<stem>-<sha8>/`` and the ``active`` pointer
  (``models_dir/active.json``) is written atomically on every change; a restart
  comes back on the model it names.

See docs/lifecycle.md. Python 3.8, no torch.
"""

import collections
import logging
import os
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from nexedge.card import CardError, ModelCard, load_card, sha256_file
from nexedge.serve import config as serve_config
from nexedge.serve.rollback_watch import RollbackWatch
from nexedge.serve.rules import promotion_verdict
from nexedge.serve.slots import (  # noqa: F401 (check_compatible, open_slot: part of this module's interface)
    LifecycleError,
    Slot,
    check_card_compatible,
    check_compatible,
    open_slot,
    operating_points_problem,
    unmeasured_points,
)
from nexedge.serve.versions import Versions

log = logging.getLogger("nexedge.serve")
SLOTS = ("active", "candidate", "previous")


class Lifecycle:
    """Owns the daemon's model slots. Thread-safe; every change is logged with who and what."""

    def __init__(self, cfg: serve_config.Config, metrics: Any, given_backend: Any = None) -> None:
        self.cfg = cfg
        self.lc = cfg.lifecycle or serve_config.LifecycleCfg()
        self.metrics = metrics
        self.batch_lock = threading.RLock()  # the worker holds it per batch; swaps take it
        self._op_lock = threading.Lock()  # one load/promote/rollback at a time
        self._given = given_backend
        self.active: Optional[Slot] = None
        self.candidate: Optional[Slot] = None
        self.previous: Optional[Slot] = None
        self.versions = Versions(self.lc.models_dir) if self.lc.models_dir else None
        self.limit = serve_config.parse_size(self.lc.memory_limit, "lifecycle.memory_limit") if self.lc.memory_limit else None
        self.changes: Dict[str, int] = collections.Counter()
        self.history: Deque[Dict[str, Any]] = collections.deque(maxlen=50)
        self.rollback_watch = RollbackWatch(self.lc)
        self.promotion_state: Optional[str] = None  # why the candidate is (not yet) promoted automatically
        self.on_active: List[Callable[[Slot], None]] = []  # called after the active model changed
        self.on_candidate: List[Callable[[Optional[Slot]], None]] = []  # called when the candidate changed
        self.shadow: Any = None  # the ShadowScorer, when the daemon runs one
        p = cfg.model.path
        self._config_seen = (os.path.abspath(p), sha256_file(p) if os.path.isfile(p) else None)  # for SIGHUP

    # -- opening -----------------------------------------------------------------
    def open_initial(self) -> Slot:
        """The model to start on: the ``active`` pointer of ``models_dir`` when there is a usable one,
        else ``model.path``. A broken pointer is logged and the line starts on ``model.path``. The
        start-up model passes the same operating-point rule as a swap (:func:`unmeasured_points`)."""
        path, source = self.cfg.model.path, "model.path"
        if self.versions is not None and self._given is None:
            try:
                entry = self.versions.read()
            except LifecycleError as e:
                log.error("cannot resume the promoted model: %s; starting on model.path %s", e, path)
                entry = None
            if entry is not None:
                path, source = entry["path"], "models_dir pointer"
                log.info("resuming the promoted model %s (%s; model.path %s is not used)", path,
                         self.versions.pointer_path, self.cfg.model.path)
        try:
            slot = self._open(path, source, given=self._given)
        except Exception as e:
            if source == "model.path":
                raise
            log.error("cannot open the promoted model %s: %s; starting on model.path %s", path, e,
                      self.cfg.model.path)
            slot = self._open(self.cfg.model.path, "model.path")
        self.active = slot
        self._announce(slot)
        return slot

    def _open(self, path: str, source: str, given: Any = None) -> Slot:
        return open_slot(self.cfg, path, source, given)

    def _announce(self, slot: Slot) -> None:
        """Metrics and log lines for the model now deciding."""
        from nexedge import __version__

        m, card, info = self.metrics, slot.card, slot.decider.info
        m.model.info({
            "model_id": card.model_id, "precision": card.precision, "backend": str(getattr(slot.backend, "name", "?")),
            "crops": str(slot.backend.crops), "crop_mode": str(slot.backend.crop_mode),
            "threshold_source": info["source"], "target_tpr": str(info.get("target_tpr")),
            "tpr_lower95": str(info.get("tpr_lower95")), "version": __version__,
        })
        m.threshold.set(slot.decider.threshold)
        from nexedge.metrics import expected_escape_rate, weak_points

        op = card.operating_point(float(info["target_tpr"])) if info["source"] == "card" else None
        if slot.unmeasured is not None:  # the card's numbers belong to another artifact: not this one's
            m.tpr_lower95.set(float("nan"))
            m.expected_escape_rate.set(float("nan"))
            m.weak_operating_point.set(1)
        else:
            lb = info.get("tpr_lower95")
            m.tpr_lower95.set(float("nan") if lb is None else float(lb))
            weak = op is not None and (lb is None or float(lb) < self.cfg.decision.tpr_floor)
            m.weak_operating_point.set(1 if weak else 0)
            esc = None if op is None else expected_escape_rate(op)
            m.expected_escape_rate.set(float("nan") if esc is None else esc)
            if weak:
                log.warning("WEAK OPERATING POINT: %s", weak_points([op], self.cfg.decision.tpr_floor)[0]["message"],
                            extra={"fields": {"tpr_lower95": lb, "tpr_floor": self.cfg.decision.tpr_floor}})
        for fn in self.on_active:
            fn(slot)

    def attach(self, sampler: Any, backlog: Callable[[], int]) -> Any:
        """Start the shadow scorer and register the lifecycle metrics. Returns the shadow scorer."""
        from nexedge.serve.shadow import ShadowScorer

        b = self.cfg.batching
        self.shadow = ShadowScorer(self, self.metrics, sampler, self.lc.shadow_fraction, self.lc.shadow_queue,
                                   b.deadline_ms / 1000.0, backlog, b.max_batch)
        self.on_candidate.append(self.shadow.new_candidate)
        self.metrics.add_families(self.collect)
        self.metrics.add_families(self.shadow.collect)
        return self.shadow

    def after_batch(self, decided: List[Tuple[Any, float, str]], slot: Optional[Slot] = None) -> None:
        """The worker's hook after a batch's verdicts went out, with the model that decided them
        (``slot``; default the active one): rollback chart, then shadow scoring."""
        slot = slot if slot is not None else self.active
        self.observe([d for _f, _x, d in decided], slot)
        if self.shadow is not None and self.candidate is not None:
            self.shadow.offer(slot, [f for f, _x, _d in decided], [x for _f, x, _d in decided],
                              [d for _f, _x, d in decided])

    def report(self) -> Dict[str, Any]:
        """``nexedge line report``: shadow statistics of the (last) candidate."""
        out = self.shadow.report() if self.shadow is not None else {}
        if self.lc.auto_promote.frames > 0:
            out["auto_promote"] = self.promotion_state
        return out

    # -- operations ----------------------------------------------------------------
    def slots(self) -> Dict[str, Optional[Slot]]:
        return {"active": self.active, "candidate": self.candidate, "previous": self.previous}

    def resident_bytes(self, without: Tuple[str, ...] = ()) -> int:
        return sum(s.footprint for k, s in self.slots().items() if s is not None and k not in without)

    def load(self, path: str, as_: str = "candidate", who: str = "?") -> Dict[str, Any]:
        """Check ``path``, then make it the candidate (shadow) or the active model.

        Nothing resident changes before the new model has passed its checks: a refused load leaves
        every slot as it was. A slot that must go to make room (``max_models``, ``memory_limit``) is
        unloaded only after the new model was opened, checked and warmed in a child process (the
        load probe, :mod:`nexedge.serve.loadprobe`); with ``memory_limit`` every load is probed
        first, under that budget, so the daemon itself never opens a model that would exceed it."""
        if as_ not in ("candidate", "active"):
            raise LifecycleError(f"load as {as_!r}: expected 'candidate' or 'active'")
        if not isinstance(path, str) or not path:
            raise LifecycleError(f"load: expected the path of a model artifact on the line machine, got {path!r}")
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise LifecycleError(f"load: {path} does not exist on the line machine (or is not a file)")
        with self._op_lock:
            card = self._precheck(path, as_)
            droppable = (("candidate",) if as_ == "candidate" and self.candidate is not None else ()) + \
                (("previous",) if self.previous is not None else ())
            drops = self._count_drops(path, as_, droppable)
            probed: Optional[Dict[str, Any]] = None
            if self.limit is not None or drops:
                from nexedge.serve.loadprobe import probe

                budget = None if self.limit is None else self.limit - self.resident_bytes(droppable)
                if budget is not None and budget <= 0:
                    raise LifecycleError(f"load {path}: the active model alone takes {_mib(self.resident_bytes(droppable))}"
                                         f", lifecycle.memory_limit is {self.lc.memory_limit}")
                probed = probe(path, self.cfg, self.active.card, budget)
                if probed["sha256"] != card.sha256:
                    raise LifecycleError(f"load {path}: the file changed while it was checked; load it again")
                drops = self._memory_drops(path, as_, drops, droppable, int(probed["peak_bytes"]))
            for name in drops:
                gone = getattr(self, name)
                log.warning("unloading the %s model %s to make room for %s (checked in a child process%s)", name,
                            gone.model_id, card.model_id, "" if probed is None else
                            f": peak {_mib(int(probed['peak_bytes']))}")
                self._drop(name, f"unloaded to make room for {card.model_id}")
            try:
                slot = self._open(path, f"loaded by {who}")
            except LifecycleError:
                raise
            except Exception as e:
                raise LifecycleError(f"load {path}: {e}") from e
            try:
                check_compatible(self.active.card, slot.card, slot.backend, self.cfg)
                if slot.sha256 != card.sha256:
                    raise LifecycleError(f"load {path}: the file changed while it was loaded; load it again")
                if probed is not None:
                    slot.load_peak = int(probed["peak_bytes"])
                if self.versions is not None:
                    slot.path = self.versions.import_artifact(path, slot.sha256)
            except BaseException:
                slot.close()
                raise
            return self._install(slot, as_, who)

    def _precheck(self, path: str, as_: str) -> ModelCard:
        """Checks that need no backend: the card (sha256 verified), its compatibility with the line."""
        try:
            card = load_card(path, verify=self.cfg.model.verify_card)
        except (CardError, OSError) as e:
            raise LifecycleError(f"load {path}: {e}") from e
        check_card_compatible(self.active.card, card)
        from nexedge.runtime import registry

        try:  # the backend model.backend names (or the suffix's) and its options from model.options
            kind = registry.choose(path, self.cfg.model.backend, "model.backend").name
            opts = registry.options_for(path, self.cfg.model.options, backend=kind)
        except ValueError as e:
            raise LifecycleError(f"load {path}: {e}") from None
        d = self.cfg.decision
        if d.threshold is None and not d.allow_unmeasured:
            problem = operating_points_problem(card, opts.get("crop_mode") or card.runtime_crop_mode)
            if problem is not None:
                raise LifecycleError(f"{card.source}: {problem} (or set decision.allow_unmeasured: true)")
        if as_ == "active" and card.sha256 and card.sha256 == self.active.sha256:
            raise LifecycleError(f"{path} is the active model already ({card.model_id})")
        return card

    def _count_drops(self, path: str, as_: str, droppable: Tuple[str, ...]) -> List[str]:
        """Slots that must go for ``max_models`` (and, by the artifact's size, ``memory_limit``);
        LifecycleError when even dropping them all leaves no room. Nothing is dropped here."""
        size = os.path.getsize(path)
        drops: List[str] = []

        def over() -> Optional[str]:
            n = sum(s is not None for k, s in self.slots().items() if k not in drops) + 1
            if n > self.lc.max_models:
                return f"{n} models resident, over lifecycle.max_models {self.lc.max_models}"
            if self.limit is not None and self.resident_bytes(tuple(drops)) + size > self.limit:
                return (f"its {_mib(size)} of weights on top of the {_mib(self.resident_bytes(tuple(drops)))} "
                        f"resident, over lifecycle.memory_limit {self.lc.memory_limit}")
            return None
        for name in droppable:
            if over():
                drops.append(name)
        problem = over()
        if problem:
            raise LifecycleError(f"load {path}: would make {problem}; unload the candidate first")
        return drops

    def _memory_drops(self, path: str, as_: str, drops: List[str], droppable: Tuple[str, ...], peak: int) -> List[str]:
        """``drops`` plus what must go so that the resident models and this one's measured peak fit."""
        if self.limit is None:
            return drops
        drops = list(drops)
        for name in droppable:
            if self.resident_bytes(tuple(drops)) + peak <= self.limit:
                break
            if name not in drops:
                drops.append(name)
        if self.resident_bytes(tuple(drops)) + peak > self.limit:
            raise LifecycleError(f"load {path}: it took {_mib(peak)} while loading (measured in a child process), "
                                 f"on top of {_mib(self.resident_bytes(tuple(drops)))} resident that is over "
                                 f"lifecycle.memory_limit {self.lc.memory_limit}; unload the candidate first")
        return drops

    def _install(self, slot: Slot, as_: str, who: str) -> Dict[str, Any]:
        old = self.candidate if as_ == "candidate" else self.active
        if as_ == "candidate":
            self.candidate = slot
            if old is not None:
                old.close()
            for fn in self.on_candidate:
                fn(slot)
            self._record("load", who, old, slot, slot="candidate")
        else:
            pre = self.rollback_watch.baseline_of(old)
            with self.batch_lock:
                self.active = slot
                prev_out = self._retire(old)
                limits = self.rollback_watch.rearm(old, slot, self.previous, pre, "load --as active")
            self._after_active_change(prev_out)
            self._record("load", who, old, slot, slot="active", rollback_limits=limits)
        return self.status()

    def _retire(self, old: Optional[Slot]) -> Optional[Slot]:
        """(under batch_lock) ``old`` leaves the active slot: it becomes previous or is closed after the lock."""
        out = self.previous
        if self.lc.keep_previous and old is not None:
            self.previous = old
            return out
        self.previous = None
        if old is not None and out is not None:
            out.close()
        return old

    def _after_active_change(self, closing: Optional[Slot]) -> None:
        if closing is not None:
            closing.close()
        self._announce(self.active)

    # -- operations ----------------------------------------------------------------
    def promote(self, who: str = "?", rule: str = "", expect: Optional[Slot] = None) -> Dict[str, Any]:
        """The candidate becomes active; the active model becomes previous (or is unloaded).
        ``expect``: act only when this model is still the candidate (automatic promotion)."""
        with self._op_lock:
            cand = self.candidate
            if expect is not None and cand is not expect:
                log.warning("automatic promotion of %s not done: it is no longer the candidate (%s is)",
                            expect.model_id, cand.model_id if cand else "none")
                return self.status()
            if cand is None:
                raise LifecycleError("promote: no candidate is loaded; `nexedge line load ARTIFACT` first")
            pre = self.rollback_watch.baseline_of(self.active)
            with self.batch_lock, cand.use_lock:  # the shadow scorer is done with it (TensorRT contexts are
                old = self.active                 # not thread-safe: never two threads on one model)
                self.active, self.candidate = cand, None
                closing = self._retire(old)
                limits = self.rollback_watch.rearm(old, cand, self.previous, pre, "promote")
            for fn in self.on_candidate:
                fn(None)
            self._after_active_change(closing)
            self._record("promote", who, old, cand, rule=rule or None, rollback_limits=limits)
            return self.status()

    def rollback(self, who: str = "?", reason: str = "", expect: Optional[Slot] = None,
                 to: Optional[Slot] = None) -> Dict[str, Any]:
        """The previous model becomes active again; the one it replaces is unloaded. ``expect``/``to``:
        act only when these are still the active and the previous model (automatic rollback)."""
        with self._op_lock:
            prev = self.previous
            if expect is not None and (self.active is not expect or prev is not to):
                self.changes["auto_rollback_skipped"] += 1
                log.warning("automatic rollback of %s not done: the slots changed since it was flagged (active now "
                            "%s, previous %s)", expect.model_id, self.active.model_id if self.active else "none",
                            prev.model_id if prev else "none")
                return self.status()
            if prev is None:
                raise LifecycleError("rollback: there is no previous model to go back to (nothing was promoted "
                                     "since the start, or lifecycle.keep_previous is false)")
            with self.batch_lock:
                bad = self.active
                self.active, self.previous = prev, None
                self.rollback_watch.disarm(f"rolled back from {bad.model_id} by {who}")
            self._after_active_change(bad)
            self._record("rollback", who, bad, prev, reason=reason or None)
            return self.status()

    def unload(self, who: str = "?", slot: str = "candidate") -> Dict[str, Any]:
        if slot not in ("candidate", "previous"):
            raise LifecycleError(f"unload {slot!r}: expected 'candidate' or 'previous' (the active model stays)")
        with self._op_lock:
            old = getattr(self, slot)
            if old is None:
                raise LifecycleError(f"unload: no {slot} model is loaded")
            self._drop(slot, f"unloaded by {who}")
            self._record("unload", who, old, None, slot=slot)
            return self.status()

    def _drop(self, slot: str, why: str) -> None:
        old = getattr(self, slot)
        with self.batch_lock:
            setattr(self, slot, None)
            if slot == "previous" and self.rollback_watch.armed is not None:
                self.rollback_watch.disarm(f"the previous model {old.model_id if old else '?'} was {why}: nothing to roll back to")
        if slot == "candidate":
            for fn in self.on_candidate:
                fn(None)
        if old is not None:
            old.close()

    def reload_config_path(self, path: str, who: str = "SIGHUP") -> Optional[Dict[str, Any]]:
        """SIGHUP: make ``path`` (the config's model.path) active when it changed (another path, or
        other bytes) since the start or the last SIGHUP. An unchanged model.path does nothing, so a
        reload cannot undo a promotion made over the control endpoint."""
        seen = (os.path.abspath(path), sha256_file(path) if os.path.isfile(path) else None)
        if seen == self._config_seen:
            log.info("SIGHUP: model.path %s unchanged since it was last read; still running %s", path,
                     self.active.model_id if self.active else "?")
            return None
        out = self.load(path, "active", who)
        self._config_seen = seen
        return out

    def hup(self, read_path: Callable[[], str]) -> None:
        """SIGHUP (signal-safe): re-read the config's model.path on a helper thread and make it active.
        Any failure is logged; the line keeps running on the active model."""
        def run() -> None:
            try:
                path = read_path()
                self.reload_config_path(path)
            except Exception as e:
                log.error("SIGHUP: %s; still running on %s", e, self.active.model_id if self.active else "?")
        threading.Thread(target=run, name="nexedge-sighup", daemon=True).start()

    def observe(self, decisions: List[str], slot: Optional[Slot] = None) -> None:
        """Decisions of one batch and the model that made them (automatic rollback chart)."""
        fired = self.rollback_watch.observe(slot if slot is not None else self.active, decisions)
        if fired is None:
            return
        bad, to, msg, hit = fired
        self.changes["auto_rollback"] += 1
        log.warning("AUTOMATIC ROLLBACK of %s: %s", bad.model_id, msg, extra={"fields": {"event": "auto_rollback",
                                                                                         "chart": hit}})

        def run() -> None:  # not on the worker: a load in progress holds the operation lock for seconds
            try:
                self.rollback("auto-rollback", reason=msg, expect=bad, to=to)
            except LifecycleError as e:
                log.error("automatic rollback failed: %s", e)
        threading.Thread(target=run, name="nexedge-auto-rollback", daemon=True).start()

    def maybe_auto_promote(self, cand: Slot, matrix: Dict[Tuple[str, str], int]) -> None:
        """Called by the shadow scorer with the agreement matrix of ``cand``: promote it (and only it)
        when the rule holds (:func:`nexedge.serve.rules.promotion_verdict`)."""
        lc = self.lc
        if lc.auto_promote.frames <= 0 or self.candidate is not cand:
            return
        ok, why = promotion_verdict(matrix, lc.auto_promote.frames, lc.auto_promote.max_disagreement,
                                    lc.auto_promote.max_escape)
        self.promotion_state = why
        if not ok:
            return
        log.warning("AUTOMATIC PROMOTION of %s: %s", cand.model_id, why)
        try:
            self.promote("auto-promote", rule=why, expect=cand)
        except LifecycleError as e:
            log.error("automatic promotion failed: %s", e)

    # -- records -------------------------------------------------------------------
    def _persist(self, who: str) -> None:
        if self.versions is None or self.active is None:
            return
        try:
            self.versions.write(self.active, self.previous, who)
        except OSError as e:  # the line keeps running; the restart would come back on the older model
            log.error("could not write the active pointer %s: %s", self.versions.pointer_path, e)

    def _record(self, action: str, who: str, old: Optional[Slot], new: Optional[Slot], **extra: Any) -> None:
        self.changes[action] += 1
        self._persist(who)
        ev = {"event": "model_" + action, "who": who, "time": time.time(),
              "old_model_id": old.model_id if old else None, "old_sha256": old.sha256 if old else None,
              "new_model_id": new.model_id if new else None, "new_sha256": new.sha256 if new else None}
        ev.update({k: v for k, v in extra.items() if v is not None})
        self.history.append(ev)
        log.warning("model %s by %s: %s -> %s", action, who, ev["old_model_id"], ev["new_model_id"],
                    extra={"fields": ev})

    def status(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {s: (v.info() if v is not None else None) for s, v in self.slots().items()}
        out.update({"resident_bytes": self.resident_bytes(), "memory_limit_bytes": self.limit,
                    "max_models": self.lc.max_models, "keep_previous": self.lc.keep_previous,
                    "models_dir": self.versions.root if self.versions else None,
                    "auto_rollback": self.rollback_watch.armed, "auto_promote": self.promotion_state,
                    "changes": dict(self.changes), "history": list(self.history)[-10:]})
        return out

    def close(self) -> None:
        for s in self.slots().values():
            if s is not None and s is not self._given:
                s.close()

    def collect(self) -> Any:
        """Prometheus families: slots, memory, changes (registered by the daemon)."""
        from nexedge.serve.prometheus import model_slot_families

        return model_slot_families(self.slots(), self.changes)

def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
