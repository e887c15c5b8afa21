"""Shift monitor on score streams: false alarms on an in-distribution line, detection delay after a drift.

The card's reference is built the way training builds it (``nexedge.metrics.score_histogram`` of
validation scores: ``val_good`` good and ``val_defect`` defect images, the validation class mix,
e.g. a third defects). The line runs at ``line_defects`` (1 %). Scores are logit-normal stand-ins:
good logit ~ N(-6, 1.5), defect logit ~ N(3, 2); the threshold passes 1 % of good parts (overkill 1 %).

Streams per seed, each through a fresh :class:`nexedge.serve.monitor.ShiftMonitor` (PSI only):

* ``steady``: ``steady`` frames from the reference distribution at the line's defect rate;
* drifts, ``before`` steady frames then ``after`` drifted ones: ``overkill x2`` and ``overkill x5``
  (good scores shifted up in log-odds until twice / five times as many good parts pass the threshold),
  ``good spread x1.5``, and ``defects 1 % -> 5 %`` (not a model drift: the estimated prior should follow).

Monitors, side by side on the same streams: bins on [0, 1] with the validation mix as reference (the
behaviour before log-odds bins), bins on [0, 1] with the right prior, and log-odds bins with the prior
estimated from the camera's history (the default) or set to the line's rate.

    python benchmarks/bench_shift_scores.py --markdown benchmarks/results/shift_scores.md
"""

import argparse
import os
import platform
import sys
import time
from statistics import NormalDist
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import _common as common  # noqa: E402
from nexedge.metrics import score_histogram  # noqa: E402
from nexedge.serve.monitor import ShiftMonitor  # noqa: E402

#: What this benchmark measures with (``--set KEY=VALUE`` changes one value for a run).
RECIPE = common.recipe(
    seeds=(10, "simulated lines, one per seed"),
    val_good=(300, "good validation scores on the card"),
    val_defect=(150, "defect validation scores on the card"),
    line_defects=(0.01, "the line's defect rate"),
    window=(500, "monitor window (frames)"),
    steady=(20000, "frames of the steady stream"),
    before=(2000, "steady frames before a drift"),
    after=(5000, "drifted frames"),
    limit=(None, float, "PSI limit (None: the monitor's)"),
)

MU_G, SD_G, MU_D, SD_D = -6.0, 1.5, 3.0, 2.0
T_LOGIT = MU_G + SD_G * NormalDist().inv_cdf(0.99)  # 1 % overkill


def shift_for_overkill(rate: float) -> float:
    """Log-odds shift of the good scores that makes ``rate`` of them pass the threshold."""
    return T_LOGIT - MU_G - SD_G * NormalDist().inv_cdf(1 - rate)


def scores(rng: np.random.Generator, n: int, p_defect: float, good_shift: float = 0.0,
           good_sd: float = SD_G) -> np.ndarray:
    d = rng.random(n) < p_defect
    z = np.where(d, rng.normal(MU_D, SD_D, n), rng.normal(MU_G + good_shift, good_sd, n))
    return 1.0 / (1.0 + np.exp(-z))


DRIFTS: Dict[str, Dict[str, float]] = {
    "overkill x2": {"good_shift": shift_for_overkill(0.02)},
    "overkill x5": {"good_shift": shift_for_overkill(0.05)},
    "good spread x1.5": {"good_sd": SD_G * 1.5},
    "defects 1 % -> 5 %": {"p_defect": 0.05},
}


def card(rng: np.random.Generator, n_good: int, n_defect: int, logit: bool) -> Dict[str, Any]:
    s = np.concatenate([scores(rng, n_good, 0.0), scores(rng, n_defect, 1.0)])
    y = np.r_[np.zeros(n_good, int), np.ones(n_defect, int)]
    vs = score_histogram(y, s)
    if not logit:
        vs.pop("logit")  # a card from before log-odds histograms
    return {"val_scores": vs}


def monitors(args: argparse.Namespace, val_mix: float) -> Dict[str, Tuple[bool, Any]]:
    """name -> (log-odds reference?, defect_prior)."""
    return {
        "[0,1] bins, validation mix (before)": (False, val_mix),
        "[0,1] bins, prior set": (False, args.line_defects),
        "log-odds bins, prior estimated": (True, "estimate"),
        "log-odds bins, prior set": (True, args.line_defects),
    }


