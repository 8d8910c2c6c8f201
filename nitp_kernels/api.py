"""Public functional API: fused_nitp_loss and fused_linear_cross_entropy (docs/DESIGN.md §3)."""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .chunked import ChunkOps, FusedNITPFunction, run_chunks
from .contract import BACKENDS, accumulation_dtype
from .options import LossOptions, Problem, ProjectorArg, build_problem, validate_options
from .per_token import PerTokenFunction
from .reference import reference_losses
from .row_terms import RowTerms
from .torch_ops import TorchChunkOps


class NITPLossOutput(NamedTuple):
    """loss = ce_loss + nitp_weight·nitp_loss + z_loss_weight·z_loss (only `loss` carries gradient).

    reduction="none": loss, ce_loss, nitp_loss and z_loss have labels' shape, one term per position (0 where a
    position has no such term; nitp_loss[t] is the term of position t, whose target is shallow[t + shift]).
    """

    loss: Tensor
    ce_loss: Tensor
    nitp_loss: Tensor
    z_loss: Tensor
    n_ce: Tensor
    n_nitp: Tensor
    # return_grad_norms=True: ||d(ce + z_loss_weight·z)/d hidden|| and ||d nitp_loss/d hidden|| (NITP unweighted
    # by nitp_weight, per unit of the loss's incoming gradient), so λ can be tuned from their ratio; else None.
    ce_grad_norm: Optional[Tensor] = None
    nitp_grad_norm: Optional[Tensor] = None
    # return_token_accuracy=True: the fraction of positions with a label whose argmax(logits) is the label
    # (reduction="none": 1.0/0.0 per position, 0 where ignored); else None
    token_accuracy: Optional[Tensor] = None
    # return_lse=True (reduction="none" only): log-sum-exp of each position's (softcapped) logits; else None
    lse: Optional[Tensor] = None


class LinearCrossEntropyOutput(NamedTuple):
    """fused_linear_cross_entropy's result when an extra output is asked for (else the loss alone)."""

    loss: Tensor
    z_loss: Tensor                            # the unweighted z term, reduced like the loss
    token_accuracy: Optional[Tensor] = None   # return_token_accuracy=True
    lse: Optional[Tensor] = None              # return_lse=True


def _triton_ops() -> ChunkOps:
    try:
        from .triton_ops import TritonChunkOps
    except ImportError as err:
        raise RuntimeError(f"backend='triton' is unavailable: {err}") from err
    return TritonChunkOps()


