"""reduction="none": per-token losses whose gradients are right for ANY per-token upstream gradient.

The chunk loop's usual scheme (chunked.py) forms every gradient in the forward pass and only multiplies it by one
scalar in backward. With a per-token loss the upstream gradient g (one value per position) is unknown until
backward, and it weighs each row differently, so this path works the other way round:

- forward runs the chunk loop without gradients (losses only) and keeps the per-row CE, z and NITP terms
  (row_terms.RowTerms); the per-token loss is ce + nitp_weight·nitp + z_loss_weight·z;
- it saves the inputs (hidden, lm_weight, lm_bias, shallow, the projector weights: references to the caller's
  tensors, no copies), never logits;
- backward runs the whole chunk loop again, with gradients, each row's CE (+ z) gradient scaled by g[t] and its
  NITP gradient by nitp_weight·g[t] (RowTerms' per-row factors, applied in the accumulation dtype).

Memory: forward holds one logits chunk at a time, like the fused path, plus the (N,) per-row terms, and no
gradient buffer; backward holds exactly what the fused path's forward holds (one logits chunk, the gradient
buffers, which are handed to autograd). Time: the forward's logits matmul and CE op per chunk, then the fused
path's whole loop in backward: the V-sized work of the cross-entropy pass is one logits matmul plus two gradient
matmuls per chunk, so this mode does about 4/3 of the fused path's V-sized work (an estimate from the count of
matmuls, not a measurement), and the projector's forward twice. Measured (torch backend, a shared 2-core AMD
EPYC CPU, N=2048, d=256, V=16384, H=512, forward + backward, median of 5): "none" took 1.48x the time of "mean"
for fused_linear_cross_entropy and 1.35x for fused_nitp_loss. A repeated backward (retain_graph=True) recomputes
again.

Class weights (ce_weight) take this path for every reduction: each row's CE is weighted by ce_weight[label], the
weighted mean divides by the summed weights of the labelled rows (F.cross_entropy's rule), the z term stays
unweighted (Liger's rule). The loss is then a sum of per-row terms with per-row factors (_row_factors), summed
for "mean"/"sum"; the factors of CE and z differ per row, so backward hands the loop separate ones (RowTerms).
With label smoothing too (F.cross_entropy's weighted smoothing, eps/V·sum_j w_j·(lse - s_j) per row), the loop
runs without smoothing and the smoothing term is added outside it: its value from h·(lm_weight.T @ w), its
gradient as a label-column term in the loop plus a rank-one term after it (_add_class_vector_term). That needs
the scores to be linear in the logits, so softcap is refused with this combination.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .chunked import ChunkOps, refuse_double_backward, run_chunks
from .options import Problem
from .row_terms import RowTerms


class RowFactors(NamedTuple):
    """(N,) factors: loss = sum over rows of ce·ce_rows + z·z_rows + nitp·nitp_rows (per row for "none").

    ce = norm·class_weight: norm is 1 or the weighted mean's 1/sum(w[y]) (0 on ignored rows), class_weight w[y]."""

    ce: Tensor
    z: Tensor
    nitp: Tensor
    norm: Tensor
    class_weight: Tensor


def _row_factors(problem: Problem, n_ce: Tensor, n_nitp: Tensor, acc: torch.dtype) -> RowFactors:
    opts = problem.options
    labels = problem.labels
    n_rows = labels.shape[0]
    labelled = labels != opts.ignore_index
    if problem.ce_weight is None:
        class_weight = labelled.to(acc)
    else:
        class_weight = torch.where(labelled, problem.ce_weight.to(acc)[torch.where(labelled, labels, 0)], 0.0)
    z = torch.full((), opts.z_loss_weight, dtype=acc, device=labels.device)
    nitp = torch.full((), opts.nitp_weight, dtype=acc, device=labels.device)
    norm = labelled.to(acc)
    if opts.reduction == "mean":
        # F.cross_entropy's weighted mean; with no labelled row every term is 0 (the contract)
        total = class_weight.sum() if problem.ce_weight is not None else n_ce.to(acc)
        norm = norm / torch.where(n_ce > 0, total, torch.ones_like(total))
        z = z / n_ce.clamp_min(1).to(acc)
        nitp = nitp / n_nitp.clamp_min(1).to(acc)
    return RowFactors(norm * class_weight, z * labelled, nitp.expand(n_rows), norm, class_weight)


def _smoothing_with_class_weights(problem: Problem) -> bool:
    return problem.ce_weight is not None and problem.options.label_smoothing > 0


