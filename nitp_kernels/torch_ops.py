"""The "torch" backend's chunk ops: loss and gradient of one token chunk, in pure PyTorch.

The chunk loop in chunked.py calls these four functions (its ChunkOps protocol); the "triton" backend provides the
same four with hand-written kernels (triton_ops.py). Every loss and gradient is formed in the accumulation dtype
promote_types(dtype, fp32) and returned unscaled: the loop applies 1/N and nitp_weight in that dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .contract import NORM_EPS, accumulation_dtype


class TorchChunkOps:
    """Chunk ops in plain PyTorch; the default on CPU and the model the Triton kernels follow."""

    def cross_entropy(
        self, logits: Tensor, labels: Tensor, *, ignore_index: int, label_smoothing: float,
        softcap: Optional[float], z_loss_weight: float, need_grad: bool, ce_out: Tensor, z_out: Tensor,
    ) -> Optional[Tensor]:
        """Per-row CE and z terms into ce_out, z_out (0 on ignored rows); with need_grad d(ce + z_w·z)/d logits.

        logits (n, V) are raw (bias added, softcap not yet applied). In the accumulation dtype (fp32/fp64 logits)
        they are worked on in place and become the gradient, so the chunk needs no second (n, V) buffer: max, then
        exp(s - max) in place, whose row sums give lse = max + log(sum) and, scaled per row, the softmax. The loss
        is (max - s_y) + log(sum), which loses no digits when the scores are large (|s| ~ 1e3).
        A label outside [0, V) is masked like an ignored one before any gather or scatter, so it never indexes
        out of bounds (the caller reports it: an error on CPU, a device-side assertion on CUDA).
        """
        acc = accumulation_dtype(logits.dtype)
        scores = logits.to(acc)  # the same tensor when logits are already fp32/fp64
        n_cols = scores.shape[1]
        valid = (labels != ignore_index) & (labels >= 0) & (labels < n_cols)
        safe_labels = torch.where(valid, labels, 0).unsqueeze(1)
        tanh = None
        if softcap is not None:
            tanh = torch.tanh(scores.div_(softcap))
            scores = torch.mul(tanh, softcap, out=scores)
        row_max = scores.amax(dim=-1, keepdim=True)
        label_score = scores.gather(1, safe_labels).squeeze(1)
        mean_score = scores.mean(dim=-1) if label_smoothing else None
        exp = scores.sub_(row_max).exp_()  # exp(s - max), in place
        exp_sum = exp.sum(dim=-1)
        log_sum = exp_sum.log()
        row_max = row_max.squeeze(1)
        lse = row_max + log_sum
        ce_rows = (1.0 - label_smoothing) * ((row_max - label_score) + log_sum)
        if label_smoothing:
            ce_rows = ce_rows + label_smoothing * ((row_max - mean_score) + log_sum)
        zero = torch.zeros((), dtype=acc, device=logits.device)
        torch.where(valid, ce_rows, zero, out=ce_out)
        torch.where(valid, lse * lse, zero, out=z_out)
        if not need_grad:
            return None

        # softmax times (1 + 2·z_w·lse), one multiplication: exp(s - max) · coef / sum
        row_coef = torch.where(valid, (1.0 + (2.0 * z_loss_weight) * lse) / exp_sum, zero)
        grad = exp.mul_(row_coef.unsqueeze(1))
        target_coef = torch.where(valid, 1.0 - label_smoothing, zero).to(acc)
        grad.scatter_add_(1, safe_labels, -target_coef.unsqueeze(1))
        if label_smoothing:
            grad.sub_(torch.where(valid, label_smoothing / n_cols, zero).unsqueeze(1))
        if tanh is not None:  # d softcap(x)/dx = 1 - tanh(x/c)^2
            grad.mul_(tanh.square_().neg_().add_(1.0))
        return grad

    def swiglu_forward(self, gate_up: Tensor) -> Tensor:
        """g = silu(a) * b for gate_up = [a | b] of shape (n, 2H); computed in fp32, returned in gate_up's dtype."""
        acc = accumulation_dtype(gate_up.dtype)
        gate, up = gate_up.to(acc).chunk(2, dim=-1)
        return F.silu(gate).mul_(up).to(gate_up.dtype)

    def swiglu_backward(self, d_g: Tensor, gate_up: Tensor) -> Tensor:
        """[d_a | d_b] with d_a = d_g·b·silu'(a), d_b = d_g·silu(a), in the accumulation dtype.

        Written over gate_up when it is in the accumulation dtype (the loop's fp32 product, not needed afterwards),
        with two (n, H) temporaries: silu'(a) = sigmoid(a) + silu(a)·(1 - sigmoid(a)).
        """
        acc = accumulation_dtype(gate_up.dtype)
        out = gate_up.to(acc)
        gate, up = out.chunk(2, dim=-1)
        d_g = d_g.to(acc)
        sig = torch.sigmoid(gate)
        d_g_up = d_g * up
        silu = torch.mul(gate, sig, out=up)  # the up half now holds silu(a)
        d_silu = sig.addcmul_(silu, sig, value=-1.0).add_(silu)
        silu.mul_(d_g)  # d_b, in place
        torch.mul(d_g_up, d_silu, out=gate)  # d_a
        return out

    def nitp_loss(
        self, pred: Tensor, target: Tensor, valid: Tensor, *, loss_type: str, need_grad: bool,
        need_target_grad: bool, loss_out: Tensor,
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Per-row NITP loss into loss_out (0 on invalid rows); d/d pred and, if asked, d/d target (unscaled, 0 on
        invalid rows)."""
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
        torch.where(valid, rows, zero, out=loss_out)
        if not need_grad:
            return None, None
        row_valid = valid.unsqueeze(1)
        return torch.where(row_valid, d_p, zero), (torch.where(row_valid, d_y, zero) if need_target_grad else None)
