"""Cross-entropy on one chunk of logits: online softmax over vocabulary blocks, gradient written in place.

Kernel `_ce_rows_kernel`, one program per row (grid = n rows), looping over the vocabulary in blocks of BLOCK_V:

    inputs   logits (n, V) fp32/bf16/fp16, row stride `stride_row`, unit column stride; RAW scores (bias added,
             softcap not yet applied). labels (n,) int64; a row whose label equals ignore_index is ignored.
             ce_scale, z_scale: fp32 scalars read through pointers (no host sync); label_smoothing eps,
             softcap c (0 = off), z_loss_weight w: runtime floats; need_grad: runtime 0/1.
    outputs  ce_rows (n,) fp32: (1-eps)(lse - s_y) + eps(lse - mean_j s_j), 0 on ignored rows;
             z_rows (n,) fp32: lse^2, 0 on ignored rows;
             if need_grad: logits overwritten with d(ce_scale*ce + w*z_scale*z)/d logits in the logits dtype,
             i.e. (ce_scale*(p_j - (1-eps)[j=y] - eps/V) + 2 w z_scale lse p_j) * ds/dx, ignored rows 0.
    numerics s = c*tanh(x/c) (or x), running max m / rescaled running sum l of exp in fp32 (one pass),
             lse = m + log l; the loss and p_j = exp((s_j - m) - log l) subtract m first, so scores of size
             ~1e3 lose no digits to cancellation against lse;
             the gradient pass re-reads each block and writes it back in place (each element is read before the
             same program overwrites it). tanh is computed from exp so the same code runs in the interpreter.
    tiling   BLOCK_V lanes per iteration; two configs: (BLOCK_V=512, 4 warps) for V <= 8192, (4096, 8 warps)
             above. Row offsets are int64 (n*V exceeds 2^31 at V=152064). No atomics: per-row results are
             written to their own slot and summed by torch, so results are bitwise reproducible.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import TRITON_TYPE, CompileSpec, as_fp32_scalar, check_kernel_dtype

# (largest V, BLOCK_V, num_warps); the launcher picks the first whose bound admits V (None: no bound).
CE_CONFIGS = ((8192, 512, 4), (None, 4096, 8))


@triton.jit
def _tanh(x):
    """tanh in fp32 to a few ulp, from tl.exp so that the interpreter runs the same code as the GPU.

    (1 - t)/(1 + t) with t = exp(-2|x|) is stable for large |x| but cancels for small |x|, where the odd
    Taylor series to x^7 is used instead (|x| < 1/8: truncation error below 1e-9 relative).
    """
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    y = tl.where(x < 0, -y, y)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    return tl.where(tl.abs(x) < 0.125, series, y)


@triton.jit(do_not_specialize=["ignore_index", "need_grad"])
def _ce_rows_kernel(
    logits_ptr, stride_row, labels_ptr, ce_rows_ptr, z_rows_ptr, ce_scale_ptr, z_scale_ptr,
    n_cols, ignore_index, label_smoothing, softcap, z_loss_weight, need_grad,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK_V)

    if label == ignore_index:
        tl.store(ce_rows_ptr + row, 0.0)
        tl.store(z_rows_ptr + row, 0.0)
        if need_grad != 0:
            zeros = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK_V):
                tl.store(row_ptr + start + cols, zeros, mask=start + cols < n_cols)
        return

    # pass 1: running max m, running sum l of exp(s - m), and the sum of s (label smoothing)
    m = float("-inf")
    l = 0.0
    s_total = 0.0
    for start in range(0, n_cols, BLOCK_V):
        mask = start + cols < n_cols
        x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        if softcap > 0.0:
            x = softcap * _tanh(x / softcap)
        s = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        m = m_new
        s_total += tl.sum(tl.where(mask, x, 0.0), axis=0)
    log_l = tl.log(l)
    lse = m + log_l

    x_y = tl.load(row_ptr + label).to(tl.float32)
    if softcap > 0.0:
        x_y = softcap * _tanh(x_y / softcap)
    # (m - s) + log l rather than lse - s: no cancellation when the scores are large (|s| ~ 1e3)
    ce = (1.0 - label_smoothing) * ((m - x_y) + log_l) + label_smoothing * ((m - s_total / n_cols) + log_l)
    tl.store(ce_rows_ptr + row, ce)
    tl.store(z_rows_ptr + row, lse * lse)

    # pass 2: gradient, in place of the logits
    if need_grad != 0:
        ce_scale = tl.load(ce_scale_ptr)
        p_coef = ce_scale + 2.0 * z_loss_weight * tl.load(z_scale_ptr) * lse
        flat = ce_scale * label_smoothing / n_cols
        on_label = ce_scale * (1.0 - label_smoothing)
        for start in range(0, n_cols, BLOCK_V):
            mask = start + cols < n_cols
            # masked lanes load -inf so that exp(x - m) is 0 there, not an overflow
            x = tl.load(row_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if softcap > 0.0:
                t = _tanh(x / softcap)
                p = tl.exp((softcap * t - m) - log_l)
                g = p_coef * p - flat - tl.where(start + cols == label, on_label, 0.0)
                g = g * (1.0 - t * t)
            else:
                p = tl.exp((x - m) - log_l)  # x - m first: exact for the large scores
                g = p_coef * p - flat - tl.where(start + cols == label, on_label, 0.0)
            tl.store(row_ptr + start + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _ce_config(n_cols: int) -> tuple[int, int]:
    for bound, block, warps in CE_CONFIGS:
        if bound is None or n_cols <= bound:
            return block, warps
    raise AssertionError("unreachable: the last config has no bound")


def cross_entropy_rows(
    logits: Tensor, labels: Tensor, *, ignore_index: int, label_smoothing: float, softcap: Optional[float],
    z_loss_weight: float, ce_scale: Tensor, z_scale: Tensor, need_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Per-row CE and z (fp32, (n,)); with need_grad the logits are overwritten with their gradient.

    See the module docstring for the exact formulas. logits must have unit column stride.
    """
    check_kernel_dtype("logits", logits)
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a 2-D tensor with unit column stride, got shape {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    n_rows, n_cols = logits.shape
    if labels.shape != (n_rows,) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({n_rows},), got {labels.dtype} {tuple(labels.shape)}")
    labels = labels.contiguous()
    ce_rows = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    z_rows = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return ce_rows, z_rows
    block, warps = _ce_config(n_cols)
    _ce_rows_kernel[(n_rows,)](
        logits, logits.stride(0), labels, ce_rows, z_rows,
        as_fp32_scalar("ce_scale", ce_scale), as_fp32_scalar("z_scale", z_scale),
        n_cols, int(ignore_index), float(label_smoothing), float(softcap or 0.0), float(z_loss_weight),
        int(bool(need_grad)), BLOCK_V=block, num_warps=warps,
    )
    return ce_rows, z_rows


def compile_specs() -> list[CompileSpec]:
    """Every (dtype, config) the launcher can choose."""
    specs = []
    for dtype, name in TRITON_TYPE.items():
        for _, block, warps in CE_CONFIGS:
            signature = {
                "logits_ptr": f"*{name}", "stride_row": "i32", "labels_ptr": "*i64", "ce_rows_ptr": "*fp32",
                "z_rows_ptr": "*fp32", "ce_scale_ptr": "*fp32", "z_scale_ptr": "*fp32", "n_cols": "i32",
                "ignore_index": "i32", "label_smoothing": "fp32", "softcap": "fp32", "z_loss_weight": "fp32",
                "need_grad": "i32", "BLOCK_V": "constexpr",
            }
            specs.append(CompileSpec(f"cross_entropy[{name},BLOCK_V={block},warps={warps}]", _ce_rows_kernel,
                                     signature, {"BLOCK_V": block}, warps,
                                     aligned=("logits_ptr", "labels_ptr", "ce_rows_ptr", "z_rows_ptr",
                                              "stride_row")))
    return specs
