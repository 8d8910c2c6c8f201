"""Test-wide setup. On a machine without CUDA every test process runs Triton kernels through the interpreter;
the variable must be set before any kernel module is imported, hence here, at conftest import time."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
