# Deep clustering benchmark harness.  `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
METHOD ?= conr
DATASET ?= digits
SEEDS ?= 0,1,2
LAUNCHER ?= local
ARGS ?=
RESULTS ?= results
# sweeps
METHODS ?= kmeans,byol
DATASETS ?= digits
SUITE ?=
PYTEST_ARGS ?=

.PHONY: help install bench table report test test-all lint perf chaos sweep status cancel gpu-smoke gpu-bench slurm-up slurm-down clean

help:
	@echo "make install                 create .venv and install the project (editable) with its dev tools"
	@echo "make bench [METHOD=conr] [DATASET=digits] [SEEDS=0,1,2]   run a benchmark and print its table"
	@echo "make table / make report     aggregate run records into tables / a report with figures"
	@echo "make test                    the test suite (fast tests, SLURM tests when a cluster can start)"
	@echo "make perf                    pytest-benchmark suite, JSON kept under results/perf/"
	@echo "make sweep METHODS=.. DATASETS=.. SEEDS=.. LAUNCHER=local|slurm  or  make sweep SUITE=paper"
	@echo "make lint                    ruff"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

$(VENV): $(VENV)/.installed

install: $(VENV)/.installed

bench: $(VENV)
	$(PY) -m bench run method=$(METHOD) dataset=$(DATASET) seeds=[$(SEEDS)] launcher=$(LAUNCHER) results_dir=$(RESULTS) $(ARGS)
	@echo
	$(PY) -m bench table dataset=$(DATASET) results_dir=$(RESULTS)

table: $(VENV)
	$(PY) -m bench table results_dir=$(RESULTS) $(ARGS)

report: $(VENV)
	$(PY) -m bench report results_dir=$(RESULTS) $(ARGS)

test: $(VENV)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(VENV)
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

perf: $(VENV)
	@mkdir -p results/perf
	$(PY) -m pytest -q tests/perf --benchmark-only --benchmark-json=results/perf/latest.json $(PYTEST_ARGS)

chaos: $(VENV)
	@tally=$$(mktemp); \
	CHAOS_REPORT=$$tally OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -m chaos $(PYTEST_ARGS); status=$$?; \
	echo; $(PY) scripts/chaos_report.py $$tally --pytest-status $$status; rc=$$?; rm -f $$tally; exit $$rc

lint: $(VENV)
	$(PY) -m ruff check bench methods tests scripts

sweep: $(VENV)
	$(PY) -m bench sweep $(if $(SUITE),suite=$(SUITE) $(if $(filter command,$(origin METHODS)),methods=[$(METHODS)]) $(if $(filter command,$(origin DATASETS)),datasets=[$(DATASETS)]) $(if $(filter command,$(origin SEEDS)),seeds=[$(SEEDS)]),methods=[$(METHODS)] datasets=[$(DATASETS)] seeds=[$(SEEDS)]) launcher=$(LAUNCHER) results_dir=$(RESULTS) $(ARGS)

status: $(VENV)
	$(PY) -m bench status results_dir=$(RESULTS) $(if $(SWEEP),sweep=$(SWEEP)) $(ARGS)

cancel: $(VENV)
	$(PY) -m bench cancel results_dir=$(RESULTS) $(if $(SWEEP),sweep=$(SWEEP)) $(ARGS)

slurm-up:
	bash scripts/slurm_cluster.sh up

slurm-down:
	bash scripts/slurm_cluster.sh down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

gpu-smoke: $(VENV)
	$(PY) scripts/gpu_bench.py --smoke

gpu-bench: $(VENV)
	@mkdir -p results/perf
	$(PY) scripts/gpu_bench.py --json results/perf/gpu_bench.json
