"""The chunk loop shared by the "torch" and "triton" backends (Liger FLCE's scheme, extended to NITP).

Forward walks the N token rows in chunks. Per chunk it forms the logits, the CE/z-loss and d logits; the
projector forward P(h) = W_down(silu(W_gate h) * W_up h), the NITP loss against shallow[t + shift] (read in place
by index arithmetic) and d P(h); the SwiGLU backward; and accumulates d hidden, d lm_weight, d lm_bias and the
projector's weight gradients. Only those gradient buffers are saved for backward, which scales them by the
incoming gradient. No (N, V) or (N, H) tensor outlives a chunk.

The chunk ops (cross_entropy, swiglu_forward, swiglu_backward, nitp_loss) are pluggable: TorchChunkOps or
TritonChunkOps. Matmul operands are in hidden.dtype (on CUDA) and every matmul result, loss and gradient sum is in
promote_types(hidden.dtype, fp32). The chunk ops therefore receive fp32 logits / gate_up / predictions for
bf16/fp16 inputs (fp64 for fp64) and may return gradients in either that dtype or hidden.dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .options import Problem
from .reference import accumulation_dtype


MIN_CHUNK_ROWS = 256


def default_chunk_size(n_rows: int, d_model: int, vocab: int) -> int:
    """Liger FLCE's rule (a chunk's logits hold about as many elements as hidden, N·d), but at least
    MIN_CHUNK_ROWS rows.

    Every chunk adds its product into the whole (V x d) weight-gradient buffer, so tiny chunks turn the loop
    into a memory-bound sweep over that buffer: at N=512, d=512, V=152064 Liger's rule picks 2-row chunks and
    fwd+bwd took 37 s on 2 CPU cores, against 2.6 s with 256-row chunks. At the paper's GPU shape (N=16384,
    d=1280, V=152064) both rules give 256 rows.
    """
    inc_factor = math.ceil(vocab / d_model)
    liger_rows = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(n_rows / inc_factor)))))
    return max(liger_rows, MIN_CHUNK_ROWS)


def matmul_acc(a: Tensor, b: Tensor, mm_dtype: torch.dtype, acc: torch.dtype) -> Tensor:
    """a @ b with the result in the accumulation dtype.

    Every matmul of the loop feeds fp32 math (softmax, SwiGLU, the NITP loss) or an fp32 gradient sum, so its
    result stays in fp32: no rounding to bf16 between a matmul and what consumes it. On CUDA the operands run in
    mm_dtype (hidden.dtype) with an fp32 result, mm(out_dtype=...), at bf16 GEMM speed. Elsewhere
    (CPU, where bf16 speed is no goal) both are upcast, so low-precision results come out correctly rounded.
    """
    if a.is_cuda and mm_dtype != acc:
        a, b = a.to(mm_dtype), b.to(mm_dtype)
        try:
            return torch.mm(a, b, out_dtype=acc)
        except (TypeError, RuntimeError, NotImplementedError):  # torch without mm(out_dtype=...)
            return (a @ b).to(acc)
    return a.to(acc) @ b.to(acc)


def add_matmul(out: Tensor, a: Tensor, b: Tensor, mm_dtype: torch.dtype) -> None:
    """out += a @ b, the product summed in out's dtype (see matmul_acc)."""
    if not a.is_cuda or mm_dtype == out.dtype:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))
    else:
        out.add_(matmul_acc(a, b, mm_dtype, out.dtype))


@dataclass
class Gradients:
    """Gradient buffers, in the accumulation dtype while the loop runs."""

    hidden: Optional[Tensor] = None
    lm_weight: Optional[Tensor] = None
    lm_bias: Optional[Tensor] = None
    shallow: Optional[Tensor] = None
    gate_up: Optional[Tensor] = None  # (2H, d): [d w_gate; d w_up] from one GEMM
    w_down: Optional[Tensor] = None


