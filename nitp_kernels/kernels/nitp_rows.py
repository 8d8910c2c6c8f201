"""The NITP loss per row: norms, each loss_type, d(prediction) and, when asked, d(target).

Kernel `_nitp_rows_kernel`, one program per row (grid = n rows), looping over the feature dimension d in blocks:

    inputs   pred (n, d) and target (n, d), fp32/bf16/fp16 (pred in target's dtype or fp32: the chunk loop's
             projector output is fp32-accumulated), with unit column stride and their own row
             strides: `target` is a strided view of the shallow rows t+shift, read in place, never copied.
             valid (n,) bool: rows without a target or with an ignored label. scale: fp32 scalar through a
             pointer (nitp_weight / n_nitp for "mean"). need_grad, need_target_grad: runtime 0/1.
    outputs  loss_rows (n,) fp32, 0 on invalid rows; if need_grad: d_pred (n, d) fp32 = scale * dloss/dp, and if
             need_target_grad: d_target (n, d) fp32 = scale * dloss/dy; invalid rows are written as 0.
    loss     loss_code (runtime, uniform) 0 "cosine"  1 - <p,y> / (max(|p|,1e-6) max(|y|,1e-6)); the derivative of a
             clamped norm is 0, as in the torch backend;
             1 "mse" mean_d (p-y)^2;  2 "smooth_l1" mean_d SmoothL1_{beta=1}(p-y);
             3 "kl" KL(softmax(y) || softmax(p)) over d = sum_j q_j (log q_j - log r_j), with
             dKL/dp = r - q and dKL/dy_j = q_j (log q_j - log r_j - KL).
    numerics loads widened to fp32, everything in fp32 registers. cosine and kl take a first pass for the row
             statistics (dot and squared norms; online max / rescaled sums of exp for both softmaxes) and a second
             pass for the gradients; mse and smooth_l1 need one pass.
    tiling   BLOCK_D = 512 lanes, 4 warps, one config per (pred, target) dtype pair; row offsets int64.
             No atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import TRITON_TYPE, CompileSpec, as_fp32_scalar, check_kernel_dtype

LOSS_CODES = {"cosine": 0, "mse": 1, "smooth_l1": 2, "kl": 3}
NITP_BLOCK_D = 512
NITP_WARPS = 4
NORM_EPS = 1e-6


@triton.jit
def _store_zero_rows(d_pred_row, d_target_row, n_cols, need_grad, need_target_grad, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    zeros = tl.zeros([BLOCK_D], dtype=tl.float32)
    if need_grad != 0:
        for start in range(0, n_cols, BLOCK_D):
            mask = start + cols < n_cols
            tl.store(d_pred_row + start + cols, zeros, mask=mask)
            if need_target_grad != 0:
                tl.store(d_target_row + start + cols, zeros, mask=mask)


@triton.jit(do_not_specialize=["need_grad", "need_target_grad", "loss_code"])
def _nitp_rows_kernel(
    pred_ptr, stride_pred, target_ptr, stride_target, valid_ptr, loss_rows_ptr, d_pred_ptr, d_target_ptr,
    stride_grad, scale_ptr, n_cols, need_grad, need_target_grad, loss_code,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    p_row = pred_ptr + row * stride_pred
    y_row = target_ptr + row * stride_target
    dp_row = d_pred_ptr + row * stride_grad
    dy_row = d_target_ptr + row * stride_grad
    cols = tl.arange(0, BLOCK_D)

    if tl.load(valid_ptr + row) == 0:
        tl.store(loss_rows_ptr + row, 0.0)
        _store_zero_rows(dp_row, dy_row, n_cols, need_grad, need_target_grad, BLOCK_D)
        return

    scale = tl.load(scale_ptr)
    # loss_code is a runtime (uniform) branch rather than a constexpr: one compiled kernel serves all four
    # losses, which keeps the compile gate's config set small; the branch costs nothing next to the loads
    if loss_code == 0:  # cosine
        dot = tl.zeros([BLOCK_D], dtype=tl.float32)
        pp = tl.zeros([BLOCK_D], dtype=tl.float32)
        yy = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_D):
            mask = start + cols < n_cols
            p = tl.load(p_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            dot += p * y
            pp += p * p
            yy += y * y
        p_raw = tl.sqrt(tl.sum(pp, axis=0))
        y_raw = tl.sqrt(tl.sum(yy, axis=0))
        p_norm = tl.maximum(p_raw, 1e-6)
        y_norm = tl.maximum(y_raw, 1e-6)
        inv = 1.0 / (p_norm * y_norm)
        cos = tl.sum(dot, axis=0) * inv
        tl.store(loss_rows_ptr + row, 1.0 - cos)
        if need_grad != 0:
            # d/dp = -(y/(|p||y|) - cos p/|p|^2), the second term only where |p| is not clamped; same for y
            p_term = tl.where(p_raw > 1e-6, cos / (p_norm * p_norm), 0.0)
            y_term = tl.where(y_raw > 1e-6, cos / (y_norm * y_norm), 0.0)
            for start in range(0, n_cols, BLOCK_D):
                mask = start + cols < n_cols
                p = tl.load(p_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                y = tl.load(y_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(dp_row + start + cols, scale * (p_term * p - inv * y), mask=mask)
                if need_target_grad != 0:
                    tl.store(dy_row + start + cols, scale * (y_term * y - inv * p), mask=mask)
    elif loss_code == 3:  # kl: online softmax statistics of p and y, and sum_j exp(y_j - m_y)(y_j - p_j)
        m_p = float("-inf")
        l_p = 0.0
        m_y = float("-inf")
        l_y = 0.0
        cross = 0.0
        for start in range(0, n_cols, BLOCK_D):
            mask = start + cols < n_cols
            p = tl.load(p_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            p_m = tl.where(mask, p, float("-inf"))
            y_m = tl.where(mask, y, float("-inf"))
            m_p_new = tl.maximum(m_p, tl.max(p_m, axis=0))
            l_p = l_p * tl.exp(m_p - m_p_new) + tl.sum(tl.exp(p_m - m_p_new), axis=0)
            m_p = m_p_new
            m_y_new = tl.maximum(m_y, tl.max(y_m, axis=0))
            alpha = tl.exp(m_y - m_y_new)
            e_y = tl.exp(y_m - m_y_new)
            l_y = l_y * alpha + tl.sum(e_y, axis=0)
            cross = cross * alpha + tl.sum(e_y * (y - p), axis=0)
            m_y = m_y_new
        lse_p = m_p + tl.log(l_p)
        lse_y = m_y + tl.log(l_y)
        kl = cross / l_y + lse_p - lse_y
        tl.store(loss_rows_ptr + row, kl)
        if need_grad != 0:
            for start in range(0, n_cols, BLOCK_D):
                mask = start + cols < n_cols
                p = tl.load(p_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                y = tl.load(y_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                log_q = y - lse_y
                log_r = p - lse_p
                q = tl.exp(log_q)
                tl.store(dp_row + start + cols, scale * (tl.exp(log_r) - q), mask=mask)
                if need_target_grad != 0:
                    tl.store(dy_row + start + cols, scale * q * (log_q - log_r - kl), mask=mask)
    else:  # mse (1) and smooth_l1 (2): elementwise, one pass
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        inv_d = 1.0 / n_cols
        for start in range(0, n_cols, BLOCK_D):
            mask = start + cols < n_cols
            p = tl.load(p_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            diff = p - y
            if loss_code == 1:
                total += diff * diff
                grad = 2.0 * diff
            else:
                small = tl.abs(diff) < 1.0
                total += tl.where(small, 0.5 * diff * diff, tl.abs(diff) - 0.5)
                grad = tl.where(small, diff, tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)))
            if need_grad != 0:
                grad = grad * (scale * inv_d)
                tl.store(dp_row + start + cols, grad, mask=mask)
                if need_target_grad != 0:
                    tl.store(dy_row + start + cols, -grad, mask=mask)
        tl.store(loss_rows_ptr + row, tl.sum(total, axis=0) * inv_d)


def nitp_rows(
    pred: Tensor, target: Tensor, valid: Tensor, *, loss_type: str, scale: Tensor, need_grad: bool,
    need_target_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(loss_rows (n,) fp32, d_pred (n, d) fp32 or None, d_target (n, d) fp32 or None); see the module docstring."""
    if loss_type not in LOSS_CODES:
        raise ValueError(f"loss_type must be one of {tuple(LOSS_CODES)}, got {loss_type!r}")
    check_kernel_dtype("pred", pred)
    check_kernel_dtype("target", target)
    if pred.dtype not in (target.dtype, torch.float32):
        raise TypeError(f"pred must be float32 or target's dtype {target.dtype}, got {pred.dtype}")
    if pred.dim() != 2 or target.shape != pred.shape:
        raise ValueError(f"pred and target must be (n, d) of one shape, got {tuple(pred.shape)}, "
                         f"{tuple(target.shape)}")
    n_rows, n_cols = pred.shape
    if valid.shape != (n_rows,) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor of shape ({n_rows},), got {valid.dtype} "
                         f"{tuple(valid.shape)}")
    if pred.stride(1) != 1:
        pred = pred.contiguous()
    if target.stride(1) != 1:
        target = target.contiguous()
    device = pred.device
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    d_pred = torch.empty((n_rows, n_cols), dtype=torch.float32, device=device) if need_grad else None
    d_target = (torch.empty((n_rows, n_cols), dtype=torch.float32, device=device)
                if need_grad and need_target_grad else None)
    if n_rows == 0:
        return loss_rows, d_pred, d_target
    # unused gradient pointers point at loss_rows: the kernel never touches them when the flag is 0
    dp_arg = d_pred if d_pred is not None else loss_rows
    dy_arg = d_target if d_target is not None else dp_arg
    _nitp_rows_kernel[(n_rows,)](
        pred, pred.stride(0), target, target.stride(0), valid.contiguous(), loss_rows, dp_arg, dy_arg,
        n_cols, as_fp32_scalar("scale", scale), n_cols, int(d_pred is not None), int(d_target is not None),
        LOSS_CODES[loss_type], BLOCK_D=NITP_BLOCK_D, num_warps=NITP_WARPS,
    )
    return loss_rows, d_pred, d_target


