# `make test` works from nothing: it creates .venv and installs the project first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-unit test-integration test-cuda bench train reproduce clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[framework,dev,bench]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# the unit tier (the library, configs, loaders, messages: about a minute) and the integration tier (the training
# pipeline, the CLI, DDP / FSDP, sweeps, kill / resume); `make test` runs both
test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

test-integration: $(STAMP)
	$(PY) -m pytest -q -m integration

# on a machine with a GPU: the CUDA invariants and a bf16 training run (tests/test_cuda.py)
test-cuda: $(STAMP)
	$(PY) -m pytest -q tests/test_cuda.py

bench: $(STAMP)
	$(PY) -m benchmarks.run

train: $(STAMP)
	$(PY) train.py

# the CPU-scale reproduction of the paper's claims (~15-20 min on 2 cores): experiments/cpu_repro/REPORT.md
reproduce: $(STAMP)
	$(PY) -m experiments.cpu_repro

clean:
	rm -rf $(VENV) logs outputs multirun .pytest_cache
