# Every target does its own set-up from a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# torch is pinned here: a looser requirement would pull a multi-GB CUDA build on a CPU machine.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.setup-stamp
PYTEST_WORKERS ?= 2

.PHONY: setup test demo bench micro-bench compare compile-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[engine,dev]'
	touch $(STAMP)

# The compile gate runs without the interpreter: triton.compile refuses TRITON_INTERPRET=1.
compile-check: setup
	env -u TRITON_INTERPRET $(PY) -m nitp_kernels.compile_check

test: setup compile-check
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

# Run again, the demo continues where it stopped (a finished one reports that there is nothing to train).
demo: setup
	$(PY) engine/train.py --preset tiny --out runs/demo --resume auto

bench: setup
	$(PY) -m benchmarks.run $(if $(QUICK),--quick,)

# pytest-benchmark timings of the op, fwd+bwd (not part of test). BENCH_ARGS passes pytest-benchmark options, e.g.
# BENCH_ARGS=--benchmark-autosave on one commit, then BENCH_ARGS=--benchmark-compare on the next.
micro-bench: setup
	$(PY) -m pytest benchmarks --benchmark-only $(BENCH_ARGS)

# NTP vs NITP vs cosine regularisation on the tiny preset: plots and a summary under
# runs/compare/<UTC time>/ (a fresh folder each time: the comparison times every run from scratch).
# LONG=1: the multi-seed sweep (NTP, NITP at λ 0.1/0.3/1.0, cosreg; 4,000 steps; seeds 0,1,2; two runs at a
# time, one thread each; an estimate: 3 to 8 hours on 2 CPU cores). COMPARE_ARGS passes flags, e.g.
# COMPARE_ARGS="--seeds 0,1 --lambdas 0.3 --steps 2000 --out runs/compare/sweep" (the same --out continues it).
compare: setup
	$(PY) -m engine.compare $(if $(QUICK),--quick,) $(if $(LONG),--long,) $(COMPARE_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
