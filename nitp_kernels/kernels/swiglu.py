"""SwiGLU of the NITP projector: forward g = silu(a) * b and its backward, one pass each.

Both kernels read gate_up = [a | b] (n, 2H), the output of one (2H x d) GEMM h @ [W_gate; W_up]^T, so a row's
gate and up halves sit in the same row at columns j and H + j.

`_swiglu_fwd_kernel`  inputs gate_up (n, 2H); output g (n, H) in gate_up's dtype.
`_swiglu_bwd_kernel`  inputs d_g (n, H) in gate_up's dtype or fp32 (the chunk loop hands over the down-projection's
                      fp32-accumulated product, which is not rounded before use), gate_up (n, 2H);
                      output [d_a | d_b] written in place of gate_up:
                      d_a = d_g * b * sig(a) * (1 + a * (1 - sig(a))),  d_b = d_g * silu(a).
                      Every element is read by the program that overwrites it, before it overwrites it.
numerics  loads widened to fp32, all arithmetic in fp32 registers, one rounding to the storage dtype.
tiling    grid (n, cdiv(H, BLOCK_H)), one row-block of BLOCK_H = 1024 lanes per program, 4 warps; a single
          config per dtype combination, because the work is a pure bandwidth-bound elementwise pass.
          Row offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import TRITON_TYPE, CompileSpec, check_kernel_dtype

SWIGLU_BLOCK_H = 1024
SWIGLU_WARPS = 4


@triton.jit
def _swiglu_fwd_kernel(gate_up_ptr, stride_gu, g_ptr, stride_g, width, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < width
    gu_row = gate_up_ptr + row * stride_gu
    a = tl.load(gu_row + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(gu_row + width + cols, mask=mask, other=0.0).to(tl.float32)
    g = a * tl.sigmoid(a) * b
    tl.store(g_ptr + row * stride_g + cols, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(d_g_ptr, stride_dg, gate_up_ptr, stride_gu, width, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < width
    gu_row = gate_up_ptr + row * stride_gu
    a = tl.load(gu_row + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(gu_row + width + cols, mask=mask, other=0.0).to(tl.float32)
    dg = tl.load(d_g_ptr + row * stride_dg + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    d_a = dg * b * sig * (1.0 + a * (1.0 - sig))
    d_b = dg * silu
    tl.store(gu_row + cols, d_a.to(gate_up_ptr.dtype.element_ty), mask=mask)
    tl.store(gu_row + width + cols, d_b.to(gate_up_ptr.dtype.element_ty), mask=mask)


def _check_gate_up(gate_up: Tensor) -> tuple[int, int]:
    check_kernel_dtype("gate_up", gate_up)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be (n, 2H) with unit column stride, got shape {tuple(gate_up.shape)} "
                         f"strides {gate_up.stride()}")
    return gate_up.shape[0], gate_up.shape[1] // 2


def swiglu_forward(gate_up: Tensor) -> Tensor:
    """g = silu(a) * b of shape (n, H) in gate_up's dtype, for gate_up = [a | b] of shape (n, 2H)."""
    n_rows, width = _check_gate_up(gate_up)
    g = torch.empty((n_rows, width), dtype=gate_up.dtype, device=gate_up.device)
    if n_rows and width:
        grid = (n_rows, triton.cdiv(width, SWIGLU_BLOCK_H))
        _swiglu_fwd_kernel[grid](gate_up, gate_up.stride(0), g, g.stride(0), width,
                                 BLOCK_H=SWIGLU_BLOCK_H, num_warps=SWIGLU_WARPS)
    return g


def swiglu_backward(d_g: Tensor, gate_up: Tensor) -> Tensor:
    """[d_a | d_b] (n, 2H), written over gate_up and returned. d_g (n, H) may be fp32 or gate_up's dtype; it is
    read as it is (widened to fp32 in registers), so an fp32 d_g is not rounded first."""
    n_rows, width = _check_gate_up(gate_up)
    if not isinstance(d_g, Tensor) or d_g.shape != (n_rows, width):
        raise ValueError(f"d_g must have shape ({n_rows}, {width}), got {getattr(d_g, 'shape', None)}")
    if d_g.dtype not in (torch.float32, gate_up.dtype):
        raise TypeError(f"d_g must be float32 or gate_up's dtype {gate_up.dtype}, got {d_g.dtype}")
    if d_g.stride(1) != 1:
        d_g = d_g.contiguous()
    if n_rows and width:
        grid = (n_rows, triton.cdiv(width, SWIGLU_BLOCK_H))
        _swiglu_bwd_kernel[grid](d_g, d_g.stride(0), gate_up, gate_up.stride(0), width,
                                 BLOCK_H=SWIGLU_BLOCK_H, num_warps=SWIGLU_WARPS)
    return gate_up


def compile_specs() -> list[CompileSpec]:
    """The single config of each kernel, for each storage dtype."""
    specs = []
    for name in TRITON_TYPE.values():
        specs.append(CompileSpec(
            f"swiglu_fwd[{name},BLOCK_H={SWIGLU_BLOCK_H},warps={SWIGLU_WARPS}]", _swiglu_fwd_kernel,
            {"gate_up_ptr": f"*{name}", "stride_gu": "i32", "g_ptr": f"*{name}", "stride_g": "i32",
             "width": "i32", "BLOCK_H": "constexpr"},
            {"BLOCK_H": SWIGLU_BLOCK_H}, SWIGLU_WARPS,
            aligned=("gate_up_ptr", "stride_gu", "g_ptr", "stride_g", "width")))
        for dg_name in sorted({"fp32", name}):  # d_g in fp32 (accumulated) or in gate_up's dtype
            specs.append(CompileSpec(
                f"swiglu_bwd[d_g={dg_name},{name},BLOCK_H={SWIGLU_BLOCK_H},warps={SWIGLU_WARPS}]",
                _swiglu_bwd_kernel,
                {"d_g_ptr": f"*{dg_name}", "stride_dg": "i32", "gate_up_ptr": f"*{name}", "stride_gu": "i32",
                 "width": "i32", "BLOCK_H": "constexpr"},
                {"BLOCK_H": SWIGLU_BLOCK_H}, SWIGLU_WARPS,
                aligned=("d_g_ptr", "stride_dg", "gate_up_ptr", "stride_gu", "width")))
    return specs
