"""Liger-Kernel's fused linear cross-entropy call forms (liger_kernel 0.8.5) on fused_linear_cross_entropy.

Switch by changing one import:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss         # before
    from nitp_kernels.compat.liger import LigerFusedLinearCrossEntropyLoss         # after

Same argument names, order and defaults; the same return forms: the loss alone, or a CrossEntropyOutput (this
module's dataclass with Liger's field names, not Liger's class) when return_z_loss or return_token_accuracy is
set. Semantics as Liger's: lse_square_scale is the z-loss weight and `z_loss` is lse_square_scale·lse² reduced
like the loss (mean over positions with a label); `token_accuracy` is argmax == target over those positions
(per position with reduction="none"); reduction="none" gradients are right for any per-position upstream
gradient. Computed exactly, with sums in fp32 (fp64 for fp64 inputs), so accum_dtype may be None, float32, or
the input's own float64. Refused by name: use_token_scaling=True, return_predicted_tokens=True,
chunk_mem_const other than 1 (our chunk size comes from a memory budget, see default_chunk_size), and ce_weight
together with both label_smoothing > 0 and softcap (any two of them are accepted). Liger's z_loss ignores
ce_weight, as here. Extra keyword: backend (as fused_linear_cross_entropy's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from ..api import linear_cross_entropy_outputs


@dataclass
class CrossEntropyOutput:
    """Liger's structured result: the loss, and the extras that were asked for (else None)."""

    loss: Tensor
    z_loss: Optional[Tensor] = None
    token_accuracy: Optional[Tensor] = None
    predicted_tokens: Optional[Tensor] = None


def _refuse_unimplemented(accum_dtype: Optional[torch.dtype], input_dtype: torch.dtype, use_token_scaling: bool,
                          return_predicted_tokens: bool, chunk_mem_const: int) -> None:
    if accum_dtype is not None and accum_dtype not in (torch.float32, input_dtype):
        raise ValueError(f"accum_dtype must be None or torch.float32 (sums run in fp32, fp64 for fp64 inputs), "
                         f"got {accum_dtype}")
    if use_token_scaling:
        raise ValueError("use_token_scaling=True is not implemented by nitp_kernels; only False is accepted")
    if return_predicted_tokens:
        raise ValueError("return_predicted_tokens=True is not implemented by nitp_kernels; only False is accepted "
                         "(return_token_accuracy=True is)")
    if chunk_mem_const != 1:
        raise ValueError(f"chunk_mem_const must be 1 (nitp_kernels sizes its chunks from a memory budget), "
                         f"got {chunk_mem_const!r}")


def liger_fused_linear_cross_entropy(
    input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
    ce_weight: Optional[Tensor] = None, ignore_index: int = -100, lse_square_scale: float = 0.0,
    label_smoothing: float = 0.0, reduction: str = "mean", softcap: Optional[float] = None,
    return_z_loss: bool = False, accum_dtype: Optional[torch.dtype] = None, use_token_scaling: bool = False,
    return_token_accuracy: bool = False, return_predicted_tokens: bool = False, chunk_mem_const: int = 1,
    *, backend: str = "auto",
) -> Union[Tensor, CrossEntropyOutput]:
    """Liger's functional form: cross-entropy of input @ weight.T (+ bias) against target, fused."""
    _refuse_unimplemented(accum_dtype, input.dtype if isinstance(input, Tensor) else None, use_token_scaling,
                          return_predicted_tokens, chunk_mem_const)
    for name, flag in (("return_z_loss", return_z_loss), ("return_token_accuracy", return_token_accuracy)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    out = linear_cross_entropy_outputs(
        input, weight, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        z_loss_weight=lse_square_scale, softcap=softcap, lm_bias=bias, backend=backend,
        return_token_accuracy=return_token_accuracy, ce_weight=ce_weight)
    if not return_z_loss and not return_token_accuracy:
        return out.loss
    return CrossEntropyOutput(loss=out.loss, z_loss=lse_square_scale * out.z_loss if return_z_loss else None,
                              token_accuracy=out.token_accuracy if return_token_accuracy else None)


class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
    """Liger's module form: forward(lin_weight, _input, target, bias=None); options fixed at construction."""

    def __init__(
        self, ce_weight: Optional[Tensor] = None, ignore_index: int = -100, lse_square_scale: float = 0.0,
        label_smoothing: float = 0.0, reduction: str = "mean", softcap: Optional[float] = None,
        return_z_loss: bool = False, accum_dtype: Optional[torch.dtype] = None, use_token_scaling: bool = False,
        return_token_accuracy: bool = False, return_predicted_tokens: bool = False, *, backend: str = "auto",
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.ce_weight = ce_weight
        self.ignore_index = ignore_index
        self.lse_square_scale = lse_square_scale
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.accum_dtype = accum_dtype
        self.use_token_scaling = use_token_scaling
        self.return_token_accuracy = return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens
        self.backend = backend

    def forward(self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Optional[Tensor] = None
                ) -> Union[Tensor, CrossEntropyOutput]:
        return liger_fused_linear_cross_entropy(
            _input, lin_weight, target, bias, self.ce_weight, self.ignore_index, self.lse_square_scale,
            self.label_smoothing, self.reduction, self.softcap, self.return_z_loss, self.accum_dtype,
            self.use_token_scaling, self.return_token_accuracy, self.return_predicted_tokens, backend=self.backend)


__all__ = ["CrossEntropyOutput", "LigerFusedLinearCrossEntropyLoss", "liger_fused_linear_cross_entropy"]
