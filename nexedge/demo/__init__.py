"""``nexedge demo``: the whole product end to end on synthetic data, on a CPU, in minutes.

Stages (each one calls the real piece of nexedge; a missing piece fails the
demo loudly, nothing is faked): synthesize a data set -> train a small model
-> report-style evaluation table -> export to ONNX with the crops that measure best ->
INT8 calibration -> start ``nexedge-daemon`` -> stream the test images from
simulated cameras -> verdict summary and latency -> pull the uncertain samples.
Every artifact lands under one run folder; stage timings and the total wall
time are printed at the end and saved as ``demo-summary.json``.

Modules: ``profiles`` (sizes and options), ``context`` (the ``Demo`` every stage receives),
``stages`` (one function per stage), ``line`` (the daemon and the simulated cameras), ``run``
(drives the stages, prints the recap). Light at import: the stages load when the demo runs, and
import torch and friends when they run.
"""

from nexedge.demo.profiles import configure_demo
from nexedge.demo.run import run_demo

__all__ = ["configure_demo", "run_demo"]
