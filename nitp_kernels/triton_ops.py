"""The "triton" backend's chunk ops: the four calls of the chunk loop (chunked.py), on hand-written kernels.

Same method names, keyword arguments and semantics as TorchChunkOps (torch_ops.py); the kernels live in
nitp_kernels/kernels/, one family per module. Per-row results come back from the kernels in fp32 and are summed
here by torch (no atomics across programs), so the same inputs give bitwise the same outputs. fp64 is refused
with a TypeError by every launcher: use backend="torch" for float64.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .kernels.cross_entropy import cross_entropy_rows
from .kernels.nitp_rows import nitp_rows
from .kernels.swiglu import swiglu_backward as _swiglu_backward
from .kernels.swiglu import swiglu_forward as _swiglu_forward
from .reference import accumulation_dtype


class TritonChunkOps:
    """Chunk ops on Triton kernels; the default on CUDA, run on CPU by Triton's interpreter in CI."""

    name = "triton"

    def cross_entropy(
        self, logits: Tensor, labels: Tensor, *, ignore_index: int, label_smoothing: float,
        softcap: Optional[float], z_loss_weight: float, ce_scale: Tensor, z_scale: Tensor, need_grad: bool,
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Sums of the CE and z terms over the chunk's valid rows, and d(ce_scale·ce + z_w·z_scale·z)/d logits.

        With need_grad the gradient is written over `logits` (raw, bias added, softcap not applied) and
        that same tensor is returned, so a chunk holds one (n, V) buffer.
        """
        acc = accumulation_dtype(logits.dtype)
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        ce_rows, z_rows = cross_entropy_rows(
            logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
            z_loss_weight=z_loss_weight, ce_scale=ce_scale, z_scale=z_scale, need_grad=need_grad)
        # ignored rows are written as exact zeros by the kernel, so plain sums are the masked sums
        return ce_rows.sum(dtype=acc), z_rows.sum(dtype=acc), (logits if need_grad else None)

    def swiglu_forward(self, gate_up: Tensor) -> Tensor:
        """g = silu(a) * b for gate_up = [a | b] of shape (n, 2H); computed in fp32, returned in gate_up's dtype."""
        return _swiglu_forward(gate_up if gate_up.stride(1) == 1 else gate_up.contiguous())

    def swiglu_backward(self, d_g: Tensor, gate_up: Tensor) -> Tensor:
        """[d_a | d_b] with d_a = d_g·b·silu'(a), d_b = d_g·silu(a), written over gate_up (its dtype)."""
        if gate_up.stride(1) != 1:
            gate_up = gate_up.contiguous()
        return _swiglu_backward(d_g, gate_up)

    def nitp_loss(
        self, pred: Tensor, target: Tensor, valid: Tensor, *, loss_type: str, scale: Tensor,
        need_grad: bool, need_target_grad: bool,
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Unscaled sum of the per-row NITP loss over valid rows; scale·d/d pred and, if asked, scale·d/d target.

        `target` is read in place through its row stride (the shallow rows t + shift); invalid rows get zero
        loss and zero gradients.
        """
        acc = accumulation_dtype(pred.dtype)
        loss_rows, d_pred, d_target = nitp_rows(
            pred, target, valid, loss_type=loss_type, scale=scale, need_grad=need_grad,
            need_target_grad=need_grad and need_target_grad)
        return loss_rows.sum(dtype=acc), d_pred, d_target
