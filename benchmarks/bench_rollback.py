#!/usr/bin/env python3
"""Automatic rollback and promotion rules, by simulation: false- and missed-rollback rates per hour
watched, and promotion rates of adversarial candidates, at line rates 1, 10 and 50 devices/s and
reject rates 0.2-5 %.

Rollback: a model is promoted; the previous model's last hour of decisions is the baseline; the
promoted model is watched for one hour and checked every minute (``auto_rollback_baseline`` = one
hour of frames, ``auto_rollback_subgroup`` = one minute, ``auto_rollback_watch`` = one hour,
``auto_rollback_alpha`` 0.01). Per cell ``--trials`` promotions are simulated: the baseline's
rejects ~ Binomial(K, p), the promoted model's per-minute rejects ~ Binomial(n, p'), and the
daemon's own limits (:meth:`nexedge.serve.rules.RollbackChart.limits`) decide. A false rollback
is one of a model as good as the previous one (p' = p); a missed rollback is an hour without one
for a model that rejects nothing, everything, a third or three times as often. The old 3-sigma
p-chart (normal limits from a 200-frame baseline, p clamped to 1/(2K), subgroups of 200) is
simulated over the same hour for comparison.

Promotion: a one-hour shadow phase, the active model rejecting at p; candidates that PASS a share
of the active model's REJECTs (0 = a twin, 2 %, 5 %, 10 %, all of them) and otherwise agree, one
rejecting at p independently of the active model, one rejecting everything. The rule is checked
every 64 frames (``auto_promote_frames`` 1,000, ``auto_promote_max_disagreement`` 0.01,
``auto_promote_max_escape`` 0.05), as :func:`nexedge.serve.rules.promotion_verdict` decides it.
The old rule (total disagreement <= 0.01 only) is shown for the always-PASS candidate.

    python benchmarks/bench_rollback.py --markdown benchmarks/results/rollback.md
"""

import argparse
import datetime as _dt
import os
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import _common as common  # noqa: E402
from nexedge.bench import env, report  # noqa: E402
from nexedge.serve import rules  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    trials=(1000, "simulated promotions per rollback cell"),
    promote_trials=(300, "simulated shadow phases per promotion cell"),
    seed=(0, "random seed of the simulation"),
)

LINE_RATES = (1, 10, 50)
REJECT_RATES = (0.002, 0.006, 0.02, 0.05)
ALPHA = 0.01
ESCAPE_SHARES = (0.0, 0.02, 0.05, 0.10, 1.0)
PROMOTE = dict(min_frames=1000, max_disagreement=0.01, max_escape=0.05)
CHECK_EVERY = 64


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return common.parse(common.parser(__doc__, RECIPE), RECIPE, argv)


