"""Per-row terms of one chunk-loop run: optional per-row outputs (token accuracy, log-sum-exp, unreduced terms)
and per-row gradient factors (a per-token upstream gradient, class weights), for chunked.py's loop.

What is read from a logits chunk is read before the CE op overwrites it with its gradient. The factors scale
d hidden's rows after the product and h's rows before the weight-gradient product, in the accumulation dtype,
so d logits (bf16/fp16 on CUDA) is never multiplied by them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .contract import accumulation_dtype


@dataclass
class RowTerms:
    """Optional per-row buffers and gradient factors of one loop run (all (N,), in the accumulation dtype).

    ce, z, nitp: where the loop writes its per-row terms (else it allocates its own); the caller reads them back
    unreduced (reduction="none", per_token.py). correct: bool, argmax(logits) == label, written from the logits
    chunk before the CE op overwrites it (token accuracy); lse: the log-sum-exp of the (softcapped) logits of
    every row (one extra read of each chunk, and a temporary of its size). ce_grad_scale, nitp_grad_scale: factors
    on each row's CE (+ z) and NITP gradient, applied in the accumulation dtype in place of the reduction's 1/N
    and nitp_weight (a per-token upstream gradient in per_token.py's backward). z_grad_scale: the z term's own
    per-row factors, for when they are not z_loss_weight times ce_grad_scale (class weights scale CE, not z): the
    CE op then runs without z and the z gradient 2·lse·softmax is rebuilt from its output (label_correction).
    """

    ce: Optional[Tensor] = None
    z: Optional[Tensor] = None
    nitp: Optional[Tensor] = None
    correct: Optional[Tensor] = None
    lse: Optional[Tensor] = None
    ce_grad_scale: Optional[Tensor] = None
    z_grad_scale: Optional[Tensor] = None
    label_grad_extra: Optional[Tensor] = None  # with z_grad_scale: more on the label's column (class-weighted
    nitp_grad_scale: Optional[Tensor] = None   # label smoothing, per_token.py)


def read_logits(rows: RowTerms, logits: Tensor, labels: Tensor, start: int, end: int,
                softcap: Optional[float]) -> None:
    """The per-row values read from a raw logits chunk before the CE op overwrites it (RowTerms.correct, .lse).
    softcap is monotone, so the argmax of the raw logits is that of the softcapped ones."""
    if rows.correct is not None:
        torch.eq(logits.argmax(dim=-1), labels[start:end], out=rows.correct[start:end])
    if rows.lse is not None:
        scores = logits.to(rows.lse.dtype)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        torch.logsumexp(scores, dim=-1, out=rows.lse[start:end])


def label_scores(logits: Tensor, labels: Tensor, ignore_index: int, softcap: Optional[float]
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(s_y, ds/dx at y, safe labels) of each row, read before the CE op overwrites the chunk; rows without a
    valid label get label 0 and ds/dx 0, so that their label-column term vanishes."""
    valid = (labels != ignore_index) & (labels >= 0) & (labels < logits.shape[1])
    safe_labels = torch.where(valid, labels, 0)
    acc = accumulation_dtype(logits.dtype)
    raw = logits.gather(1, safe_labels.unsqueeze(1)).squeeze(1).to(acc)
    if softcap is None:
        return raw, valid.to(acc), safe_labels
    tanh = torch.tanh(raw / softcap)
    return softcap * tanh, torch.where(valid, 1.0 - tanh * tanh, 0.0), safe_labels


def label_correction(rows: RowTerms, ce_rows: Tensor, label_score: tuple[Tensor, ...], start: int, end: int
                     ) -> tuple[Tensor, Tensor]:
    """Per-row factor on the CE op's gradient G = (softmax - onehot(y))·ds/dx (run without z and without label
    smoothing) and the extra coefficient of the label's column, such that
    factor·G + coef·onehot(y) = α·G + (2β·lse·softmax + γ·onehot(y))·ds/dx, with α = ce_grad_scale,
    β = z_grad_scale, γ = label_grad_extra (0 if None): softmax·ds/dx = G + onehot(y)·ds_y, and lse = ce + s_y
    (the op's CE without smoothing is lse - s_y)."""
    alpha = rows.ce_grad_scale[start:end]
    beta = rows.z_grad_scale[start:end]
    score, slope, _ = label_score
    z_part = 2.0 * beta * (ce_rows + score)
    extra = z_part if rows.label_grad_extra is None else z_part + rows.label_grad_extra[start:end]
    return (alpha + z_part).unsqueeze(1), extra * slope


def add_label_column(label_coef: Tensor, safe_labels: Tensor, h: Tensor, lm_weight: Tensor,
                     d_hidden: Optional[Tensor], d_lm_weight: Optional[Tensor], d_lm_bias: Optional[Tensor]) -> None:
    """Add the gradients of coef[i]·onehot(y_i) in d logits: an (n, d) gather of lm_weight rows for d hidden, an
    index_add of h's rows into d lm_weight, of coef into d lm_bias (no (n, V) tensor)."""
    if d_hidden is not None:
        d_hidden.addcmul_(lm_weight[safe_labels].to(label_coef.dtype), label_coef[:, None])
    if d_lm_weight is not None:
        d_lm_weight.index_add_(0, safe_labels, h.to(label_coef.dtype) * label_coef[:, None])
    if d_lm_bias is not None:
        d_lm_bias.index_add_(0, safe_labels, label_coef)
