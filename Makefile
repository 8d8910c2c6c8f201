# Every target does its own set-up from a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# torch is pinned here: a looser requirement would pull a multi-GB CUDA build on a CPU machine.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.setup-stamp
PYTEST_WORKERS ?= 2

.PHONY: setup test demo bench compare compile-check clean

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

demo: setup
	$(PY) engine/train.py --preset tiny --out runs/demo

bench: setup
	$(PY) -m benchmarks.run $(if $(QUICK),--quick,)

# NTP vs NITP vs cosine regularisation on the tiny preset: plots and a summary under runs/compare/
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
