# The few commands people type. `make test` sets up .venv from a fresh clone if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-slow lint format bench device-check clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project with its dev extra

# One torch thread: on the 2-core box the reward runs in worker threads beside the sampler, and
# two torch threads made epochs up to 2x slower (BENCHMARKS.md, the main job). More cores:
# make demo DEMO_THREADS=4
DEMO_THREADS ?= 1

demo: $(STAMP)  ## the main job: DDPO + HyperAlign on the shapes world, judged by an oracle
	$(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 \
		--num_cpu_threads_per_process $(DEMO_THREADS) \
		--mixed_precision no --dynamo_backend no -m hyperalign demo --out runs/demo $(DEMO_ARGS)

test: $(STAMP)  ## the offline CPU test suite (slow tests excluded)
	$(PY) -m pytest -q

test-slow: $(STAMP)  ## only the slow (real-size) tests
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)  ## CPU benchmarks (tables go to BENCHMARKS.md by hand)
	$(PY) scripts/bench_reward.py

device-check: $(STAMP)  ## on a GPU machine: the GPU figures BENCHMARKS.md lacks (DEVICE_CHECK_TINY=1 on CPU)
	PYTHON=$(PY) bash scripts/device_check.sh

clean:
	rm -rf $(VENV) runs build *.egg-info
