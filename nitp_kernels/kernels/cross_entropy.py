"""Cross-entropy on one chunk of logits: online softmax over vocabulary blocks, gradient written in place.

Kernel `_ce_rows_kernel`, one program per row (grid = n rows), looping over the vocabulary in blocks of BLOCK_V:

    inputs   logits (n, V) fp32/bf16/fp16, row stride `stride_row`, unit column stride; RAW scores (bias added,
             softcap not yet applied). labels (n,) int64. A row is VALID when its label y is in [0, V) and
             differs from ignore_index; every other row (ignored, or a label out of range) is treated as ignored
             and logits[y] is never read, so a bad label cannot make the kernel read out of bounds (the chunk
             loop reports such labels as an error; the kernel only stays safe).
             ce_scale, z_scale: fp32 scalars read through pointers (no host sync); label_smoothing eps,
             softcap c (0 = off), z_loss_weight w: runtime floats; need_grad: runtime 0/1.
    outputs  ce_rows (n,) fp32: (1-eps)(lse - s_y) + eps(lse - mean_j s_j), 0 on rows that are not valid;
             z_rows (n,) fp32: lse^2, 0 on rows that are not valid;
             if need_grad: logits overwritten with d(ce_scale*ce + w*z_scale*z)/d logits in the logits dtype,
             i.e. (ce_scale*(p_j - (1-eps)[j=y] - eps/V) + 2 w z_scale lse p_j) * ds/dx, 0 on rows that are not
             valid.
    numerics s = c*tanh(x/c) (or x), running max m / rescaled running sum l of exp in fp32 (one pass),
             lse = m + log l; the loss and p_j = exp((s_j - m) - log l) subtract m first, so scores of size
             ~1e3 lose no digits to cancellation against lse. s_y is read once, before pass 1.
             Gradient pass: re-reads each block and writes p_coef*p_j - ce_scale*eps/V (times ds/dx) in place
             (each element is read before the same program overwrites it); then, after a barrier that orders
             the loop's store at y before it, the label's element is rewritten from fp32 with its
             -(1-eps)*ce_scale term, so every element is formed in fp32 and rounded once to the logits dtype
             (p_y - 1 keeps its digits in bf16). No lane compares its column with the label.
             Softcap: tanh and ds/dx = sech^2(x/c) come from `_tanh_sech2`: an odd polynomial for |x/c| < 1
             (no exp, no cancellation) and q = 2/(1 + exp(2|x/c|)) above; within 1.2 ulp of the exact tanh under
             the interpreter (torch.tanh: 0.5 ulp; the exp-only form this replaced: 9 ulp); sech^2 = q(2-q) does
             not cancel for large |x/c| the way 1 - tanh^2 does. Only tl arithmetic and tl.exp, so the
             interpreter runs the same code as the GPU (where tl.exp is the hardware exp2, a few ulp).
    tiling   BLOCK_V lanes an iteration, BLOCK_V / (32 * num_warps) elements a thread; three configs by
             vocabulary size (CE_CONFIGS): V <= 8192: 2048 lanes, 8 warps (8 a thread, <= 4 iterations);
             V <= 32768: 8192 lanes, 16 warps (16 a thread, <= 4 iterations); above: 32768 lanes, 32 warps
             (32 a thread; V = 152064: 5 iterations a pass, as Liger-Kernel's CE; V = 262144: 8). Wide blocks
             keep the loop short (each iteration of pass 1 ends in two block-wide reductions, a barrier each)
             and many loads in flight per thread. A 1024-thread program has 64 registers a thread;
             `python -m nitp_kernels.compile_check` verifies that no config spills. With softcap the tanh
             temporaries do not fit 32 elements a thread, so that config takes each block in SOFTCAP_SPLIT = 2
             steps of 16384 lanes (pass 1 then makes 10 online-softmax updates at V = 152064; pass 2 has no
             reductions, so its steps cost nothing extra).
             Row offsets are int64 (n*V exceeds 2^31 at V=152064). No atomics: per-row results are written to
             their own slot and summed by torch, so results are bitwise reproducible.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import TRITON_TYPE, CompileSpec, as_fp32_scalar, check_kernel_dtype

# (largest V, BLOCK_V, num_warps, SOFTCAP_SPLIT); the launcher picks the first whose bound admits V (None: no
# bound). With softcap the kernel handles each BLOCK_V block as SOFTCAP_SPLIT sub-blocks, so that tanh's
# temporaries fit the 64 registers a thread of a 1024-thread program has (see the module docstring).
CE_CONFIGS = ((8192, 2048, 8, 1), (32768, 8192, 16, 1), (None, 32768, 32, 2))


@triton.jit
def _tanh_sech2(x):
    """(tanh(x), sech(x)^2) in fp32, from tl arithmetic and tl.exp only (runs the same in the interpreter).

    |x| < 1: tanh(x) = x + x^3 P(x^2), P of degree 6 fitted in fp64 to the relative error of tanh on [0, 1]
    (iteratively reweighted least squares toward minimax; truncation error 4.7e-9 relative, below 0.1 ulp),
    evaluated by Horner with fma; sech^2 = 1 - tanh^2
    (tanh^2 <= 0.58 here, so no cancellation). |x| >= 1: q = 2/(1 + exp(2|x|)) <= 0.24, tanh = 1 - q (an error
    of exp reaches tanh damped by q/(1-q) <= 0.31) and sech^2 = (1 - tanh)(1 + tanh) = q(2 - q), which keeps
    its relative accuracy for any |x| (1 - tanh^2 would cancel to 0 long before sech^2 underflows); exp
    overflowing to inf gives q = 0, tanh = +-1, sech^2 = 0. The exp-only form (1-t)/(1+t), t = exp(-2|x|),
    cancels for small |x| (9 ulp at |x| = 1/8 where it took over from a short series).
    """
    z = x * x
    poly = tl.fma(z, -0.0003586575260139624, 0.0023020422095111808)
    poly = tl.fma(poly, z, -0.007946974452648659)
    poly = tl.fma(poly, z, 0.02148719989251784)
    poly = tl.fma(poly, z, -0.05387997191255829)
    poly = tl.fma(poly, z, 0.13332346952150606)
    poly = tl.fma(poly, z, -0.33333295539021784)
    tanh_small = tl.fma(x * z, poly, x)
    a = tl.abs(x)
    q = 2.0 / (1.0 + tl.exp(2.0 * a))
    small = a < 1.0
    tanh = tl.where(small, tanh_small, tl.where(x < 0, q - 1.0, 1.0 - q))
    sech2 = tl.where(small, 1.0 - tanh_small * tanh_small, q * (2.0 - q))
    return tanh, sech2


@triton.jit
def _load_softcapped(row_ptr, offs, n_cols, softcap):
    """(s, ds/dx, mask) of the lanes offs of a row: s = c*tanh(x/c), -inf on masked lanes."""
    mask = offs < n_cols
    x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tanh, sech2 = _tanh_sech2(x / softcap)
    return tl.where(mask, softcap * tanh, float("-inf")), sech2, mask


@triton.jit
def _online_softmax_step(s, mask, m, l, s_total, label_smoothing):
    """Fold a block of scores s (-inf on masked lanes) into the running max m, sum l of exp(s - m), sum of s."""
    m_new = tl.maximum(m, tl.max(s, axis=0))
    l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
    if label_smoothing > 0.0:
        s_total += tl.sum(tl.where(mask, s, 0.0), axis=0)
    return m_new, l, s_total


@triton.jit(do_not_specialize=["ignore_index", "need_grad"])
def _ce_rows_kernel(
    logits_ptr, stride_row, labels_ptr, ce_rows_ptr, z_rows_ptr, ce_scale_ptr, z_scale_ptr,
    n_cols, ignore_index, label_smoothing, softcap, z_loss_weight, need_grad,
    BLOCK_V: tl.constexpr, SOFTCAP_SPLIT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    sub_cols = tl.arange(0, BLOCK_V // SOFTCAP_SPLIT)

    # ignored rows and out-of-range labels alike: zeros, and logits[label] is never read
    if (label == ignore_index) | (label < 0) | (label >= n_cols):
        tl.store(ce_rows_ptr + row, 0.0)
        tl.store(z_rows_ptr + row, 0.0)
        if need_grad != 0:
            zeros = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK_V):
                tl.store(row_ptr + start + cols, zeros, mask=start + cols < n_cols)
        return
    # the label's score is read before pass 1, so that the label need not stay live through the loops
    s_y = tl.load(row_ptr + label).to(tl.float32)
    sech2_y = 1.0
    if softcap > 0.0:
        tanh_y, sech2_y = _tanh_sech2(s_y / softcap)
        s_y = softcap * tanh_y

    # pass 1: running max m, running sum l of exp(s - m), and the sum of s (label smoothing only)
    m = float("-inf")
    l = 0.0
    s_total = 0.0
    if softcap > 0.0:
        for start in range(0, n_cols, BLOCK_V):
            for part in tl.static_range(SOFTCAP_SPLIT):
                offs = start + part * (BLOCK_V // SOFTCAP_SPLIT) + sub_cols
                s, _, mask = _load_softcapped(row_ptr, offs, n_cols, softcap)
                m, l, s_total = _online_softmax_step(s, mask, m, l, s_total, label_smoothing)
    else:
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            # loaded as the scores themselves, -inf on masked lanes: no second copy of the block is kept live
            s = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            m, l, s_total = _online_softmax_step(s, mask, m, l, s_total, label_smoothing)
    log_l = tl.log(l)
    lse = m + log_l

    # (m - s) + log l rather than lse - s: no cancellation when the scores are large (|s| ~ 1e3)
    ce = (1.0 - label_smoothing) * ((m - s_y) + log_l) + label_smoothing * ((m - s_total / n_cols) + log_l)
    tl.store(ce_rows_ptr + row, ce)
    tl.store(z_rows_ptr + row, lse * lse)

    # pass 2: gradient, in place of the logits (each element is read before this program overwrites it).
    # The loops write p_coef*p_j - flat everywhere, the label's element included; the on-label term is applied
    # once afterwards, so no lane compares its column with the label (that compare, hoisted out of the loop by
    # the compiler, cost the 1024-thread config its register budget).
    if need_grad != 0:
        ce_scale = tl.load(ce_scale_ptr)
        p_coef = ce_scale + 2.0 * z_loss_weight * tl.load(z_scale_ptr) * lse
        flat = ce_scale * label_smoothing / n_cols
        if softcap > 0.0:
            for start in range(0, n_cols, BLOCK_V):
                for part in tl.static_range(SOFTCAP_SPLIT):
                    offs = start + part * (BLOCK_V // SOFTCAP_SPLIT) + sub_cols
                    s, sech2, mask = _load_softcapped(row_ptr, offs, n_cols, softcap)
                    p = tl.exp((s - m) - log_l)  # s - m first: exact for the large scores
                    tl.store(row_ptr + offs, ((p_coef * p - flat) * sech2).to(logits_ptr.dtype.element_ty),
                             mask=mask)
        else:
            for start in range(0, n_cols, BLOCK_V):
                offs = start + cols
                mask = offs < n_cols
                # masked lanes load -inf so that exp(x - m) is 0 there, not an overflow
                x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
                p = tl.exp((x - m) - log_l)
                tl.store(row_ptr + offs, (p_coef * p - flat).to(logits_ptr.dtype.element_ty), mask=mask)
        # the label's element, recomputed in fp32 with its -(1-eps)*ce_scale term and rounded once (rounding
        # the loop's value and then subtracting would lose the digits of p_y - 1 near 1 in bf16). The barrier
        # orders the loop's store to that element (by some thread of this program) before this one.
        tl.debug_barrier()
        on_label = ce_scale * (1.0 - label_smoothing)
        p_y = tl.exp((s_y - m) - log_l)
        g_y = (p_coef * p_y - flat - on_label) * sech2_y
        tl.store(row_ptr + tl.load(labels_ptr + row), g_y.to(logits_ptr.dtype.element_ty))


def config_for(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_V, num_warps, SOFTCAP_SPLIT) the launcher uses for a vocabulary of n_cols."""
    for bound, block, warps, split in CE_CONFIGS:
        if bound is None or n_cols <= bound:
            return block, warps, split
    raise AssertionError("unreachable: the last config has no bound")


