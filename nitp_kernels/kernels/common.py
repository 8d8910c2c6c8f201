"""Helpers shared by the kernel modules: dtype checks, Triton type names and the compile-spec record."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def check_kernel_dtype(name: str, tensor: Tensor) -> None:
    """Triton kernels take fp32/bf16/fp16; fp64 (and anything else) is refused with a TypeError."""
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 for the triton backend, got {tensor.dtype}"
                        + (" (use backend='torch' or 'reference' for float64)" if tensor.dtype == torch.float64
                           else ""))


def as_fp32_scalar(name: str, value: Tensor) -> Tensor:
    """A 0-d fp32 tensor on the same device; the kernels read it through a pointer, so no host sync."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise TypeError(f"{name} must be a one-element tensor, got {type(value).__name__}")
    return value.reshape(()).to(torch.float32)


@dataclass(frozen=True)
class CompileSpec:
    """One kernel at one config, as its launcher would launch it: what compile_check compiles.

    signature maps every non-constexpr argument to its Triton type ("*fp32", "i32", "fp32", ...);
    aligned names the pointer/stride arguments the JIT would see as multiples of 16 in the hot path.
    block_v: for a kernel that loops over the vocabulary, the lanes of one iteration (the gate reports
    iterations a pass from it); None for the others. note: printed by the gate after the figures.
    """

    label: str
    kernel: Callable[..., Any]
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    aligned: tuple[str, ...] = field(default_factory=tuple)
    block_v: Optional[int] = None
    note: str = ""
