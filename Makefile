# The two everyday commands: `make run` (set up + train on the bundled corpus) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned to the CPU wheel on disk, so nothing pulls a CUDA build
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev,tensorboard]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) training.py

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks training.py training_resume.py
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks training.py training_resume.py
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) checkpoints logs outputs
