"""``nexedge demo``: the whole product end to end on synthetic data, on a CPU, in minutes.

Stages (each one calls the real piece of nexedge; a missing piece fails the
demo loudly, nothing is faked): synthesize a data set -> train a small model
-> report-style evaluation table -> export to ONNX with the crops that measure best ->
INT8 calibration -> start ``nexedge-daemon`` -> stream the test images from
simulated cameras -> verdict summary and latency -> pull the uncertain samples.
Every artifact lands under one run folder; stage timings and the total wall
time are printed at the end and saved as ``demo-summary.json``.

Modules: ``cli`` (the command: options and ``run_demo``), ``profiles`` (sizes and settings),
``context`` (the ``Demo`` every stage receives), ``run`` (runs the stages, prints the recap and
timings), ``stages`` (one function per stage), ``line`` (the daemon and the simulated cameras).
Light at import: the stages load when the demo runs, and import torch and friends when they run.
"""