# -- rollback ---------------------------------------------------------------------------------
def _first_fire(cum: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per trial (rows): index of the first check outside [lo + 1, hi - 1], or -1."""
    out = (cum <= lo) | (cum >= hi)
    first = out.argmax(axis=1)
    return np.where(out.any(axis=1), first, -1)


def rollback_cell(rate: int, p: float, trials: int, rng: np.random.Generator) -> Dict[str, Any]:
    n, checks = rate * 60, 60
    k = rate * 3600
    chart = rules.RollbackChart(baseline=k, every=n, watch=n * checks, alpha=ALPHA)
    xs = rng.binomial(k, p, trials)
    cache: Dict[int, Any] = {}
    for x in np.unique(xs):
        lo, hi = chart.limits(int(x), k)
        cache[int(x)] = (np.asarray(lo), np.asarray(hi))
    lo = np.stack([cache[int(x)][0] for x in xs])
    hi = np.stack([cache[int(x)][1] for x in xs])
    out: Dict[str, Any] = {"rate": rate, "p": p, "baseline": k, "every": n}
    scenarios = {"same": p, "zero": 0.0, "all": 1.0, "third": p / 3, "triple": min(1.0, 3 * p)}
    for name, q in scenarios.items():
        cum = np.cumsum(rng.binomial(n, q, (trials, checks)), axis=1)
        first = _first_fire(cum, lo, hi)
        fired = first >= 0
        out[name] = float(fired.mean()) if name == "same" else float((~fired).mean())
        out[name + "_minutes"] = float(np.median(first[fired] + 1)) if fired.any() else None
    x_mid = int(round(k * p))
    lo_mid, _ = chart.limits(x_mid, k)
    can = [j + 1 for j, v in enumerate(lo_mid) if v >= 0]
    out["lower_from_min"] = can[0] if can else None
    # the old chart: normal 3-sigma limits from a 200-frame baseline, subgroups of 200, over the same hour
    k0, sub = 200, 200
    x0 = rng.binomial(k0, p, trials) / k0
    p0 = np.clip(x0, 0.5 / k0, 1 - 0.5 / k0)
    sig = np.sqrt(p0 * (1 - p0) / sub)
    lcl, ucl = np.maximum(0, p0 - 3 * sig), np.minimum(1, p0 + 3 * sig)
    rates = rng.binomial(sub, p, (trials, rate * 3600 // sub)) / sub
    out["old_same"] = float(((rates < lcl[:, None]) | (rates > ucl[:, None])).any(axis=1).mean())
    zero = np.zeros_like(rates)
    out["old_zero"] = float((~((zero < lcl[:, None]) | (zero > ucl[:, None])).any(axis=1)).mean())
    return out


def check_fidelity(rng: np.random.Generator) -> int:
    """The vectorised simulation must decide as RollbackChart.observe does: a few trials both ways."""
    class Slot:
        pass

    mismatches = 0
    for p, q in ((0.02, 0.02), (0.02, 0.0), (0.006, 0.03)):
        k, n, checks = 3600, 60, 60
        for _ in range(20):
            old, new = Slot(), Slot()
            chart = rules.RollbackChart(baseline=k, every=n, watch=n * checks, alpha=ALPHA)
            base = rng.random(k) < p
            chart.observe(old, list(base))
            chart.arm(old, new, "new")
            stream = rng.random(n * checks) < q
            hit = None
            for i in range(0, len(stream), 8):
                hit = chart.observe(new, list(stream[i:i + 8]))
                if hit is not None:
                    break
            lo, hi = (np.asarray(v) for v in rules.RollbackChart(k, n, n * checks, ALPHA).limits(int(base.sum()), k))
            cum = np.cumsum(stream.reshape(checks, n).sum(axis=1))[None, :]
            first = int(_first_fire(cum, lo[None, :], hi[None, :])[0])
            mismatches += (hit is None) != (first < 0) or (hit is not None and hit["frames"] != (first + 1) * n)
    return mismatches


# -- promotion --------------------------------------------------------------------------------
def _needed_table(kmax: int) -> np.ndarray:
    """need[k]: the fewest active REJECTs with k of them PASSed at which the escape bound is <= max_escape
    (Clopper-Pearson duality: the upper bound is <= e exactly when P(Binomial(m, e) <= k) <= 1 - conf)."""
    from scipy.stats import binom

    e, a = PROMOTE["max_escape"], 1 - rules.PROMOTE_CONFIDENCE
    need = np.empty(kmax + 1, np.int64)
    m = rules.rejects_needed(e)
    for k in range(kmax + 1):
        m = max(m, k + 1)
        while binom.cdf(k, m, e) > a:
            m += 1
        need[k] = m
    for k, extra in ((0, 0), (0, -1), (3, 0), (3, -1), (12, 0), (12, -1)):  # the table is the daemon's rule
        m = int(need[k]) + extra
        assert (rules.cp_upper(k, m) <= e) == (extra == 0), (k, m)
    return need


def promotion_cell(rate: int, p: float, trials: int, rng: np.random.Generator, need: np.ndarray) -> Dict[str, Any]:
    frames = rate * 3600
    checks = np.arange(CHECK_EVERY, frames + 1, CHECK_EVERY)
    out: Dict[str, Any] = {"rate": rate, "p": p}
    cands = {f"escape_{e:g}": e for e in ESCAPE_SHARES}
    cands.update({"random_same_rate": "random", "always_reject": "reject"})
    for name, kind in cands.items():
        promoted, minutes = 0, []
        old_promoted = 0
        for _ in range(trials):
            act = rng.random(frames) < p
            if kind == "random":
                cand = rng.random(frames) < p
            elif kind == "reject":
                cand = np.ones(frames, bool)
            else:
                cand = act & (rng.random(frames) >= kind)
            rp = np.cumsum(act & ~cand)[checks - 1]
            rr = np.cumsum(act & cand)[checks - 1]
            pr = np.cumsum(~act & cand)[checks - 1]
            rej = rp + rr
            ok = (checks >= PROMOTE["min_frames"]) & (rej > 0) & (rej >= need[np.minimum(rp, len(need) - 1)]) \
                & (rp < len(need) - 1) & ((pr + rp) / checks <= PROMOTE["max_disagreement"])
            if ok.any():
                promoted += 1
                minutes.append(checks[ok.argmax()] / rate / 60)
            old = (checks >= PROMOTE["min_frames"]) & ((pr + rp) / checks <= PROMOTE["max_disagreement"])
            old_promoted += bool(old.any())
        out[name] = promoted / trials
        out[name + "_minutes"] = float(np.median(minutes)) if minutes else None
        out[name + "_old"] = old_promoted / trials
    return out


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _min(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.0f}"


def render(doc: Dict[str, Any], markdown: bool) -> str:
    parts = []
    if markdown:
        parts += ["## rollback", "", f"Machine: {doc['machine']}  ", f"Date: {doc['date']}  ",
                  f"Command: `{doc['command']}`  ", f"Run time: {doc['seconds']:.0f} s", ""]
    parts.append(f"Automatic rollback, one change watched for one hour, checked every minute, baseline one hour of "
                 f"the previous model, auto_rollback_alpha {ALPHA}; {doc['trials']} simulated changes per row. "
                 "'false' is the share of changes to an equally good model rolled back within the hour (= false "
                 "rollbacks per hour watched); 'missed' the share of bad models NOT rolled back within the hour; "
                 "minutes: median time to the rollback. Old: the 3-sigma p-chart this replaced (200-frame baseline "
                 "and subgroups) over the same hour. Fidelity: the simulation and RollbackChart.observe disagreed on "
                 f"{doc['fidelity_mismatches']} of 60 streams.")
    parts.append("")
    rows = []
    for c in doc["rollback"]:
        rows.append([f"{c['rate']}/s", f"{100 * c['p']:g} %", c["baseline"], _pct(c["same"]), _pct(c["old_same"]),
                     _pct(c["zero"]), _pct(c["old_zero"]), _min(c["zero_minutes"]), _min(c["lower_from_min"]),
                     _pct(c["all"]), _min(c["all_minutes"]), _pct(c["third"]), _min(c["third_minutes"]),
                     _pct(c["triple"]), _min(c["triple_minutes"])])
    parts.append(report.table(["line", "reject rate", "baseline frames", "false", "false (old)",
                               "missed: rejects none", "missed (old)", "min", "lower limit from min",
                               "missed: rejects all", "min", "missed: p/3", "min", "missed: 3p", "min"],
                              rows, markdown))
    parts.append("")
    parts.append(f"Automatic promotion within a one-hour shadow phase (auto_promote_frames {PROMOTE['min_frames']}, "
                 f"max_disagreement {PROMOTE['max_disagreement']}, max_escape {PROMOTE['max_escape']}, checked every "
                 f"{CHECK_EVERY} frames); share of {doc['promote_trials']} simulated phases in which the candidate was "
                 "promoted (median minutes to it). 'PASSes x of REJECTs': the candidate PASSes that share of the "
                 "frames the active model REJECTs and agrees otherwise. Old rule: total disagreement <= 0.01 only.")
    parts.append("")
    rows = []
    for c in doc["promotion"]:
        row = [f"{c['rate']}/s", f"{100 * c['p']:g} %"]
        for e in ESCAPE_SHARES:
            key = f"escape_{e:g}"
            row.append(_pct(c[key]) + ("" if c[key + "_minutes"] is None else f" ({c[key + '_minutes']:.0f} min)"))
        row += [_pct(c["random_same_rate"]), _pct(c["always_reject"]), _pct(c["escape_1_old"])]
        rows.append(row)
    parts.append(report.table(["line", "reject rate", "twin", "PASSes 2 % of REJECTs", "5 %", "10 %",
                               "all (always PASS)", "random at p", "always REJECT", "always PASS, old rule"],
                              rows, markdown))
    return "\n".join(parts) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    rng = np.random.default_rng(a.seed)
    t0 = time.monotonic()
    doc: Dict[str, Any] = {"machine": env.one_line(env.capture()),
                           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           "command": " ".join(["python", "benchmarks/bench_rollback.py"] + (argv or sys.argv[1:])),
                           "trials": a.trials, "promote_trials": a.promote_trials,
                           "fidelity_mismatches": check_fidelity(rng), "rollback": [], "promotion": []}
    if doc["fidelity_mismatches"]:
        print(f"bench_rollback: the simulation disagrees with RollbackChart on {doc['fidelity_mismatches']} streams",
              file=sys.stderr)
        return 1
    for rate in LINE_RATES:
        for p in REJECT_RATES:
            doc["rollback"].append(rollback_cell(rate, p, a.trials, rng))
            print(f"rollback {rate}/s p={p}: done ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    need = _needed_table(1000)  # more PASSed REJECTs than that never qualify within an hour at 50/s
    for rate in LINE_RATES:
        for p in REJECT_RATES:
            doc["promotion"].append(promotion_cell(rate, p, a.promote_trials, rng, need))
            print(f"promotion {rate}/s p={p}: done ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    doc["seconds"] = time.monotonic() - t0
    report.emit(lambda md: render(doc, md), a.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
