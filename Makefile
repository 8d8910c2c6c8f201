# Every target does its own set-up from a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# torch is pinned here: a looser requirement would pull a multi-GB CUDA build on a CPU machine.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.setup-stamp
PYTEST_WORKERS ?= 2

.PHONY: setup test demo titan-demo bench micro-bench compare compile-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	# The torchtitan extra installs only on Python >= 3.11 (its marker); the torch pin keeps this torch build.
	$(PY) -m pip install -q $(TORCH_PIN) -e '.[engine,dev,torchtitan]'
	touch $(STAMP)

# The compile gate runs without the interpreter: triton.compile refuses TRITON_INTERPRET=1.
compile-check: setup
	env -u TRITON_INTERPRET $(PY) -m nitp_kernels.compile_check

test: setup compile-check
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

# Run again, the demo continues where it stopped (a finished one reports that there is nothing to train).
demo: setup
	$(PY) engine/train.py --preset tiny --out runs/demo --resume auto

# torchtitan's llama3 debug model with NITP, 10 steps on CPU on the stdlib corpus (no download).
titan-demo: setup
	$(PY) examples/titan_demo.py

bench: setup
	$(PY) -m benchmarks.run $(if $(QUICK),--quick,)

# pytest-benchmark timings of the op, fwd+bwd (not part of test). BENCH_ARGS passes pytest-benchmark options, e.g.
# BENCH_ARGS=--benchmark-autosave on one commit, then BENCH_ARGS=--benchmark-compare on the next.
micro-bench: setup
	$(PY) -m pytest benchmarks --benchmark-only $(BENCH_ARGS)

# NTP vs NITP vs cosine regularisation on the tiny preset: plots and a summary under
# runs/compare/<UTC time>/ (a fresh folder each time: the comparison times every run from scratch)
compare: setup
	$(PY) -m engine.compare $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) runs .pytest_cache

# The competitors' pure-Python wheels for the GPU machine, which has no network: benchmarks/gpu_check.sh installs
# them from .whl/ (git-ignored) with --no-index. Pinned to the versions of the dev environment, for Python 3.12.
# Their METADATA requires only torch and triton (the rest are extras), which the GPU machine has. Needs only pip.
LIGER_PIN ?= liger-kernel==0.8.5
CCE_PIN ?= cut-cross-entropy==25.1.1
.PHONY: gpu-wheels
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --dest .whl $(LIGER_PIN) $(CCE_PIN)
	@ls -l .whl