def _class_weight_projection(problem: Problem, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(w, lm_weight.T @ w) in the accumulation dtype: the sum_j w_j s_j of a row is h·(lm_weight.T @ w) + b·w."""
    weight = problem.ce_weight.to(acc)
    return weight, problem.lm_weight.to(acc).T @ weight


def _smoothed_rows(problem: Problem, ce_plain: Tensor, factors: RowFactors, acc: torch.dtype) -> Tensor:
    """F.cross_entropy's per-row value with class weights w and label smoothing eps, from the loop's CE without
    smoothing (lse - s_y): (1-eps)·w_y·(lse - s_y) + (eps/V)·(sum(w)·lse - sum_j w_j s_j), 0 on ignored rows.
    s_y and sum_j w_j s_j are formed from h, lm_weight and lm_bias in the accumulation dtype (no logits; softcap,
    which would need them, is refused with this combination)."""
    eps, vocab = problem.options.label_smoothing, problem.lm_weight.shape[0]
    safe = torch.where(problem.labels != problem.options.ignore_index, problem.labels, 0)
    hidden = problem.hidden.to(acc)
    weight, projection = _class_weight_projection(problem, acc)
    label_score = (hidden * problem.lm_weight[safe].to(acc)).sum(-1)
    weighted_score = hidden @ projection
    if problem.lm_bias is not None:
        bias = problem.lm_bias.to(acc)
        label_score = label_score + bias[safe]
        weighted_score = weighted_score + bias @ weight
    lse = ce_plain + label_score
    rows = (1.0 - eps) * factors.class_weight * ce_plain + (eps / vocab) * (weight.sum() * lse - weighted_score)
    return torch.where(problem.labels != problem.options.ignore_index, rows, 0.0)


def _without_smoothing(problem: Problem) -> Problem:
    return dataclasses.replace(problem, options=dataclasses.replace(problem.options, label_smoothing=0.0))


def _add_class_vector_term(problem: Problem, coef: Tensor, d_hidden: Optional[Tensor],
                           d_lm_weight: Optional[Tensor], d_lm_bias: Optional[Tensor], acc: torch.dtype) -> None:
    """The gradients of d logits = coef ⊗ w (one class-weight vector w for every row, per-row coefficients): rank
    one, so d hidden += coef ⊗ (lm_weight.T @ w), d lm_weight += w ⊗ (coef @ h), d lm_bias += w·sum(coef)."""
    weight, projection = _class_weight_projection(problem, acc)
    if d_hidden is not None:
        d_hidden.addr_(coef, projection)
    if d_lm_weight is not None:
        d_lm_weight.addr_(weight, coef @ problem.hidden.to(acc))
    if d_lm_bias is not None:
        d_lm_bias.add_(weight * coef.sum())


def _row_buffers(problem: Problem, acc: torch.dtype) -> RowTerms:
    n_rows, device = problem.hidden.shape[0], problem.hidden.device
    opts = problem.options
    rows = RowTerms(ce=torch.empty(n_rows, dtype=acc, device=device),
                    z=torch.empty(n_rows, dtype=acc, device=device),
                    nitp=torch.zeros(n_rows, dtype=acc, device=device))
    if opts.return_token_accuracy:
        rows.correct = torch.empty(n_rows, dtype=torch.bool, device=device)
    if opts.return_lse:
        rows.lse = torch.empty(n_rows, dtype=acc, device=device)
    return rows


class PerTokenFunction(torch.autograd.Function):
    """Autograd wrapper of reduction="none": losses in forward, the chunk loop with per-row factors in backward.

    Outputs (N,) each, in the accumulation dtype: the loss rows (differentiable; per position for "none", to be
    summed for "mean"/"sum"), the CE rows times their factor (weighted, normalised for "mean"), and the raw NITP
    and z rows; then n_ce, n_nitp, the rows' correctness (float, 0 on ignored rows; empty unless asked) and their
    lse (empty unless asked).
    """

    @staticmethod
    def forward(ctx, hidden, lm_weight, lm_bias, shallow, w_gate, w_up, w_down, problem: Problem, ops: ChunkOps):
        acc = torch.promote_types(problem.hidden.dtype, torch.float32)
        rows = _row_buffers(problem, acc)
        no_grads = dict.fromkeys(("hidden", "lm_weight", "lm_bias", "shallow", "projector"), False)
        smoothing = _smoothing_with_class_weights(problem)
        loop_problem = _without_smoothing(problem) if smoothing else problem
        with torch.no_grad():
            (_, _, _, _, n_ce, n_nitp, _, _), _ = run_chunks(loop_problem, ops, no_grads, rows)
        opts = problem.options
        factors = _row_factors(problem, n_ce, n_nitp, acc)
        if smoothing:
            ce_terms = factors.norm * _smoothed_rows(problem, rows.ce, factors, acc)
        else:
            ce_terms = factors.ce * rows.ce
        loss = ce_terms + factors.nitp * rows.nitp + factors.z * rows.z
        ce_valid = problem.labels != opts.ignore_index
        empty = loss.new_empty(0)
        correct = empty if rows.correct is None else (rows.correct & ce_valid).to(acc)
        lse = empty if rows.lse is None else rows.lse
        ctx.problem, ctx.ops, ctx.factors = problem, ops, factors
        # backward recomputes with forward's matmul dtype: autocast's state is not active where backward runs
        device_type = problem.hidden.device.type
        ctx.autocast = (torch.amp.autocast_mode.is_autocast_available(device_type)
                        and torch.is_autocast_enabled(device_type),
                        torch.get_autocast_dtype(device_type) if torch.amp.autocast_mode.is_autocast_available(
                            device_type) else None)
        ctx.save_for_backward(hidden, lm_weight, lm_bias, shallow, w_gate, w_up, w_down)
        ctx.mark_non_differentiable(ce_terms, rows.z, rows.nitp, n_ce, n_nitp, correct, lse)
        return loss, ce_terms, rows.nitp, rows.z, n_ce, n_nitp, correct, lse

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        refuse_double_backward("with reduction='none' or ce_weight the backward pass recomputes its gradients "
                               "without autograd")
        hidden, lm_weight, lm_bias, shallow, w_gate, w_up, w_down = ctx.saved_tensors
        problem: Problem = ctx.problem
        opts = problem.options
        needs = ctx.needs_input_grad
        wants = {"hidden": needs[0], "lm_weight": needs[1], "lm_bias": needs[2],
                 "shallow": needs[3] and problem.with_nitp and not opts.stop_gradient,
                 "projector": any(needs[4:7])}
        if not any(wants.values()):
            return (None,) * 9
        acc = torch.promote_types(problem.hidden.dtype, torch.float32)
        grad_rows = grad_loss.to(acc)
        # the factors carry the upstream gradient and nitp_weight; the loop's own scalars must be 1
        smoothing = _smoothing_with_class_weights(problem)
        problem = dataclasses.replace(
            problem, options=dataclasses.replace(opts, reduction="sum", nitp_weight=1.0,
                                                 return_token_accuracy=False, return_lse=False,
                                                 label_smoothing=0.0 if smoothing else opts.label_smoothing))
        factors: RowFactors = ctx.factors
        rows = RowTerms(ce_grad_scale=grad_rows * factors.ce, nitp_grad_scale=grad_rows * factors.nitp)
        if problem.ce_weight is not None and (opts.z_loss_weight or smoothing):
            rows.z_grad_scale = grad_rows * factors.z  # not z_loss_weight times the CE's: weights scale CE only
        if smoothing:
            # d/ds of (1-eps)·w_y·(lse - s_y) + (eps/V)·(W·lse - sum_j w_j s_j), W = sum(w), per unit α of the row:
            # a·(softmax - onehot(y)) + (eps·W/V)·onehot(y) - (eps/V)·w, with a = (1-eps)·w_y + eps·W/V; the loop
            # takes the first two terms, the last (the same vector w for every row) is added below as a rank-1 term
            eps, vocab = opts.label_smoothing, problem.lm_weight.shape[0]
            alpha = grad_rows * factors.norm
            weight_sum = problem.ce_weight.to(acc).sum()
            rows.ce_grad_scale = alpha * ((1.0 - eps) * factors.class_weight + eps * weight_sum / vocab)
            rows.label_grad_extra = alpha * (eps * weight_sum / vocab)
        autocast_on, autocast_dtype = ctx.autocast
        recast = (torch.autocast(problem.hidden.device.type, dtype=autocast_dtype) if autocast_on
                  else contextlib.nullcontext())
        with torch.no_grad(), recast:
            _, grads = run_chunks(problem, ctx.ops, wants, rows)
            if smoothing:
                _add_class_vector_term(problem, -(eps / vocab) * alpha, grads.hidden, grads.lm_weight,
                                       grads.lm_bias, acc)

        def cast(buffer: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
            return None if buffer is None else buffer.to(like.dtype).view(like.shape)

        width = 0 if w_gate is None else w_gate.shape[0]
        gate_up = grads.gate_up
        return (cast(grads.hidden, hidden), cast(grads.lm_weight, lm_weight), cast(grads.lm_bias, lm_bias),
                cast(grads.shallow, shallow),
                None if gate_up is None else cast(gate_up[:width], w_gate),
                None if gate_up is None else cast(gate_up[width:], w_up),
                cast(grads.w_down, w_down), None, None)
