# Quick start: `make demo` (main job on the shipped toy reasoner), `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-gpu lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on disk; anything else would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lens-steer demo --out runs/demo

test: $(STAMP)
	# two workers, one torch thread each (tests/conftest.py): the 2-core machine's fastest split
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m benchmarks.run

# One GPU, ~5 min: R1-Distill-Qwen 1.5B/7B shapes, random weights (benchmarks/gpu.py).
bench-gpu: $(STAMP)
	$(PY) -m benchmarks.run --device cuda

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs build *.egg-info
