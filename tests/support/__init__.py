"""Test support shared by tests/ and benchmarks/, imported as ``tests.support.<module>`` (the
repository root on ``sys.path``: pyproject.toml's pytest ``pythonpath``, a benchmark's own insert).

* :mod:`.daemon`: the tiny ONNX model with its card, daemon configs, a Daemon on a thread.
* :mod:`.daemon_proc`: the daemon as a real process (``nexedge-daemon``), with its RSS and metrics.
* :mod:`.hostile`, :mod:`.zmtp`: hostile ZeroMQ messages and a raw ZMTP peer.
* :mod:`.trt_fakes`: the fake TensorRT and cuda-python, and a line-install ``nexedge`` on them.
* :mod:`.userdata`: a data set as a user's own class folders arrive.
* :mod:`.shared`: artifacts built once per test run and shared by every file and xdist worker.
"""