def run(mon: ShiftMonitor, stream: np.ndarray) -> Tuple[List[int], List[float]]:
    """Frames (index) at which a PSI alarm was raised, and the PSI values seen at checks."""
    raised, psis = [], []
    thr = 1.0 / (1.0 + np.exp(-T_LOGIT))
    for i, s in enumerate(stream):
        if "psi" in mon.observe("cam", float(s), "REJECT" if s >= thr else "PASS", False):
            raised.append(i)
        if i % 50 == 49:
            v = mon.snapshot()["cam"]["values"].get("psi")
            if v is not None:
                psis.append(v)
    return raised, psis


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return common.parse(common.parser(__doc__, RECIPE), RECIPE, argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    val_mix = args.val_defect / (args.val_good + args.val_defect)
    names = list(monitors(args, val_mix))
    res: Dict[str, Dict[str, List[Any]]] = {n: {"fa": [], "fa_n": [], "psi": []} for n in names}
    for n in names:
        for drift in DRIFTS:
            res[n][drift] = []
    t0 = time.time()
    load0 = os.getloadavg()[0]
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        cards = {True: card(rng, args.val_good, args.val_defect, True)}
        cards[False] = {"val_scores": {k: v for k, v in cards[True]["val_scores"].items() if k != "logit"}}
        steady = scores(np.random.default_rng([seed, 1]), args.steady, args.line_defects)
        drifted = {}
        for k, (drift, kw) in enumerate(DRIFTS.items()):
            r = np.random.default_rng([seed, 2, k])
            kw = dict(kw)
            p = kw.pop("p_defect", args.line_defects)
            drifted[drift] = np.concatenate([scores(r, args.before, args.line_defects), scores(r, args.after, p, **kw)])
        for name, (logit, prior) in monitors(args, val_mix).items():
            limits = {"psi": args.limit} if args.limit else {}

            def make(c: Dict[str, Any] = cards[logit], lim: Dict[str, float] = limits, p: Any = prior) -> ShiftMonitor:
                return ShiftMonitor(c, window=args.window, min_frames=args.window // 2, limits=lim, defect_prior=p)

            raised, psis = run(make(), steady)
            res[name]["fa"].append(bool(raised))
            res[name]["fa_n"].append(len(raised))
            res[name]["psi"] += psis
            for drift, stream in drifted.items():
                raised, _ = run(make(), stream)
                before = [i for i in raised if i < args.before]
                after = [i - args.before for i in raised if i >= args.before]
                res[name][drift].append(None if before else (after[0] if after else -1))
        print(f"seed {seed} done ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for name in names:
        r = res[name]
        fa_rate = sum(r["fa_n"]) / (args.seeds * args.steady) * 10000
        row = [name, f"{sum(r['fa'])}/{args.seeds}", f"{fa_rate:.2f}", f"{np.median(r['psi']):.3f}"]
        for drift in DRIFTS:
            vals = r[drift]
            early = sum(v is None for v in vals)
            hit = [v for v in vals if v is not None and v >= 0]
            cell = f"{len(hit)}/{args.seeds}"
            if hit:
                cell += f", {int(np.median(hit))}"
            if early:
                cell += f" ({early} before)"
            row.append(cell)
        rows.append(row)
    head = ["monitor", "steady: seeds with an alarm", "alarms per 10k frames", "median PSI - chance"] + \
        [f"{d}: detected, median delay" for d in DRIFTS]
    print(" | ".join(head))
    for row in rows:
        print(" | ".join(row))
    if args.markdown:
        limit = args.limit or ShiftMonitor({}).limits["psi"]
        md = ["## Shift monitor: false alarms and detection delay on score streams", "",
              f"`python benchmarks/bench_shift_scores.py{common.sets(args)}` on "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({platform.processor() or platform.machine()}, "
              f"load average {load0:.1f} at the start, {time.time() - t0:.0f} s). Card: {args.val_good} good + "
              f"{args.val_defect} defect validation scores; line: {args.line_defects:.0%} defects; window "
              f"{args.window} frames, PSI limit {limit}. Logit-normal stand-in scores (good N({MU_G}, {SD_G}), "
              f"defect N({MU_D}, {SD_D}) in log-odds; the threshold passes 1 % of good parts). Steady: "
              f"{args.steady} in-distribution frames per seed. Drifts: {args.before} steady frames, then "
              f"{args.after} drifted; detected = alarms within them (delay in frames after the change, median); "
              "'before' = an alarm before the change (a false alarm).", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