def run_chunks(problem: Problem, ops: Any, wants: dict[str, bool]) -> tuple[list[Tensor], Gradients]:
    """Outputs [loss, ce, nitp, z, n_ce, n_nitp, ce_grad_norm, nitp_grad_norm] (ce/nitp/z already reduced) and
    the gradients of loss = ce + nitp_weight·nitp + z_loss_weight·z for the inputs named True in `wants`.

    With options.return_grad_norms the two norms are ||d(ce + z_loss_weight·z)/d hidden|| and
    ||d nitp/d hidden|| (NITP unweighted by nitp_weight, so a target ratio gives λ directly); else empty tensors.
    """
    opts = problem.options
    hidden, labels = problem.hidden, problem.labels
    n_rows, d = hidden.shape
    mm_dtype, device = hidden.dtype, hidden.device
    acc = accumulation_dtype(mm_dtype)
    # Weights are cast once: to the matmul dtype on CUDA; elsewhere matmul_acc upcasts operands to acc anyway.
    # On CUDA the logits chunk also stays in that dtype, as in Liger and Cut Cross-Entropy: the CE kernel reads
    # it once and writes d logits over it, half the memory traffic of fp32 logits.
    operand_dtype = mm_dtype if hidden.is_cuda else acc
    lm_weight = problem.lm_weight.to(operand_dtype)
    lm_bias = None if problem.lm_bias is None else problem.lm_bias.to(operand_dtype)
    vocab = lm_weight.shape[0]
    with_nitp, shift = problem.with_nitp, opts.shift

    ce_valid = labels != opts.ignore_index
    n_ce = ce_valid.sum()
    if with_nitp:
        position = torch.arange(n_rows, device=device) % problem.seq_len
        nitp_valid = ce_valid & (position + shift < problem.seq_len)
        n_nitp = nitp_valid.sum()
    else:
        n_nitp = torch.zeros((), dtype=torch.int64, device=device)
    one = torch.ones((), dtype=acc, device=device)
    ce_scale = one / n_ce.clamp_min(1).to(acc) if opts.reduction == "mean" else one
    nitp_scale = one / n_nitp.clamp_min(1).to(acc) if opts.reduction == "mean" else one

    any_grad = any(wants.values())
    w_gate_up = w_down = None
    if with_nitp and problem.projector is not None:
        w_gate, w_up, w_down = (w.to(operand_dtype) for w in problem.projector)
        w_gate_up = torch.cat((w_gate, w_up), dim=0)  # one (2H x d) GEMM for gate and up
        width = w_gate.shape[0]

    grads = Gradients()
    if any_grad:
        if wants["hidden"]:
            grads.hidden = torch.empty_like(hidden, dtype=acc)
        if wants["lm_weight"]:
            grads.lm_weight = torch.zeros((vocab, d), dtype=acc, device=device)
        if wants["lm_bias"]:
            grads.lm_bias = torch.zeros((vocab,), dtype=acc, device=device)
        if wants["shallow"]:
            grads.shallow = torch.zeros((n_rows, d), dtype=acc, device=device)
        if wants["projector"]:
            grads.gate_up = torch.zeros((2 * width, d), dtype=acc, device=device)
            grads.w_down = torch.zeros((d, width), dtype=acc, device=device)
    need_dh = wants["hidden"]
    grad_norms = opts.return_grad_norms and need_dh
    # For the norms the NITP gradient is formed unweighted and weighted by λ afterwards
    nitp_grad_scale = nitp_scale if grad_norms else opts.nitp_weight * nitp_scale
    post_weight = opts.nitp_weight if grad_norms else None
    ce_sq = torch.zeros((), dtype=acc, device=device)
    nitp_sq = torch.zeros((), dtype=acc, device=device)
    need_ce_grad = wants["hidden"] or wants["lm_weight"] or wants["lm_bias"]
    need_nitp_grad = with_nitp and (wants["hidden"] or wants["projector"] or wants["shallow"])

    chunk = opts.chunk_size or default_chunk_size(n_rows, d, vocab)
    ce_sum = torch.zeros((), dtype=acc, device=device)
    z_sum = torch.zeros((), dtype=acc, device=device)
    nitp_sum = torch.zeros((), dtype=acc, device=device)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h = hidden[start:end]
        if operand_dtype == acc:
            logits = matmul_acc(h, lm_weight.T, mm_dtype, acc)
            if lm_bias is not None:
                logits += lm_bias
        else:
            logits = h @ lm_weight.T if lm_bias is None else torch.addmm(lm_bias, h, lm_weight.T)
        ce_c, z_c, d_logits = ops.cross_entropy(
            logits, labels[start:end], ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing,
            softcap=opts.softcap, z_loss_weight=opts.z_loss_weight, ce_scale=ce_scale, z_scale=ce_scale,
            need_grad=need_ce_grad)
        ce_sum += ce_c
        z_sum += z_c
        d_h = None
        if d_logits is not None:
            d_logits = d_logits.to(operand_dtype)  # once, for both matmuls below (no-op off CUDA)
            if need_dh:
                d_h = matmul_acc(d_logits, lm_weight, mm_dtype, acc)
                if grad_norms:
                    ce_sq += d_h.square().sum()
            if grads.lm_weight is not None:
                add_matmul(grads.lm_weight, d_logits.T, h, mm_dtype)
            if grads.lm_bias is not None:
                grads.lm_bias.add_(d_logits.sum(0, dtype=acc))
        del logits, d_logits

        # NITP rows whose target t + shift exists in the flattened tensor; the per-row mask handles sequences
        nitp_rows = min(end, n_rows - shift) - start if with_nitp else 0
        if nitp_rows > 0:
            h_n = h[:nitp_rows]
            target = problem.shallow[start + shift:start + shift + nitp_rows]
            gate_up = g = None
            if w_gate_up is not None:
                gate_up = matmul_acc(h_n, w_gate_up.T, mm_dtype, acc)
                g = ops.swiglu_forward(gate_up)
                pred = matmul_acc(g, w_down.T, mm_dtype, acc)
            else:
                pred = h_n
            loss_c, d_pred, d_target = ops.nitp_loss(
                pred, target, nitp_valid[start:start + nitp_rows], loss_type=opts.loss_type,
                scale=nitp_grad_scale, need_grad=need_nitp_grad,
                need_target_grad=grads.shallow is not None)
            nitp_sum += loss_c
            if d_pred is not None:
                d_from_nitp = d_gate_up = None
                if w_gate_up is not None:
                    d_pred = d_pred.to(operand_dtype)  # once, for both matmuls (no-op off CUDA)
                    d_g = matmul_acc(d_pred, w_down, mm_dtype, acc)
                    d_gate_up = ops.swiglu_backward(d_g, gate_up).to(operand_dtype)
                    if need_dh:
                        d_from_nitp = matmul_acc(d_gate_up, w_gate_up, mm_dtype, acc)
                else:
                    d_from_nitp = d_pred
                if post_weight is not None:  # unweighted so far: take the norm, then weight by λ
                    nitp_sq += d_from_nitp.square().sum()
                    d_pred, d_from_nitp = d_pred * post_weight, d_from_nitp * post_weight
                    d_gate_up = None if d_gate_up is None else d_gate_up * post_weight
                    d_target = None if d_target is None else d_target * post_weight
                if grads.w_down is not None:
                    add_matmul(grads.w_down, d_pred.T, g, mm_dtype)
                if grads.gate_up is not None:
                    add_matmul(grads.gate_up, d_gate_up.T, h_n, mm_dtype)
                if d_from_nitp is not None:
                    if d_h is None:
                        d_h = torch.zeros((end - start, d), dtype=acc, device=device)
                    d_h[:nitp_rows] += d_from_nitp
            if d_target is not None:
                grads.shallow[start + shift:start + shift + nitp_rows] = d_target
        if grads.hidden is not None:
            if d_h is None:
                grads.hidden[start:end] = 0
            else:
                grads.hidden[start:end] = d_h

    if opts.reduction == "mean":
        ce, z, nitp = ce_sum * ce_scale, z_sum * ce_scale, nitp_sum * nitp_scale
    else:
        ce, z, nitp = ce_sum, z_sum, nitp_sum
    if grad_norms:
        norms = [ce_sq.sqrt(), nitp_sq.sqrt()]
    else:
        norms = [hidden.new_empty(0, dtype=acc), hidden.new_empty(0, dtype=acc)]
    loss = ce + opts.nitp_weight * nitp + opts.z_loss_weight * z
    return [loss, ce, nitp, z, n_ce, n_nitp, *norms], grads


