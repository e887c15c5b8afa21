"""Latency statistics: min, mean, median, p90, p95, p99, max over per-iteration samples.

Percentiles use the nearest-rank definition (the smallest sample with at least
p% of the samples at or below it), so every reported number is a latency that
was actually observed, and the result does not depend on the numpy version.
Python 3.8, numpy only.
"""

import math
from typing import Dict, Iterable, List, Sequence

import numpy as np

PERCENTILES = (50, 90, 95, 99)
#: Keys of :func:`summarize`, in the order reports print them.
STAT_KEYS = ("min", "mean", "median", "p90", "p95", "p99", "max")


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence; ``p`` in [0, 100]."""
    n = len(sorted_values)
    if n == 0:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile {p} out of range; expected 0..100")
    rank = max(1, int(math.ceil(p / 100.0 * n)))
    return float(sorted_values[rank - 1])


def summarize(samples: Iterable[float]) -> Dict[str, float]:
    """Statistics of a latency sample (any unit; callers use milliseconds)."""
    values: List[float] = sorted(float(x) for x in samples)
    if not values:
        raise ValueError("no samples to summarize")
    if any(math.isnan(v) for v in values):
        raise ValueError("latency samples contain NaN")
    return {
        "min": values[0],
        "mean": float(np.mean(values)),
        "median": percentile(values, 50),
        "p90": percentile(values, 90),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": values[-1],
        "n": len(values),
    }


def ratio(a: float, b: float) -> float:
    """``b / a``, NaN when ``a`` is zero (a ratio column never divides by zero)."""
    return float(b) / float(a) if a else float("nan")
