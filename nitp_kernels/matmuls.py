"""The chunk loop's matmuls: which dtype their operands run in, and how results reach fp32 buffers.

Every matmul of the loop feeds fp32 math (softmax, SwiGLU, the NITP loss) or an fp32 gradient sum, so its result
is kept in the accumulation dtype (fp32; fp64 for fp64 input). Two layouts:

- CPU, and any device where the operand dtype already is the accumulation dtype: operands are upcast to it
  (on CPU bf16/fp16 GEMM speed is no goal, and upcast operands give correctly rounded low-precision results);
  products go straight into their buffers (mm(out=...), addmm_).
- CUDA with bf16/fp16 operands: the GEMMs run on the low-precision operands with an fp32 result, at bf16 GEMM
  speed. The weight gradients (V x d, 12·d² for the projector) are accumulated IN PLACE into their fp32 buffers
  with addmm(buffer, a, b, out_dtype=fp32, out=buffer): no fresh V x d product per chunk (779 MB at d=1280,
  V=152064). That overload exists from torch 2.8, but only torch >= 2.10 accepts an fp32 `self` with bf16/fp16
  operands (pytorch/pytorch#167931); before, the product is formed by mm(out_dtype=fp32) and added (one V x d
  fp32 temporary per chunk), and without mm(out_dtype) at all (torch < 2.8) by a low-precision product that is
  upcast while it is added.

Which of these a process uses is decided once per device and operand dtype (matmul_plan is cached), from the
operator registry (is a CUDA kernel registered for the overload?) and the torch version: never by trying a call
and catching RuntimeError, which would also swallow out-of-memory and CUDA errors. The GPU check calls
matmul_plan(torch.device("cuda"), torch.bfloat16) and MatmulPlan.accumulate / MatmulPlan.product directly.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

from .contract import accumulation_dtype

# the first torch release whose addmm(out_dtype=fp32) accepts an fp32 `self` (the buffer) with bf16/fp16 operands
_ADDMM_FP32_SELF_SINCE = (2, 10)


def _has_cuda_kernel(op_name: str) -> bool:
    """Whether this torch build registers a CUDA kernel for the operator overload `op_name`."""
    has_kernel = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    return bool(has_kernel is not None and has_kernel(op_name, "CUDA"))


def matmul_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype the loop's matmul operands are meant to run in: the tensor's own, or the autocast dtype.

    Under torch.autocast for the tensor's device, a matmul on a non-fp64 tensor runs in the autocast dtype (as
    nn.Linear's would); the loop then casts its operands explicitly and runs with autocast off, so that no other
    op of the loop (softmax, norms, the in-place gradient sums) is silently recast. On CPU the operands are upcast
    to the accumulation dtype anyway (matmul_plan), so there autocast leaves the results unchanged.
    """
    device_type = tensor.device.type
    if (tensor.dtype != torch.float64 and torch.amp.autocast_mode.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


@dataclass(frozen=True)
class MatmulPlan:
    """How the loop's matmuls run on one device for one matmul dtype (see the module docstring)."""

    operand_dtype: torch.dtype   # both operands of every matmul are cast to this (the logits chunk too)
    result_dtype: torch.dtype    # products and gradient buffers: the accumulation dtype
    fp32_result_kernel: bool     # CUDA low precision: mm(out_dtype=fp32) exists
    accumulates_in_place: bool   # CUDA low precision: addmm(buffer, a, b, out_dtype=fp32, out=buffer) exists

    @property
    def low_precision_operands(self) -> bool:
        return self.operand_dtype != self.result_dtype

    def product(self, a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """a @ b in result_dtype, written into `out` (contiguous, result_dtype) when given. a, b: operand_dtype."""
        if not self.low_precision_operands:
            return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
        if self.fp32_result_kernel:
            if out is None:
                return torch.mm(a, b, out_dtype=self.result_dtype)
            return torch.mm(a, b, out_dtype=self.result_dtype, out=out)
        result = torch.mm(a, b)
        return result.to(self.result_dtype) if out is None else out.copy_(result)

    def accumulate(self, out: Tensor, a: Tensor, b: Tensor, *, first: bool = False) -> None:
        """out += a @ b, summed in out's dtype (result_dtype); with first=True out = a @ b (out may hold anything:
        the first chunk writes the buffer, which then needs no zero-filling pass). a, b: operand_dtype."""
        if first:
            self.product(a, b, out=out)
        elif not self.low_precision_operands:
            out.addmm_(a, b)
        elif self.accumulates_in_place:
            torch.addmm(out, a, b, out_dtype=self.result_dtype, out=out)
        elif self.fp32_result_kernel:
            out.add_(torch.mm(a, b, out_dtype=self.result_dtype))
        else:
            out.add_(torch.mm(a, b))  # type promotion upcasts the low-precision product while adding


@functools.lru_cache(maxsize=None)
def matmul_plan(device: torch.device, mm_dtype: torch.dtype) -> MatmulPlan:
    """The plan for matmuls meant to run in mm_dtype (matmul_dtype(hidden)) on `device`; decided once per pair."""
    acc = accumulation_dtype(mm_dtype)
    if device.type != "cuda" or mm_dtype == acc:
        return MatmulPlan(acc, acc, fp32_result_kernel=False, accumulates_in_place=False)
    fp32_result = _has_cuda_kernel("aten::mm.dtype_out")
    in_place = (_has_cuda_kernel("aten::addmm.dtype_out")
                and TorchVersion(torch.__version__) >= _ADDMM_FP32_SELF_SINCE)
    return MatmulPlan(mm_dtype, acc, fp32_result_kernel=fp32_result, accumulates_in_place=in_place)
