"""Public functional API: fused_nitp_loss and fused_linear_cross_entropy (docs/DESIGN.md §3)."""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .chunked import ChunkOps, FusedNITPFunction, run_chunks
from .contract import BACKENDS
from .options import LossOptions, Problem, ProjectorArg, build_problem, validate_options
from .reference import reference_losses
from .torch_ops import TorchChunkOps


class NITPLossOutput(NamedTuple):
    """loss = ce_loss + nitp_weight·nitp_loss + z_loss_weight·z_loss (only `loss` carries gradient)."""

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


def _run(problem: Problem, backend: str) -> tuple[Tensor, ...]:
    if backend == "reference":
        return reference_losses(problem)
    ops: ChunkOps = TorchChunkOps() if backend == "torch" else _triton_ops()
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
    if not torch.is_grad_enabled() or not any(wants.values()):
        wants = dict.fromkeys(wants, False)
        with torch.no_grad():  # evaluation: losses only, no gradient buffer is built
            outputs, _ = run_chunks(problem, ops, wants)
        return tuple(outputs[:6])
    *outputs, ce_norm, nitp_norm = FusedNITPFunction.apply(
        problem.hidden_input, lm_weight, lm_bias, problem.shallow_input, w_gate, w_up, w_down, problem, ops, wants)
    if problem.options.return_grad_norms:
        return (*outputs, ce_norm, nitp_norm)
    return tuple(outputs)


def fused_nitp_loss(
    hidden: Tensor, lm_weight: Tensor, labels: Tensor, shallow: Tensor, projector: ProjectorArg, *,
    seq_len: Optional[int] = None, nitp_weight: float = 1.0, loss_type: str = "cosine", shift: int = 1,
    stop_gradient: bool = True, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss_weight: float = 0.0, softcap: Optional[float] = None,
    lm_bias: Optional[Tensor] = None, chunk_size: Optional[int] = None, backend: str = "auto",
    return_grad_norms: bool = False,
) -> NITPLossOutput:
    """Cross-entropy of the LM head plus the NITP loss, fused, without materialising logits.

    hidden, shallow: (B, T, d), or (N, d) with seq_len=T. labels: hidden.shape[:-1], already shifted
    (labels[t] is token t+1), ignore_index marks positions without a label. lm_weight: (V, d).
    projector: an NITPProjector, (w_gate (H, d), w_up (H, d), w_down (d, H)), or None (P = identity).
    The NITP target of position t is shallow[t + shift] of the same sequence (stop-gradient by default).
    See docs/DESIGN.md §3 for the exact semantics shared by every backend. return_grad_norms=True adds the
    norms of the CE and NITP parts of d hidden to the output (training diagnostics for tuning λ).
    """
    options = validate_options(
        nitp_weight=nitp_weight, loss_type=loss_type, shift=shift, stop_gradient=stop_gradient,
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        z_loss_weight=z_loss_weight, softcap=softcap, chunk_size=chunk_size, return_grad_norms=return_grad_norms)
    problem = build_problem(hidden, lm_weight, labels, shallow, projector, options, seq_len=seq_len,
                            lm_bias=lm_bias, with_nitp=True)
    backend = resolve_backend(backend, problem.hidden)
    return NITPLossOutput(*_run(problem, backend))


def fused_linear_cross_entropy(
    hidden: Tensor, lm_weight: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss_weight: float = 0.0, softcap: Optional[float] = None,
    lm_bias: Optional[Tensor] = None, chunk_size: Optional[int] = None, backend: str = "auto",
) -> Tensor:
    """Cross-entropy (+ optional z-loss) of hidden @ lm_weight.T against labels, without materialising logits.

    hidden: (..., d); labels: hidden.shape[:-1], already shifted. Returns the loss (ce + z_loss_weight·z).
    """
    options = validate_options(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                               z_loss_weight=z_loss_weight, softcap=softcap, chunk_size=chunk_size)
    problem = build_problem(hidden, lm_weight, labels, None, None, options, seq_len=None, lm_bias=lm_bias,
                            with_nitp=False)
    backend = resolve_backend(backend, problem.hidden)
    return _run(problem, backend)[0]


__all__ = ["NITPLossOutput", "fused_nitp_loss", "fused_linear_cross_entropy", "LossOptions"]
