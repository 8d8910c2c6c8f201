"""Test-wide setup. On a machine without CUDA every test process runs Triton kernels through the interpreter;
the variable must be set before any kernel module is imported, hence here, at conftest import time."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread per test process: the suite runs under pytest-xdist with a worker per core, and workers
# that each start a thread per core fight over the cores (tiny matmuls then slow down by an order of magnitude).
# Tests are small; one thread also keeps them deterministic in a single process.
torch.set_num_threads(1)
