"""reduction="none": per-token losses whose gradients are right for ANY per-token upstream gradient.

The chunk loop's usual scheme (chunked.py) forms every gradient in the forward pass and only multiplies it by one
scalar in backward. With a per-token loss the upstream gradient g (one value per position) is unknown until
backward, and it weighs each row differently, so this path works the other way round:

- forward runs the chunk loop without gradients (losses only) and keeps the per-row CE, z and NITP terms
  (chunked.RowTerms); the per-token loss is ce + nitp_weight·nitp + z_loss_weight·z;
- it saves the inputs (hidden, lm_weight, lm_bias, shallow, the projector weights: references to the caller's
  tensors, no copies), never logits;
- backward runs the whole chunk loop again, with gradients, each row's CE (+ z) gradient scaled by g[t] and its
  NITP gradient by nitp_weight·g[t] (chunked.RowTerms' per-row factors, applied in the accumulation dtype).

Memory: forward holds one logits chunk at a time, like the fused path, plus the (N,) per-row terms, and no
gradient buffer; backward holds exactly what the fused path's forward holds (one logits chunk, the gradient
buffers, which are handed to autograd). Time: the forward's logits matmul and CE op per chunk, then the fused
path's whole loop in backward: the V-sized work of the cross-entropy pass is one logits matmul plus two gradient
matmuls per chunk, so this mode does about 4/3 of the fused path's V-sized work (an estimate from the count of
matmuls, not a measurement), and the projector's forward twice. A repeated backward (retain_graph=True)
recomputes again.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .chunked import ChunkOps, RowTerms, run_chunks
from .options import Problem


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

    Outputs (N,) each, in the accumulation dtype: loss (differentiable), ce, nitp, z; then n_ce, n_nitp,
    the rows' correctness (float, 0 on ignored rows; empty unless asked) and their lse (empty unless asked).
    """

    @staticmethod
    def forward(ctx, hidden, lm_weight, lm_bias, shallow, w_gate, w_up, w_down, problem: Problem, ops: ChunkOps):
        acc = torch.promote_types(problem.hidden.dtype, torch.float32)
        rows = _row_buffers(problem, acc)
        no_grads = dict.fromkeys(("hidden", "lm_weight", "lm_bias", "shallow", "projector"), False)
        with torch.no_grad():
            (_, _, _, _, n_ce, n_nitp, _, _), _ = run_chunks(problem, ops, no_grads, rows)
        opts = problem.options
        loss = rows.ce + opts.nitp_weight * rows.nitp + opts.z_loss_weight * rows.z
        ce_valid = problem.labels != opts.ignore_index
        empty = loss.new_empty(0)
        correct = empty if rows.correct is None else (rows.correct & ce_valid).to(acc)
        lse = empty if rows.lse is None else rows.lse
        ctx.problem, ctx.ops = problem, ops
        ctx.save_for_backward(hidden, lm_weight, lm_bias, shallow, w_gate, w_up, w_down)
        ctx.mark_non_differentiable(rows.ce, rows.z, rows.nitp, n_ce, n_nitp, correct, lse)
        return loss, rows.ce, rows.nitp, rows.z, n_ce, n_nitp, correct, lse

    @staticmethod
    def backward(ctx, grad_loss, *unused):
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
        problem = dataclasses.replace(
            problem, options=dataclasses.replace(opts, reduction="sum", nitp_weight=1.0,
                                                 return_token_accuracy=False, return_lse=False))
        rows = RowTerms(ce_grad_scale=grad_rows, nitp_grad_scale=grad_rows * opts.nitp_weight)
        with torch.no_grad():
            _, grads = run_chunks(problem, ctx.ops, wants, rows)

        def cast(buffer: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
            return None if buffer is None else buffer.to(like.dtype).view(like.shape)

        width = 0 if w_gate is None else w_gate.shape[0]
        gate_up = grads.gate_up
        return (cast(grads.hidden, hidden), cast(grads.lm_weight, lm_weight), cast(grads.lm_bias, lm_bias),
                cast(grads.shallow, shallow),
                None if gate_up is None else cast(gate_up[:width], w_gate),
                None if gate_up is None else cast(gate_up[width:], w_up),
                cast(grads.w_down, w_down), None, None)
