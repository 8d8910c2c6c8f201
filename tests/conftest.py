"""Test-wide setup. On a machine without CUDA every test process runs Triton kernels through the interpreter;
the variable must be set before any kernel module is imported, hence here, at conftest import time."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every worker would start as many threads as there are cores: on a 2-core machine two
# workers then fight over them and tiny matmuls slow down by an order of magnitude.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