class FusedNITPFunction(torch.autograd.Function):
    """Autograd wrapper: forward runs the chunk loop and saves only gradient buffers; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, lm_weight, lm_bias, shallow, w_gate, w_up, w_down, problem, ops, wants):
        (loss, ce, nitp, z, n_ce, n_nitp, ce_norm, nitp_norm), grads = run_chunks(problem, ops, wants)

        def to_input(buffer: Optional[Tensor], like: Optional[Tensor], shape=None) -> Optional[Tensor]:
            if buffer is None:
                return None
            out = buffer.to(like.dtype)
            return out.view(shape) if shape is not None else out

        width = 0 if w_gate is None else w_gate.shape[0]
        gate_up = to_input(grads.gate_up, w_gate)
        saved = [
            to_input(grads.hidden, hidden, hidden.shape),
            to_input(grads.lm_weight, lm_weight),
            to_input(grads.lm_bias, lm_bias),
            to_input(grads.shallow, shallow, None if shallow is None else shallow.shape),
            None if gate_up is None else gate_up[:width],
            None if gate_up is None else gate_up[width:],
            to_input(grads.w_down, w_down),
        ]
        del grads
        ctx.has = [t is not None for t in saved]
        ctx.save_for_backward(*[t for t in saved if t is not None])
        ctx.first_scale = None
        ctx.mark_non_differentiable(ce, nitp, z, n_ce, n_nitp, ce_norm, nitp_norm)
        return loss, ce, nitp, z, n_ce, n_nitp, ce_norm, nitp_norm

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        stored = iter(ctx.saved_tensors)
        grads = [next(stored) if has else None for has in ctx.has]
        if ctx.first_scale is None:
            # First backward: scale the buffers in place and hand them over, so no second copy of
            # d lm_weight (V x d) is made at the memory peak.
            # (.data: the scaling must not bump the saved tensors' version, or a repeated backward is refused)
            ctx.first_scale = grad_loss.detach().clone()
            for grad in grads:
                if grad is not None:
                    grad.data.mul_(grad_loss)
            return (*grads, None, None, None)
        # A repeated backward (retain_graph=True, gradcheck): fresh tensors, the first results stay untouched.
        if bool(ctx.first_scale == 0):
            raise RuntimeError("fused NITP loss: the first backward through this forward had gradient 0, which "
                               "erased its gradient buffers; run the forward again")
        factor = grad_loss / ctx.first_scale
        return (*[None if g is None else g * factor for g in grads], None, None, None)
