"""Test-wide setup and fixtures (the shared helpers are plain functions in tests/helpers.py).

On a machine without CUDA every test process runs Triton kernels through the interpreter; the variable must
be set before any kernel module is imported, hence here, at conftest import time."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread per test process: the suite runs under pytest-xdist with a worker per core, and workers
# that each start a thread per core fight over the cores (tiny matmuls then slow down by an order of magnitude).
# Tests are small; one thread also keeps them deterministic in a single process.
torch.set_num_threads(1)


@pytest.fixture
def train_state():
    """build_state for a test: call it with a TrainConfig; every state built is closed at teardown (run
    directory released, process group left), whatever the test does."""
    from engine.trainer import build_state  # imported here so that op-only test runs never load the engine

    states = []

    def build(cfg):
        state = build_state(cfg)
        states.append(state)
        return state

    yield build
    for state in states:
        state.close()
