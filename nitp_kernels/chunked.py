"""The chunk loop shared by the "torch" and "triton" backends (Liger FLCE's scheme, extended to NITP).

Forward computes every gradient, in two passes over the N token rows:
- the cross-entropy pass, in chunks of default_chunk_size rows: the logits chunk (into one buffer reused by every
  chunk), the per-row CE and z terms and the UNSCALED d logits (chunk op), then d hidden written straight into its
  buffer and d lm_weight, d lm_bias accumulated in place;
- the NITP pass, which never touches V and so takes larger chunks (nitp_chunk_size): the projector forward
  P(h) = W_down(silu(W_gate h) * W_up h), the per-row NITP loss against shallow[t + shift] (read in place by index
  arithmetic) and its unscaled gradient, the SwiGLU backward, the projector's weight gradients accumulated in place,
  and its part of d hidden added into the same buffer.
Only the gradient buffers are saved for backward, which scales them by the incoming gradient. No (N, V) or (N, H)
tensor outlives a chunk.

Numerics (contract.py): matmul results, per-row values and gradient sums are in the accumulation dtype. Per-row
losses are written into per-call (N,) buffers and summed once at the end. The chunk ops return gradients
unscaled; the normalisations (1/N_ce, nitp_weight/N_nitp) are applied in the accumulation dtype: to each chunk of
d hidden and d shallow as it is formed, and to the weight-gradient buffers once after the loop. Nothing stored in
bf16/fp16 is ever multiplied by 1/N, where it would flush to zero (fp16: p ~ 1/V times 1/N is below 6e-8).
Where the matmuls run and in which dtype: matmuls.py. Each input is cast to the matmul dtype at most once per call.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor

from .contract import accumulation_dtype, valid_positions
from .matmuls import MatmulPlan, matmul_dtype, matmul_plan
from .options import Problem
from .row_terms import RowTerms, add_label_column, label_correction, label_scores, read_logits

MIN_CHUNK_ROWS = 256


def _floor_pow2(value: int) -> int:
    return 1 << (max(1, value).bit_length() - 1)


def default_chunk_size(n_rows: int, d_model: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk of the cross-entropy pass, from a memory budget.

    dtype is the dtype of the logits chunk: the matmul dtype on CUDA (bf16 in mixed-precision training), the
    accumulation dtype (fp32) on CPU. The rule: the largest power of two whose logits chunk, rows x vocab in
    `dtype`, is no larger than the fp32 (vocab x d_model) weight-gradient buffer the op holds anyway, i.e.
    rows <= 4·d_model / itemsize(dtype); at least MIN_CHUNK_ROWS = 256 rows; at most n_rows.

    Transient memory of a chunk (Triton backend): that logits buffer, which the CE kernel overwrites with d logits,
    so at most 4·vocab·d_model bytes (for d_model >= 256 in fp32, >= 128 in bf16, where the 256-row floor does
    not bind), plus O(rows) per-row values; d hidden goes straight into its buffer and the weight gradients are summed
    in place (matmuls.py). The torch backend's chunk op adds up to two fp32 copies of the chunk on CUDA. At the
    paper's shape (N=16384, d=1280, V=152064, bf16): 2048 rows, a 623 MB logits chunk under the 779 MB buffer.

    The 256-row floor: every chunk adds its product into the whole (vocab x d) buffer, so tiny chunks turn the loop
    into a memory-bound sweep over it (CPU, 2 cores: at N=512, d=512, V=152064 2-row chunks took 37 s, 256-row
    chunks 2.6 s).
    """
    del vocab  # the budget scales with vocab on both sides: rows * vocab * itemsize <= vocab * d * 4
    rows = max(MIN_CHUNK_ROWS, _floor_pow2(4 * d_model // dtype.itemsize))
    return max(1, min(rows, n_rows))


def nitp_chunk_size(n_rows: int, d_model: int, width: int, vocab: int) -> int:
    """Rows per chunk of the NITP pass: the same budget (4·vocab·d_model bytes) for its own transients.

    Per row the pass holds about 8·width + 4·d_model values of 4 bytes (gate_up and d gate_up (2·width each), g and
    d g, their matmul-dtype copies, the chunk op's temporaries; pred, d pred, d target, the d hidden product), so
    rows <= vocab·d_model / (8·width + 4·d_model), as a power of two, at least MIN_CHUNK_ROWS, at most n_rows.
    (N=16384, d=1280, H=5120, V=152064: 4096 rows.)
    """
    rows = max(MIN_CHUNK_ROWS, _floor_pow2(vocab * d_model // (8 * width + 4 * d_model)))
    return max(1, min(rows, n_rows))


class ChunkOps(Protocol):
    """The four per-chunk computations a backend provides (TorchChunkOps, TritonChunkOps).

    Per-row values are written into the caller's (n,) views in the accumulation dtype, 0 on rows without a term.
    Gradients are unscaled (the loop applies 1/N and nitp_weight) and come back in the accumulation dtype or the
    input's dtype; the loop casts them once to the matmul dtype.
    """

    def cross_entropy(self, logits: Tensor, labels: Tensor, *, ignore_index: int, label_smoothing: float,
                      softcap: Optional[float], z_loss_weight: float, need_grad: bool, ce_out: Tensor,
                      z_out: Tensor) -> Optional[Tensor]:
        """Per-row CE and z into ce_out, z_out; with need_grad d(ce + z_loss_weight·z)/d logits (may overwrite
        logits). A label outside [0, V) is treated as ignored: never used as an index."""

    def swiglu_forward(self, gate_up: Tensor) -> Tensor:
        """silu(a) * b for gate_up = [a | b]."""

    def swiglu_backward(self, d_g: Tensor, gate_up: Tensor) -> Tensor:
        """[d a | d b] (may overwrite gate_up)."""

    def nitp_loss(self, pred: Tensor, target: Tensor, valid: Tensor, *, loss_type: str, need_grad: bool,
                  need_target_grad: bool, loss_out: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Per-row NITP loss into loss_out; with need_grad d loss/d pred and, if asked, d loss/d target."""


@dataclass
class Gradients:
    """Gradient buffers, in the accumulation dtype while the loop runs."""

    hidden: Optional[Tensor] = None
    lm_weight: Optional[Tensor] = None
    lm_bias: Optional[Tensor] = None
    shallow: Optional[Tensor] = None
    gate_up: Optional[Tensor] = None  # (2H, d): [d w_gate; d w_up] from one GEMM
    w_down: Optional[Tensor] = None


@dataclass
class _Call:
    """What both passes share: the problem, the ops, the matmul plan, operands cast once, scales, buffers."""

    problem: Problem
    ops: ChunkOps
    plan: MatmulPlan
    hidden: Tensor                  # hidden in the matmul dtype (the caller's tensor when no cast is needed)
    grads: Gradients
    ce_scale: Optional[Tensor]      # 1/N_ce for "mean", None for "sum"
    nitp_scale: Tensor              # nitp_weight (/ N_nitp for "mean")
    rows: RowTerms


def _autocast_off(device_type: str):
    """The loop casts its operands itself (matmul_dtype); autocast must not recast anything inside it."""
    if torch.amp.autocast_mode.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def run_chunks(problem: Problem, ops: ChunkOps, wants: dict[str, bool], rows: Optional[RowTerms] = None
               ) -> tuple[list[Tensor], Gradients]:
    """Outputs [loss, ce, nitp, z, n_ce, n_nitp, ce_grad_norm, nitp_grad_norm] (ce/nitp/z already reduced) and
    the gradients of loss = ce + nitp_weight·nitp + z_loss_weight·z for the inputs named True in `wants`.

    With options.return_grad_norms the two norms are ||d(ce + z_loss_weight·z)/d hidden|| and
    ||d nitp/d hidden|| (NITP unweighted by nitp_weight, so a target ratio gives λ directly); else empty tensors.
    They cost no second pass: the CE norm is one reduction over the d hidden buffer between the two passes, the
    NITP norm one reduction per NITP chunk over the product it adds.
    rows: optional per-row buffers and per-row gradient factors (RowTerms); with gradient factors the options
    must say reduction="sum" and nitp_weight=1 (the factors carry both).
    """
    hidden = problem.hidden
    plan = matmul_plan(hidden.device, matmul_dtype(hidden))  # before autocast is switched off
    with _autocast_off(hidden.device.type):
        return _run(problem, ops, wants, plan, rows or RowTerms())


def _run(problem: Problem, ops: ChunkOps, wants: dict[str, bool], plan: MatmulPlan, rows: RowTerms
         ) -> tuple[list[Tensor], Gradients]:
    opts = problem.options
    hidden, labels = problem.hidden, problem.labels
    n_rows, d = hidden.shape
    device, acc = hidden.device, plan.result_dtype
    vocab = problem.lm_weight.shape[0]

    ce_valid, nitp_valid = valid_positions(labels, opts.ignore_index, opts.shift, problem.seq_len)
    n_ce = ce_valid.sum()
    n_nitp = nitp_valid.sum() if problem.with_nitp else torch.zeros((), dtype=torch.int64, device=device)
    mean = opts.reduction == "mean"
    ce_scale = 1.0 / n_ce.clamp_min(1).to(acc) if mean else None
    nitp_count = n_nitp.clamp_min(1).to(acc)  # the divisor of every NITP mean (0 positions: the terms are 0)
    nitp_scale = torch.full((), opts.nitp_weight, dtype=acc, device=device)
    if mean:
        nitp_scale = nitp_scale / nitp_count

    width = 0 if problem.projector is None else problem.projector[0].shape[0]
    grads = _allocate(wants, n_rows, d, vocab, width, acc, device)
    call = _Call(problem, ops, plan, hidden.to(plan.operand_dtype), grads, ce_scale, nitp_scale, rows)

    ce_rows = rows.ce if rows.ce is not None else torch.empty(n_rows, dtype=acc, device=device)
    z_rows = rows.z if rows.z is not None else torch.empty(n_rows, dtype=acc, device=device)
    _cross_entropy_pass(call, ce_rows, z_rows)
    return_norms = opts.return_grad_norms and grads.hidden is not None
    ce_norm = torch.linalg.vector_norm(grads.hidden) if return_norms else None  # CE part only, so far

    nitp_sum = torch.zeros((), dtype=acc, device=device)
    nitp_sq = torch.zeros((), dtype=acc, device=device) if return_norms else None
    if problem.with_nitp:
        if rows.nitp is not None:
            rows.nitp[n_rows - opts.shift:] = 0  # the last rows have no target in the flattened tensor
            nitp_rows = rows.nitp[: n_rows - opts.shift]
        else:
            nitp_rows = torch.empty(n_rows - opts.shift, dtype=acc, device=device)
        _nitp_pass(call, nitp_valid, nitp_rows, nitp_sq)
        nitp_sum = nitp_rows.sum()

    # the weight gradients were summed unscaled: one multiplication each, in the accumulation dtype
    for buffer, factor in ((grads.lm_weight, ce_scale), (grads.lm_bias, ce_scale),
                           (grads.gate_up, nitp_scale), (grads.w_down, nitp_scale)):
        if buffer is not None and factor is not None:
            buffer.mul_(factor)

    ce, z = ce_rows.sum(), z_rows.sum()
    nitp = nitp_sum
    if mean:
        ce, z = ce * ce_scale, z * ce_scale
        nitp = nitp_sum / nitp_count
    if return_norms:
        nitp_norm = nitp_sq.sqrt() / nitp_count if mean else nitp_sq.sqrt()
        norms = [ce_norm, nitp_norm]
    else:
        norms = [hidden.new_empty(0, dtype=acc), hidden.new_empty(0, dtype=acc)]
    loss = ce + opts.nitp_weight * nitp + opts.z_loss_weight * z
    return [loss, ce, nitp, z, n_ce, n_nitp, *norms], grads


def _allocate(wants: dict[str, bool], n_rows: int, d: int, vocab: int, width: int, acc: torch.dtype,
              device: torch.device) -> Gradients:
    grads = Gradients()
    if wants["hidden"]:  # every row is written by the cross-entropy pass
        grads.hidden = torch.empty((n_rows, d), dtype=acc, device=device)
    # the weight-gradient buffers are written by the first chunk of their pass (accumulate(first=True)): no fill
    if wants["lm_weight"]:
        grads.lm_weight = torch.empty((vocab, d), dtype=acc, device=device)
    if wants["lm_bias"]:
        grads.lm_bias = torch.zeros((vocab,), dtype=acc, device=device)
    if wants["shallow"]:
        grads.shallow = torch.zeros((n_rows, d), dtype=acc, device=device)
    if wants["projector"]:
        grads.gate_up = torch.empty((2 * width, d), dtype=acc, device=device)
        grads.w_down = torch.empty((d, width), dtype=acc, device=device)
    return grads


def _cross_entropy_pass(call: _Call, ce_rows: Tensor, z_rows: Tensor) -> None:
    problem, plan, grads = call.problem, call.plan, call.grads
    opts = problem.options
    hidden, labels = call.hidden, problem.labels
    n_rows = hidden.shape[0]
    lm_weight = problem.lm_weight.to(plan.operand_dtype)
    lm_bias = None if problem.lm_bias is None else problem.lm_bias.to(plan.operand_dtype)
    vocab = lm_weight.shape[0]
    need_grad = grads.hidden is not None or grads.lm_weight is not None or grads.lm_bias is not None
    chunk = opts.chunk_size or default_chunk_size(n_rows, hidden.shape[1], vocab, plan.operand_dtype)
    # On CUDA the logits stay in the matmul dtype, as in Liger and Cut Cross-Entropy: the CE kernel reads them once
    # and writes d logits over them. One buffer serves every chunk (on CPU a fresh one would be page-faulted in).
    logits_buffer = torch.empty((min(chunk, n_rows), vocab), dtype=plan.operand_dtype, device=hidden.device)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h = hidden[start:end]
        logits = logits_buffer[: end - start]
        if lm_bias is None:
            torch.mm(h, lm_weight.T, out=logits)
        else:
            torch.addmm(lm_bias, h, lm_weight.T, out=logits)
        read_logits(call.rows, logits, labels, start, end, opts.softcap)
        separate_z = need_grad and call.rows.z_grad_scale is not None
        label_score = label_scores(logits, labels[start:end], opts.ignore_index, opts.softcap) if separate_z else None
        d_logits = call.ops.cross_entropy(
            logits, labels[start:end], ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing,
            softcap=opts.softcap, z_loss_weight=0.0 if separate_z else opts.z_loss_weight, need_grad=need_grad,
            ce_out=ce_rows[start:end], z_out=z_rows[start:end])
        if d_logits is None:
            continue
        d_logits = d_logits.to(plan.operand_dtype)  # once, for every matmul below
        # per-row factors scale d hidden's rows (after the product, in the accumulation dtype) and, for the weight
        # gradients, the rows of h: d_logits (possibly bf16) is never multiplied, so no product p·g can flush
        row_scale = None if call.rows.ce_grad_scale is None else call.rows.ce_grad_scale[start:end].unsqueeze(1)
        label_coef = None
        if separate_z:
            row_scale, label_coef = label_correction(call.rows, ce_rows[start:end], label_score, start, end)
        if grads.hidden is not None:
            d_h = plan.product(d_logits, lm_weight, out=grads.hidden[start:end])
            if call.ce_scale is not None:
                d_h.mul_(call.ce_scale)
            if row_scale is not None:
                d_h.mul_(row_scale)
        if grads.lm_weight is not None:
            h_rows = h if row_scale is None else (h.to(row_scale.dtype) * row_scale).to(plan.operand_dtype)
            plan.accumulate(grads.lm_weight, d_logits.T, h_rows, first=start == 0)
        if grads.lm_bias is not None:
            if row_scale is None:
                grads.lm_bias.add_(d_logits.sum(0, dtype=grads.lm_bias.dtype))
            else:
                grads.lm_bias.add_(torch.mv(d_logits.T.to(row_scale.dtype), row_scale.squeeze(1)))
        if label_coef is not None:
            add_label_column(label_coef, label_score[2], h, lm_weight, None if grads.hidden is None
                             else grads.hidden[start:end], grads.lm_weight, grads.lm_bias)


def _nitp_pass(call: _Call, valid: Tensor, loss_rows: Tensor, grad_sq: Optional[Tensor]) -> None:
    """NITP rows t in [0, N - shift): their target row t + shift exists in the flattened tensor; `valid` (the
    contract's rule) drops the rows whose target lies in the next sequence or whose label is ignored."""
    problem, plan, grads, ops = call.problem, call.plan, call.grads, call.ops
    opts = problem.options
    shift, n_rows, d = opts.shift, *call.hidden.shape
    last = n_rows - shift
    w_gate_up = w_down = None
    width = d
    if problem.projector is not None:
        w_gate, w_up, w_down = (w.to(plan.operand_dtype) for w in problem.projector)
        w_gate_up = torch.cat((w_gate, w_up), dim=0)  # one (2H x d) GEMM for gate and up
        width = w_gate.shape[0]
    need_dh = grads.hidden is not None
    need_grad = need_dh or grads.gate_up is not None or grads.shallow is not None
    vocab = problem.lm_weight.shape[0]
    chunk = opts.chunk_size or nitp_chunk_size(last, d, width, vocab)
    for start in range(0, last, chunk):
        end = min(start + chunk, last)
        h = call.hidden[start:end]
        target = problem.shallow[start + shift:end + shift]
        gate_up = g = None
        if w_gate_up is not None:
            gate_up = plan.product(h, w_gate_up.T)
            g = ops.swiglu_forward(gate_up).to(plan.operand_dtype)  # once, for both matmuls
            pred = plan.product(g, w_down.T)
        else:
            pred = problem.hidden[start:end]  # P = identity: no matmul, so no matmul-dtype rounding
        d_pred, d_target = ops.nitp_loss(
            pred, target, valid[start:end], loss_type=opts.loss_type, need_grad=need_grad,
            need_target_grad=grads.shallow is not None, loss_out=loss_rows[start:end])
        if call.rows.nitp_grad_scale is not None:  # per-row factors, in the accumulation dtype (d pred's)
            row_scale = call.rows.nitp_grad_scale[start:end].unsqueeze(1)
            d_pred = None if d_pred is None else d_pred.mul_(row_scale)
            d_target = None if d_target is None else d_target.mul_(row_scale)
        if d_target is not None:
            torch.mul(d_target, call.nitp_scale, out=grads.shallow[start + shift:end + shift])
        if d_pred is None:
            continue
        d_from_nitp = d_pred
        if w_gate_up is not None:
            d_pred = d_pred.to(plan.operand_dtype)  # once, for both matmuls
            if grads.w_down is not None:
                plan.accumulate(grads.w_down, d_pred.T, g, first=start == 0)
            if need_dh or grads.gate_up is not None:
                d_gate_up = ops.swiglu_backward(plan.product(d_pred, w_down), gate_up).to(plan.operand_dtype)
                if grads.gate_up is not None:
                    plan.accumulate(grads.gate_up, d_gate_up.T, h, first=start == 0)
                if need_dh:
                    d_from_nitp = plan.product(d_gate_up, w_gate_up)
        if need_dh:
            if grad_sq is not None:
                grad_sq += d_from_nitp.square().sum()
            grads.hidden[start:end].addcmul_(d_from_nitp, call.nitp_scale)


def refuse_double_backward(why: str) -> None:
    """Raise inside an autograd backward run with create_graph=True (the only case autograd runs backward in
    grad mode): a gradient penalty through gradients computed without autograd would come out silently wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"fused NITP loss: double backward (create_graph=True) is not supported — {why}. Use "
                           "backend='reference' for gradient penalties or other higher-order gradients.")


class FusedNITPFunction(torch.autograd.Function):
    """Autograd wrapper: forward runs the chunk loop and saves only gradient buffers; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, lm_weight, lm_bias, shallow, w_gate, w_up, w_down, problem, ops, wants, rows):
        (loss, ce, nitp, z, n_ce, n_nitp, ce_norm, nitp_norm), grads = run_chunks(problem, ops, wants, rows)

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
        # The gradients were formed in the forward pass: to a second differentiation they are constants
        refuse_double_backward("the op computes its gradients during the forward pass, so their own gradients "
                               "would be missing")
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
            return (*grads, None, None, None, None)
        # A repeated backward (retain_graph=True, gradcheck): fresh tensors, the first results stay untouched.
        if bool(ctx.first_scale == 0):
            raise RuntimeError("fused NITP loss: the first backward through this forward had gradient 0, which "
                               "erased its gradient buffers; run the forward again")
        factor = grad_loss / ctx.first_scale
        return (*[None if g is None else g * factor for g in grads], None, None, None, None)
