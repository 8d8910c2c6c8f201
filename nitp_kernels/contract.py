"""The op's numeric contract: the constants and rules every backend, and every caller that counts positions,
shares. One module so that they cannot drift apart (the reference backend, the chunk loop, the Triton launchers'
callers and the training engine all read them from here).

Options
    LOSS_TYPES, REDUCTIONS, BACKENDS: the accepted values of loss_type, reduction and backend.

Precision
    accumulation_dtype(dtype): softmax, norms, losses, per-row values and every gradient sum run in
    promote_types(dtype, fp32): fp32 for bf16/fp16/fp32 inputs, fp64 for fp64. Gradients are returned in each
    input's own dtype; losses in the accumulation dtype.
    Normalisations (1/N of reduction="mean", nitp_weight) are applied in the accumulation dtype, never folded into a
    tensor stored in bf16/fp16: in fp16 a softmax probability p ~ 1/V times 1/N is below the smallest subnormal
    (6e-8) at V=152064, N=16384 and would flush to zero.
    NORM_EPS: the cosine loss divides by max(||x||, NORM_EPS); where a norm is clamped it is a constant (its
    derivative term drops out).

Positions (valid_positions)
    A position t of a sequence of length T gets a cross-entropy term iff labels[t] != ignore_index, and an NITP
    term (target shallow[t + shift] of the same sequence) iff it also has t + shift < T. "mean" divides each term
    by its own count (N_ce, N_nitp); a term with no valid position is 0 with zero gradient. "none" returns the
    per-position terms, shaped like labels (0 where a position has no such term), for any upstream gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

LOSS_TYPES = ("cosine", "mse", "smooth_l1", "kl")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "reference", "torch", "triton")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

NORM_EPS = 1e-6


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax, norms, losses and gradient sums run in promote_types(dtype, fp32)."""
    return torch.promote_types(dtype, torch.float32)


def valid_positions(labels: Tensor, ignore_index: int, shift: int, seq_len: int | None = None
                    ) -> tuple[Tensor, Tensor]:
    """(ce_valid, nitp_valid) boolean masks of labels' shape.

    labels: (B, T), or flat (N,) with seq_len = T (N a multiple of T). shift >= 0; shift >= T leaves no NITP
    position. ce_valid = labels != ignore_index; nitp_valid = ce_valid & (t + shift < T) with t the position
    inside its sequence.
    """
    ce_valid = labels != ignore_index
    if labels.dim() == 2 and seq_len is None:
        seq_len = labels.shape[1]
        position = torch.arange(seq_len, device=labels.device).expand_as(labels)
    elif labels.dim() == 1 and seq_len is not None:
        position = torch.arange(labels.shape[0], device=labels.device) % seq_len
    else:
        raise ValueError(f"labels must be (B, T), or (N,) with seq_len; got shape {tuple(labels.shape)} and "
                         f"seq_len={seq_len!r}")
    return ce_valid, ce_valid & (position + shift < seq_len)