def cross_entropy_rows(
    logits: Tensor, labels: Tensor, *, ignore_index: int, label_smoothing: float, softcap: Optional[float],
    z_loss_weight: float, ce_scale: Tensor, z_scale: Tensor, need_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Per-row CE and z (fp32, (n,)); with need_grad the logits are overwritten with their gradient.

    See the module docstring for the exact formulas. logits must have unit column stride. Rows whose label is
    outside [0, V) get zero loss and zero gradient, like ignored rows (validating labels is the caller's job).
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
    block, warps, split = config_for(n_cols)
    _ce_rows_kernel[(n_rows,)](
        logits, logits.stride(0), labels, ce_rows, z_rows,
        as_fp32_scalar("ce_scale", ce_scale), as_fp32_scalar("z_scale", z_scale),
        n_cols, int(ignore_index), float(label_smoothing), float(softcap or 0.0), float(z_loss_weight),
        int(bool(need_grad)), BLOCK_V=block, SOFTCAP_SPLIT=split, num_warps=warps,
    )
    return ce_rows, z_rows


def compile_specs() -> list[CompileSpec]:
    """Every (dtype, config) the launcher can choose."""
    specs = []
    for dtype, name in TRITON_TYPE.items():
        for _, block, warps, split in CE_CONFIGS:
            signature = {
                "logits_ptr": f"*{name}", "stride_row": "i32", "labels_ptr": "*i64", "ce_rows_ptr": "*fp32",
                "z_rows_ptr": "*fp32", "ce_scale_ptr": "*fp32", "z_scale_ptr": "*fp32", "n_cols": "i32",
                "ignore_index": "i32", "label_smoothing": "fp32", "softcap": "fp32", "z_loss_weight": "fp32",
                "need_grad": "i32", "BLOCK_V": "constexpr", "SOFTCAP_SPLIT": "constexpr",
            }
            # n_cols aligned as the JIT sees real vocabularies (32000, 128256, 152064 are multiples of 16)
            specs.append(CompileSpec(f"cross_entropy[{name},BLOCK_V={block},warps={warps}]", _ce_rows_kernel,
                                     signature, {"BLOCK_V": block, "SOFTCAP_SPLIT": split}, warps,
                                     aligned=("logits_ptr", "labels_ptr", "ce_rows_ptr", "z_rows_ptr",
                                              "stride_row", "n_cols"), block_v=block,
                                     note=(f"with softcap each iteration takes {split} steps of {block // split} lanes"
                                           if split > 1 else "")))
    return specs
