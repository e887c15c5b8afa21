# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint compat install-check venv clean

$(STAMP): setup.py requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/nexedge demo

lint: $(STAMP)
	$(BIN)/ruff check nexedge tests benchmarks tools setup.py

# The daemon side (runtime, serve, store, card, preprocess) must run on Python 3.8 (JetPack 5).
DAEMON_MODULES := nexedge/__init__.py nexedge/threads.py nexedge/card.py nexedge/metrics.py nexedge/preprocess.py nexedge/runtime nexedge/serve nexedge/store
# What a Jetson's line install runs besides the daemon: doctor, build-engine, thresholds, check-onnx.
DEVICE_MODULES := nexedge/cli.py nexedge/doctor.py nexedge/export/cli.py nexedge/export/cuda_device.py nexedge/export/trt_rules.py nexedge/export/trt_names.py nexedge/export/trt_recipe.py nexedge/export/trt_network.py nexedge/export/trt_build.py nexedge/export/thresholds.py nexedge/export/onnx_check.py nexedge/export/calibrate.py nexedge/export/parity.py nexedge/images.py nexedge/cliopts.py nexedge/export/__init__.py nexedge/train/config.py nexedge/train/cli.py nexedge/progress.py nexedge/models/__init__.py nexedge/models/archs nexedge/demo nexedge/bench/__init__.py nexedge/bench/cli.py nexedge/data/__init__.py nexedge/data/cli.py nexedge/data/spec.py nexedge/explain.py nexedge/relabel/__init__.py nexedge/relabel/cli.py nexedge/train/__init__.py nexedge/train/cardbuild.py
compat: $(STAMP)
	$(BIN)/vermin --no-tips --violations -t=3.8- --eval-annotations --backport dataclasses $(DAEMON_MODULES) $(DEVICE_MODULES)
	$(BIN)/python tools/check_no_torch.py

# README's install lines resolved per platform with pip (no install); says SKIPPED without the package index.
install-check: $(STAMP)
	$(BIN)/python tools/check_install.py

# lint and compat first (seconds), then the test suite on every usable core (pytest-xdist, -n auto:
# at most 4 workers, tests/conftest.py) with install-check (about a CPU-minute of pip resolving)
# running beside it, niced, in the time the daemon tests leave the cores idle. Fails when any of the
# four fails; install-check's output is printed after pytest's.
test: $(STAMP) lint compat
	@nice -n 10 $(BIN)/python tools/check_install.py > $(VENV)/install-check.log 2>&1 & ic=$$!; \
	$(BIN)/python -m pytest -q -n auto -m "not gpu and not tensorrt"; rc=$$?; \
	wait $$ic; ic_rc=$$?; \
	echo "--- install-check (tools/check_install.py):"; cat $(VENV)/install-check.log; \
	if [ $$ic_rc -ne 0 ]; then echo "make test: install-check FAILED (exit $$ic_rc)"; fi; \
	if [ $$rc -ne 0 ]; then echo "make test: pytest FAILED (exit $$rc)"; fi; \
	[ $$rc -eq 0 ] && [ $$ic_rc -eq 0 ]

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
