"""The "reference" backend: plain autograd that materialises the (N, V) logits.

Ground truth for every test, written from the contract's formulas and independent of the chunked backends (it
imports nothing from them): it uses F.cross_entropy for the CE term, shifts the target with a (B, T) view instead
of index arithmetic, and lets autograd take every gradient. Under torch.autocast its matmuls follow autocast, as
any autograd code's would. Never fast, never memory-frugal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .contract import NORM_EPS, accumulation_dtype
from .options import Problem


def nitp_row_losses(pred: Tensor, target: Tensor, loss_type: str) -> Tensor:
    """Per-row NITP loss of the contract for (..., d) predictions and targets (autograd-friendly)."""
    if loss_type == "cosine":
        pred_norm = torch.linalg.vector_norm(pred, dim=-1).clamp_min(NORM_EPS)
        target_norm = torch.linalg.vector_norm(target, dim=-1).clamp_min(NORM_EPS)
        return 1.0 - (pred * target).sum(-1) / (pred_norm * target_norm)
    if loss_type == "mse":
        return F.mse_loss(pred, target, reduction="none").mean(-1)
    if loss_type == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=1.0).mean(-1)
    if loss_type == "kl":  # KL(softmax(target) || softmax(pred)) over the feature dimension
        return F.kl_div(F.log_softmax(pred, -1), F.log_softmax(target, -1), reduction="none",
                        log_target=True).sum(-1)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def reference_losses(problem: Problem) -> tuple[Tensor, ...]:
    """(loss, ce, nitp, z, n_ce, n_nitp, token_accuracy, lse) with autograd graphs on loss (the semantics in
    contract.py; the last two None unless asked for). reduction="none": loss, ce, nitp, z are (N,) per-row terms.
    With return_grad_norms, also ||d(ce + z_w·z)/d hidden|| and ||d nitp/d hidden|| by autograd, at the end."""
    opts = problem.options
    hidden = problem.hidden
    mm_dtype = hidden.dtype
    acc = accumulation_dtype(mm_dtype)
    bias = None if problem.lm_bias is None else problem.lm_bias.to(mm_dtype)
    logits = F.linear(hidden, problem.lm_weight.to(mm_dtype), bias).to(acc)
    if opts.softcap is not None:
        logits = opts.softcap * torch.tanh(logits / opts.softcap)

    labels = problem.labels
    ce_mask = labels != opts.ignore_index
    n_ce = ce_mask.sum()
    class_weight = None if problem.ce_weight is None else problem.ce_weight.to(acc)
    ce_rows = F.cross_entropy(logits, labels, weight=class_weight, ignore_index=opts.ignore_index,
                              reduction="none", label_smoothing=opts.label_smoothing)
    lse = torch.logsumexp(logits, -1)
    z_rows = torch.where(ce_mask, lse ** 2, 0.0)
    ce_sum, z_sum = ce_rows.sum(), z_rows.sum()
    accuracy = None
    if opts.return_token_accuracy:
        correct = torch.where(ce_mask, logits.argmax(-1) == labels, False).to(acc)
        accuracy = correct if opts.reduction == "none" else correct.sum() / n_ce.clamp_min(1)

    zero = hidden.new_zeros((), dtype=acc)
    nitp_sum, n_nitp = zero, torch.zeros((), dtype=torch.int64, device=hidden.device)
    nitp_rows = torch.zeros_like(ce_rows)
    if problem.with_nitp:
        seq, shift = problem.seq_len, opts.shift
        d = hidden.shape[-1]
        pred = hidden
        if problem.projector is not None:
            w_gate, w_up, w_down = (w.to(mm_dtype) for w in problem.projector)
            gate = F.linear(hidden, w_gate).to(acc)
            up = F.linear(hidden, w_up).to(acc)
            pred = F.linear((F.silu(gate) * up).to(mm_dtype), w_down)
        target = problem.shallow.detach() if opts.stop_gradient else problem.shallow
        pred = pred.to(acc).view(-1, seq, d)[:, : seq - shift]
        target = target.to(acc).view(-1, seq, d)[:, shift:]
        mask = ce_mask.view(-1, seq)[:, : seq - shift]
        rows = torch.where(mask, nitp_row_losses(pred, target, opts.loss_type), 0.0)
        nitp_sum = rows.sum()
        n_nitp = mask.sum()
        # per position t of the (B, T) layout; the last `shift` positions of each sequence have no term
        nitp_rows = F.pad(rows, (0, shift)).reshape(-1)

    if opts.reduction == "none":
        loss_rows = ce_rows + opts.nitp_weight * nitp_rows + opts.z_loss_weight * z_rows
        return (loss_rows, ce_rows.detach(), nitp_rows.detach(), z_rows.detach(), n_ce, n_nitp, accuracy,
                lse.detach() if opts.return_lse else None)
    if opts.reduction == "mean":
        if class_weight is None:
            ce = ce_sum / n_ce.clamp_min(1)
        else:  # F.cross_entropy's weighted mean: divided by the summed weights of the labelled positions
            weight_sum = class_weight[labels[ce_mask]].sum()
            ce = ce_sum / weight_sum if bool(n_ce > 0) else ce_sum
        z = z_sum / n_ce.clamp_min(1)
        nitp = nitp_sum / n_nitp.clamp_min(1)
    else:
        ce, z, nitp = ce_sum, z_sum, nitp_sum
    loss = ce + opts.nitp_weight * nitp + opts.z_loss_weight * z
    outputs = (loss, ce.detach(), nitp.detach(), z.detach(), n_ce, n_nitp, accuracy, None)
    if opts.return_grad_norms:
        norms = []
        for term in (ce + opts.z_loss_weight * z, nitp):
            grad = None
            if term.requires_grad:
                grad, = torch.autograd.grad(term, hidden, retain_graph=True, allow_unused=True)
            norms.append(zero if grad is None else torch.linalg.vector_norm(grad.to(acc)).detach())
        outputs += tuple(norms)
    return outputs
