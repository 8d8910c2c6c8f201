"""The "triton" backend's chunk ops: the four calls of the chunk loop (chunked.py's ChunkOps), on hand-written
kernels.

Same method names, keyword arguments and semantics as TorchChunkOps (torch_ops.py); the kernels live in
nitp_kernels/kernels/, one family per module. Per-row results come back from the kernels in fp32 and are copied
into the loop's per-call row buffers, which it sums once (no atomics across programs), so the same inputs give
bitwise the same outputs. The launchers take scale factors; the loop wants unscaled gradients, so they get 1.
fp64 is refused with a TypeError by every launcher: use backend="torch" for float64.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernels.cross_entropy import cross_entropy_rows
from .kernels.nitp_rows import nitp_rows
from .kernels.swiglu import swiglu_backward as _swiglu_backward
from .kernels.swiglu import swiglu_forward as _swiglu_forward


class TritonChunkOps:
    """Chunk ops on Triton kernels; the default on CUDA, run on CPU by Triton's interpreter in CI."""

    def __init__(self) -> None:
        self._ones: dict[torch.device, Tensor] = {}

    def _one(self, device: torch.device) -> Tensor:
        """An fp32 1 on `device` for the launchers' scale pointers, made once per device (one op call)."""
        if device not in self._ones:
            self._ones[device] = torch.ones((), dtype=torch.float32, device=device)
        return self._ones[device]

    def cross_entropy(
        self, logits: Tensor, labels: Tensor, *, ignore_index: int, label_smoothing: float,
        softcap: Optional[float], z_loss_weight: float, need_grad: bool, ce_out: Tensor, z_out: Tensor,
    ) -> Optional[Tensor]:
        """Per-row CE and z terms into ce_out, z_out; with need_grad d(ce + z_w·z)/d logits, unscaled.

        With need_grad the gradient is written over `logits` (raw, bias added, softcap not applied) and that same
        tensor is returned, so a chunk holds one (n, V) buffer. Ignored rows are written as exact zeros.
        """
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        one = self._one(logits.device)
        ce_rows, z_rows = cross_entropy_rows(
            logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
            z_loss_weight=z_loss_weight, ce_scale=one, z_scale=one, need_grad=need_grad)
        ce_out.copy_(ce_rows)
        z_out.copy_(z_rows)
        return logits if need_grad else None

    def swiglu_forward(self, gate_up: Tensor) -> Tensor:
        """g = silu(a) * b for gate_up = [a | b] of shape (n, 2H); computed in fp32, returned in gate_up's dtype."""
        return _swiglu_forward(gate_up if gate_up.stride(1) == 1 else gate_up.contiguous())

    def swiglu_backward(self, d_g: Tensor, gate_up: Tensor) -> Tensor:
        """[d_a | d_b] with d_a = d_g·b·silu'(a), d_b = d_g·silu(a), written over gate_up (its dtype)."""
        if gate_up.stride(1) != 1:
            gate_up = gate_up.contiguous()
        return _swiglu_backward(d_g, gate_up)

    def nitp_loss(
        self, pred: Tensor, target: Tensor, valid: Tensor, *, loss_type: str, need_grad: bool,
        need_target_grad: bool, loss_out: Tensor,
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Per-row NITP loss into loss_out; d/d pred and, if asked, d/d target (fp32, unscaled).

        `target` is read in place through its row stride (the shallow rows t + shift); invalid rows get zero
        loss and zero gradients.
        """
        loss_rows, d_pred, d_target = nitp_rows(
            pred, target, valid, loss_type=loss_type, scale=self._one(pred.device), need_grad=need_grad,
            need_target_grad=need_grad and need_target_grad)
        loss_out.copy_(loss_rows)
        return d_pred, d_target