def compile_specs() -> list[CompileSpec]:
    """One config per (pred dtype, target dtype), pred in target's dtype or fp32; loss_type is a runtime argument."""
    specs = []
    pairs = [(pred, target) for target in TRITON_TYPE.values() for pred in sorted({"fp32", target})]
    for pred_name, name in pairs:
        signature = {
            "pred_ptr": f"*{pred_name}", "stride_pred": "i32", "target_ptr": f"*{name}", "stride_target": "i32",
            "valid_ptr": "*i1", "loss_rows_ptr": "*fp32", "d_pred_ptr": "*fp32", "d_target_ptr": "*fp32",
            "stride_grad": "i32", "scale_ptr": "*fp32", "n_cols": "i32", "need_grad": "i32",
            "need_target_grad": "i32", "loss_code": "i32", "BLOCK_D": "constexpr",
        }
        specs.append(CompileSpec(
            f"nitp_rows[pred={pred_name},{name},BLOCK_D={NITP_BLOCK_D},warps={NITP_WARPS}]", _nitp_rows_kernel,
            signature, {"BLOCK_D": NITP_BLOCK_D}, NITP_WARPS,
            aligned=("pred_ptr", "target_ptr", "loss_rows_ptr", "d_pred_ptr", "d_target_ptr",
                     "stride_pred", "stride_target", "stride_grad")))
    return specs
