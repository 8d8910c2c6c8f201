"""nn.Module front-ends: the NITP projection head and a loss module that owns no weights."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .api import NITPLossOutput, fused_nitp_loss
from .contract import BACKENDS
from .options import validate_options


class NITPProjector(nn.Module):
    """SwiGLU head P(h) = W_down(silu(W_gate h) * (W_up h)), hidden width H = hidden_mult·d, no biases.

    12·d² parameters at hidden_mult=4. Used in training only; drop it for inference and export.
    Initialised like nn.Linear (uniform in ±1/sqrt(fan_in)) so it works out of the box; an engine may re-init.
    """

    def __init__(self, d_model: int, hidden_mult: int = 4, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be an int >= 1, got {d_model!r}")
        if not isinstance(hidden_mult, int) or hidden_mult < 1:
            raise ValueError(f"hidden_mult must be an int >= 1, got {hidden_mult!r}")
        width = hidden_mult * d_model
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.hidden_dim = d_model, width
        self.w_gate = nn.Parameter(torch.empty(width, d_model, **factory))
        self.w_up = nn.Parameter(torch.empty(width, d_model, **factory))
        self.w_down = nn.Parameter(torch.empty(d_model, width, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.w_gate, self.w_up, self.w_down):
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, hidden: Tensor) -> Tensor:
        """P(hidden) in plain PyTorch (for inspection; the fused loss never calls this)."""
        return F.linear(F.silu(F.linear(hidden, self.w_gate)) * F.linear(hidden, self.w_up), self.w_down)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, hidden_dim={self.hidden_dim}"


class NITPLoss(nn.Module):
    """Module form of fused_nitp_loss: holds the keyword options, owns no weights."""

    def __init__(self, *, nitp_weight: float = 1.0, loss_type: str = "cosine", shift: int = 1,
                 stop_gradient: bool = True, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, z_loss_weight: float = 0.0, softcap: Optional[float] = None,
                 chunk_size: Optional[int] = None, backend: str = "auto", return_grad_norms: bool = False,
                 return_token_accuracy: bool = False, return_lse: bool = False,
                 ce_weight: Optional[Tensor] = None) -> None:
        super().__init__()
        self.options = dict(nitp_weight=nitp_weight, loss_type=loss_type, shift=shift,
                            stop_gradient=stop_gradient, ignore_index=ignore_index, reduction=reduction,
                            label_smoothing=label_smoothing, z_loss_weight=z_loss_weight, softcap=softcap,
                            chunk_size=chunk_size, return_grad_norms=return_grad_norms,
                            return_token_accuracy=return_token_accuracy, return_lse=return_lse)
        validate_options(**self.options)  # fail at construction, not at the first step
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.options["backend"] = backend
        self.register_buffer("ce_weight", ce_weight)  # class weights move with the module (.to(device))

    def forward(self, hidden: Tensor, lm_weight: Tensor, labels: Tensor, shallow: Tensor, projector,
                seq_len: Optional[int] = None, lm_bias: Optional[Tensor] = None) -> NITPLossOutput:
        return fused_nitp_loss(hidden, lm_weight, labels, shallow, projector, seq_len=seq_len, lm_bias=lm_bias,
                               ce_weight=self.ce_weight, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
