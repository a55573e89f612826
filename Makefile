# The two everyday commands: `make run` (set up + train on the bundled corpus) and `make test`;
# `make test-fast` runs the unit lane alone (under a minute).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast fuzz lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned to the CPU wheel on disk, so nothing pulls a CUDA build
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev,tensorboard,wandb,mlflow,datasets,serve]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) training.py

test: lint
	$(PY) -m pytest -q

# The unit lane alone (see tests/conftest.py). Its tensors are tiny: one thread is as fast on a
# quiet machine, and extra threads only wait on each other on a busy one.
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m unit

# The fuzz lane with many more examples than make test's fixed budget (LMTRAIN_FUZZ=long).
fuzz: $(STAMP)
	LMTRAIN_FUZZ=long OMP_NUM_THREADS=1 $(PY) -m pytest -q -m fuzz -p no:cacheprovider

# ruff, then the type checker over src/ (it refuses a whole config where a group is typed)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools training.py training_resume.py
	$(VENV)/bin/mypy

# Benchmarks are not tests: run them on a quiet machine; each prints markdown tables.
bench: $(STAMP)
	$(PY) benchmarks/bench_speed.py
	$(PY) benchmarks/bench_tokenize.py --sizes 30,300
	$(PY) benchmarks/bench_lora.py
	$(PY) benchmarks/bench_sample.py
	$(PY) benchmarks/bench_recipe.py --out bench-recipe
	$(PY) benchmarks/bench_step_parts.py
	$(PY) benchmarks/bench_qa.py --out bench-qa --plot --speed 280

clean:
	rm -rf $(VENV) checkpoints logs outputs
