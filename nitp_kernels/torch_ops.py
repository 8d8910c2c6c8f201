"""The "torch" backend's chunk ops: loss and gradient of one token chunk, in pure PyTorch.

The chunk loop in chunked.py calls these four functions; the "triton" backend provides the same four with
hand-written kernels (triton_ops.py). Every loss and gradient is formed in the accumulation dtype
promote_types(dtype, fp32); gradients handed back to a matmul are cast to the matmul dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import NORM_EPS, accumulation_dtype


class TorchChunkOps:
    """Chunk ops in plain PyTorch; the default on CPU and the model the Triton kernels follow."""

    name = "torch"

    def cross_entropy(
        self, logits: Tensor, labels: Tensor, *, ignore_index: int, label_smoothing: float,
        softcap: Optional[float], z_loss_weight: float, ce_scale: Tensor, z_scale: Tensor, need_grad: bool,
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Sums of the CE and z terms over the chunk's valid rows, and d(ce_scale·ce + z_w·z_scale·z)/d logits.

        logits (n, V) are raw (bias added, softcap not yet applied) and may be overwritten in place. The gradient
        comes back in the accumulation dtype; the chunk loop decides the dtype of the matmuls that consume it.
        """
        acc = accumulation_dtype(logits.dtype)
        scores = logits.to(acc)  # the same tensor when logits are already fp32/fp64: worked on in place
        tanh = None
        if softcap is not None:
            tanh = torch.tanh(scores / softcap)
            scores = tanh * softcap
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, 0).unsqueeze(1)
        lse = torch.logsumexp(scores, dim=-1)
        ce_rows = (1.0 - label_smoothing) * (lse - scores.gather(1, safe_labels).squeeze(1))
        if label_smoothing:
            ce_rows = ce_rows + label_smoothing * (lse - scores.mean(dim=-1))
        zero = torch.zeros((), dtype=acc, device=logits.device)
        ce_sum = torch.where(valid, ce_rows, zero).sum()
        z_sum = torch.where(valid, lse * lse, zero).sum()
        if not need_grad:
            return ce_sum, z_sum, None

        grad = scores.sub_(lse.unsqueeze(1)).exp_()  # softmax, written over the scores
        row_coef = ce_scale + (2.0 * z_loss_weight) * z_scale * lse
        grad.mul_(torch.where(valid, row_coef, zero).unsqueeze(1))
        target_coef = torch.where(valid, ce_scale * (1.0 - label_smoothing), zero).to(acc)
        grad.scatter_add_(1, safe_labels, -target_coef.unsqueeze(1))
        if label_smoothing:
            grad.sub_(torch.where(valid, ce_scale * (label_smoothing / logits.shape[1]), zero).unsqueeze(1))
        if tanh is not None:  # d softcap(x)/dx = 1 - tanh(x/c)^2
            grad.mul_(1.0 - tanh * tanh)
        return ce_sum, z_sum, grad

    def swiglu_forward(self, gate_up: Tensor) -> Tensor:
        """g = silu(a) * b for gate_up = [a | b] of shape (n, 2H); computed in fp32, returned in gate_up's dtype."""
        acc = accumulation_dtype(gate_up.dtype)
        gate, up = gate_up.to(acc).chunk(2, dim=-1)
        return (F.silu(gate) * up).to(gate_up.dtype)

    def swiglu_backward(self, d_g: Tensor, gate_up: Tensor) -> Tensor:
        """[d_a | d_b] with d_a = d_g·b·silu'(a), d_b = d_g·silu(a), in the accumulation dtype (see cross_entropy)."""
        acc = accumulation_dtype(gate_up.dtype)
        gate, up = gate_up.to(acc).chunk(2, dim=-1)
        d_g = d_g.to(acc)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        d_gate = d_g * up * sig * (1.0 + gate * (1.0 - sig))
        return torch.cat((d_gate, d_g * silu), dim=-1)

    def nitp_loss(
        self, pred: Tensor, target: Tensor, valid: Tensor, *, loss_type: str, scale: Tensor,
        need_grad: bool, need_target_grad: bool,
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Unscaled sum of the per-row NITP loss over valid rows; scale·d/d pred and, if asked, scale·d/d target."""
        acc = accumulation_dtype(pred.dtype)
        p, y = pred.to(acc), target.to(acc)
        dim = p.shape[-1]
        if loss_type == "cosine":
            p_norm_raw = torch.linalg.vector_norm(p, dim=-1, keepdim=True)
            y_norm_raw = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
            p_norm, y_norm = p_norm_raw.clamp_min(NORM_EPS), y_norm_raw.clamp_min(NORM_EPS)
            cos = (p * y).sum(-1, keepdim=True) / (p_norm * y_norm)
            rows = 1.0 - cos.squeeze(-1)
            # where a norm is clamped it is a constant, so its derivative term drops out
            d_p = -(y / (p_norm * y_norm) - torch.where(p_norm_raw > NORM_EPS, cos * p / p_norm**2, 0.0))
            d_y = -(p / (p_norm * y_norm) - torch.where(y_norm_raw > NORM_EPS, cos * y / y_norm**2, 0.0))
        elif loss_type == "mse":
            diff = p - y
            rows = (diff * diff).mean(-1)
            d_p = diff * (2.0 / dim)
            d_y = -d_p
        elif loss_type == "smooth_l1":
            diff = p - y
            small = diff.abs() < 1.0
            rows = torch.where(small, 0.5 * diff * diff, diff.abs() - 0.5).mean(-1)
            d_p = torch.where(small, diff, diff.sign()) / dim
            d_y = -d_p
        elif loss_type == "kl":
            log_q_p = F.log_softmax(p, dim=-1)
            log_q_y = F.log_softmax(y, dim=-1)
            q_y = log_q_y.exp()
            log_ratio = log_q_y - log_q_p
            rows = (q_y * log_ratio).sum(-1)
            d_p = log_q_p.exp() - q_y
            d_y = q_y * (log_ratio - rows.unsqueeze(-1))
        else:
            raise ValueError(f"unknown loss_type {loss_type!r}")
        zero = torch.zeros((), dtype=acc, device=p.device)
        loss_sum = torch.where(valid, rows, zero).sum()
        if not need_grad:
            return loss_sum, None, None
        row_scale = torch.where(valid, scale.to(acc), zero).unsqueeze(1)
        return loss_sum, d_p * row_scale, (d_y * row_scale if need_target_grad else None)