def resolve_backend(backend: str, hidden: Tensor) -> str:
    """'auto' -> 'triton' for CUDA tensors when Triton is importable, else 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if hidden.is_cuda:
            try:
                import triton  # noqa: F401
                from . import triton_ops  # noqa: F401
                return "triton"
            except ImportError:
                return "torch"
        return "torch"
    if backend == "triton":
        if hidden.dtype == torch.float64:
            raise TypeError("backend='triton' takes float32, bfloat16 or float16 tensors, not float64 "
                            "(use backend='torch' for float64)")
        if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run on the CPU "
                             "through Triton's interpreter")
    return backend


def _run(problem: Problem, backend: str) -> NITPLossOutput:
    """The outputs of every backend, shaped for the caller (per-row terms take labels' shape)."""
    opts = problem.options
    if backend == "reference":
        loss, ce, nitp, z, n_ce, n_nitp, accuracy, lse, *norms = reference_losses(problem)
    elif opts.reduction == "none" or problem.ce_weight is not None:
        loss, ce, nitp, z, n_ce, n_nitp, accuracy, lse = PerTokenFunction.apply(
            problem.hidden, problem.lm_weight, problem.lm_bias, problem.shallow,
            *(problem.projector or (None, None, None)), problem, _chunk_ops(backend))
        accuracy = accuracy if opts.return_token_accuracy else None
        lse = lse if opts.return_lse else None
        norms = []
        if opts.reduction != "none":  # class weights: per-row terms with their factors, summed here
            loss, ce, nitp, z = loss.sum(), ce.sum(), nitp.sum(), z.sum()
            if opts.reduction == "mean":
                acc = loss.dtype
                nitp, z = nitp / n_nitp.clamp_min(1).to(acc), z / n_ce.clamp_min(1).to(acc)
            if accuracy is not None:
                accuracy = accuracy.sum() / n_ce.clamp_min(1).to(accuracy.dtype)
    else:
        loss, ce, nitp, z, n_ce, n_nitp, accuracy, *norms = _run_fused(problem, _chunk_ops(backend))
        lse = None
    if opts.reduction == "none":
        shape = problem.hidden_input.shape[:-1]
        loss, ce, nitp, z = (t.view(shape) for t in (loss, ce, nitp, z))
        accuracy = None if accuracy is None else accuracy.view(shape)
        lse = None if lse is None else lse.view(shape)
    if not opts.return_grad_norms:
        norms = [None, None]
    return NITPLossOutput(loss, ce, nitp, z, n_ce, n_nitp, *norms, accuracy, lse)


def _chunk_ops(backend: str) -> ChunkOps:
    return TorchChunkOps() if backend == "torch" else _triton_ops()


def _run_fused(problem: Problem, ops: ChunkOps) -> tuple[Tensor, ...]:
    """reduction "mean"/"sum": the chunk loop, gradients formed in forward (FusedNITPFunction).
    (loss, ce, nitp, z, n_ce, n_nitp, token_accuracy or None, ce_grad_norm, nitp_grad_norm)."""
    hidden, lm_weight, lm_bias = problem.hidden, problem.lm_weight, problem.lm_bias
    projector_tensors = problem.projector or (None, None, None)
    w_gate, w_up, w_down = projector_tensors
    shallow_grad = problem.with_nitp and not problem.options.stop_gradient
    wants = {
        "hidden": hidden.requires_grad,
        "lm_weight": lm_weight.requires_grad,
        "lm_bias": lm_bias is not None and lm_bias.requires_grad,
        "shallow": shallow_grad and problem.shallow.requires_grad,
        "projector": w_gate is not None and any(w.requires_grad for w in projector_tensors),
    }
    rows = RowTerms()
    if problem.options.return_token_accuracy:
        rows.correct = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    if not torch.is_grad_enabled() or not any(wants.values()):
        wants = dict.fromkeys(wants, False)
        with torch.no_grad():  # evaluation: losses only, no gradient buffer is built
            outputs, _ = run_chunks(problem, ops, wants, rows)
        outputs = outputs[:6]
    else:
        outputs = FusedNITPFunction.apply(problem.hidden_input, lm_weight, lm_bias, problem.shallow_input, w_gate,
                                          w_up, w_down, problem, ops, wants, rows)
    accuracy = None
    if rows.correct is not None:
        n_ce = outputs[4]
        ce_valid = problem.labels != problem.options.ignore_index
        acc = accumulation_dtype(hidden.dtype)
        accuracy = (rows.correct & ce_valid).sum().to(acc) / n_ce.clamp_min(1).to(acc)
    return (*outputs[:6], accuracy, *outputs[6:8])


def fused_nitp_loss(
    hidden: Tensor, lm_weight: Tensor, labels: Tensor, shallow: Tensor, projector: ProjectorArg, *,
    seq_len: Optional[int] = None, nitp_weight: float = 1.0, loss_type: str = "cosine", shift: int = 1,
    stop_gradient: bool = True, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss_weight: float = 0.0, softcap: Optional[float] = None,
    lm_bias: Optional[Tensor] = None, chunk_size: Optional[int] = None, backend: str = "auto",
    return_grad_norms: bool = False, return_token_accuracy: bool = False, return_lse: bool = False,
    ce_weight: Optional[Tensor] = None,
) -> NITPLossOutput:
    """Cross-entropy of the LM head plus the NITP loss, fused, without materialising logits.

    hidden, shallow: (B, T, d), or (N, d) with seq_len=T. labels: hidden.shape[:-1], already shifted
    (labels[t] is token t+1), ignore_index marks positions without a label. lm_weight: (V, d).
    projector: an NITPProjector, (w_gate (H, d), w_up (H, d), w_down (d, H)), or None (P = identity).
    The NITP target of position t is shallow[t + shift] of the same sequence (stop-gradient by default).
    See docs/DESIGN.md §3 for the exact semantics shared by every backend. return_grad_norms=True adds the
    norms of the CE and NITP parts of d hidden to the output (training diagnostics for tuning λ).
    reduction="none" returns per-position terms (NITPLossOutput) whose gradients are right for any upstream
    gradient; it recomputes chunk by chunk in backward (per_token.py: memory and time). return_token_accuracy
    adds the argmax accuracy over positions with a label; return_lse (reduction="none") each position's lse.
    ce_weight (V,): class weights with F.cross_entropy's semantics (weighted mean over the labelled positions'
    weights; z stays unweighted; label smoothing as F.cross_entropy does it, but not together with softcap); it
    takes the recomputing path of reduction="none".
    """
    options = validate_options(
        nitp_weight=nitp_weight, loss_type=loss_type, shift=shift, stop_gradient=stop_gradient,
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        z_loss_weight=z_loss_weight, softcap=softcap, chunk_size=chunk_size, return_grad_norms=return_grad_norms,
        return_token_accuracy=return_token_accuracy, return_lse=return_lse)
    problem = build_problem(hidden, lm_weight, labels, shallow, projector, options, seq_len=seq_len,
                            lm_bias=lm_bias, with_nitp=True, ce_weight=ce_weight)
    backend = resolve_backend(backend, problem.hidden)
    return _run(problem, backend)


def fused_linear_cross_entropy(
    hidden: Tensor, lm_weight: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss_weight: float = 0.0, softcap: Optional[float] = None,
    lm_bias: Optional[Tensor] = None, chunk_size: Optional[int] = None, backend: str = "auto",
    return_token_accuracy: bool = False, return_lse: bool = False, ce_weight: Optional[Tensor] = None,
) -> Union[Tensor, LinearCrossEntropyOutput]:
    """Cross-entropy (+ optional z-loss) of hidden @ lm_weight.T against labels, without materialising logits.

    hidden: (..., d); labels: hidden.shape[:-1], already shifted. Returns the loss (ce + z_loss_weight·z), per
    position with reduction="none" (labels' shape, right for any upstream gradient; recomputed in backward).
    With return_token_accuracy or return_lse (reduction="none") a LinearCrossEntropyOutput instead.
    ce_weight (V,): class weights, as F.cross_entropy's `weight` (see fused_nitp_loss).
    """
    out = linear_cross_entropy_outputs(
        hidden, lm_weight, labels, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        z_loss_weight=z_loss_weight, softcap=softcap, lm_bias=lm_bias, chunk_size=chunk_size, backend=backend,
        return_token_accuracy=return_token_accuracy, return_lse=return_lse, ce_weight=ce_weight)
    if not (return_token_accuracy or return_lse):
        return out.loss
    return out


def linear_cross_entropy_outputs(
    hidden: Tensor, lm_weight: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss_weight: float = 0.0, softcap: Optional[float] = None,
    lm_bias: Optional[Tensor] = None, chunk_size: Optional[int] = None, backend: str = "auto",
    return_token_accuracy: bool = False, return_lse: bool = False, ce_weight: Optional[Tensor] = None,
) -> LinearCrossEntropyOutput:
    """fused_linear_cross_entropy, always with its LinearCrossEntropyOutput (the compat layers' entry point)."""
    options = validate_options(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                               z_loss_weight=z_loss_weight, softcap=softcap, chunk_size=chunk_size,
                               return_token_accuracy=return_token_accuracy, return_lse=return_lse)
    problem = build_problem(hidden, lm_weight, labels, None, None, options, seq_len=None, lm_bias=lm_bias,
                            with_nitp=False, ce_weight=ce_weight)
    out = _run(problem, resolve_backend(backend, problem.hidden))
    return LinearCrossEntropyOutput(out.loss, out.z_loss, out.token_accuracy, out.lse)


__all__ = ["NITPLossOutput", "LinearCrossEntropyOutput", "fused_nitp_loss", "fused_linear_cross_entropy",
           "LossOptions"]
