"""The inference backends: each module here is one backend, named after it, declaring ``SPEC``.

:func:`nexedge.runtime.registry.backends` finds every module in this package (no list to keep), so
adding a backend is adding its module (plus its pip extra in setup.py and its test). A module must
stay light at import: a backend library (onnxruntime, tensorrt, torch, ...) is imported inside the
backend class, never at module level, so the daemon and the CLIs can list every backend on machines
that have only some of them. Python 3.8, no torch.
"""
