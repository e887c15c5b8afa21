"""Command-line options shared by several ``nexedge`` commands: each defined once, here.

``--threads`` lives in :mod:`nexedge.threads` (:func:`add_threads_option`, re-exported here) beside
the code that applies it. Cheap to import: no torch (``nexedge --help`` builds every parser).
"""

import argparse

from nexedge.metrics import DEFAULT_TPR_FLOOR
from nexedge.threads import add_threads_option

__all__ = ["DEFAULT_TPR_FLOOR", "add_threads_option", "add_tpr_floor_option"]


def _tpr_floor_arg(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tpr-floor {text!r}: expected a number in (0, 1)") from None
    if not 0.0 < x < 1.0:
        raise argparse.ArgumentTypeError(f"--tpr-floor {text!r}: expected a number in (0, 1)")
    return x


def add_tpr_floor_option(p: argparse.ArgumentParser) -> None:
    """The one ``--tpr-floor`` option (train, eval, export, thresholds): the floor below which an
    operating point's 95 % TPR lower bound is reported with a WARNING; default
    :data:`nexedge.metrics.DEFAULT_TPR_FLOOR`."""
    p.add_argument("--tpr-floor", type=_tpr_floor_arg, default=DEFAULT_TPR_FLOOR, metavar="P",
                   help="WARN when a TPR target's 95%% lower bound (given the defects measured) is below this "
                        f"(default {DEFAULT_TPR_FLOOR:g})")
