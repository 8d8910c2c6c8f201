"""Cut Cross-Entropy's call form (apple/ml-cross-entropy's linear_cross_entropy) on fused_linear_cross_entropy.

Switch by changing one import:
    from cut_cross_entropy import linear_cross_entropy      # before
    from nitp_kernels.compat.cce import linear_cross_entropy  # after
(and likewise the module form LinearCrossEntropy(ignore_index, softcap, reduction, shift, ...)).

linear_cross_entropy(e, c, targets, bias=None, ignore_index=-100, softcap=None, reduction="mean", shift=0, ...):
the argument order of CCE's current release (bias fourth; CCE 25.1.1 had no bias, and a number passed fourth is
refused by name rather than taken as a bias). CCE's semantics: e (..., T, D), c (V, D), targets (..., T);
shift=s (True = 1) makes position t predict targets[..., t + s] (e[..., :-s] against targets[..., s:]), so labels
are passed unshifted; reduction "mean" divides by the valid targets after the shift, "none" returns (..., T - s);
softcap is s·tanh(x/s). return_lse=True returns (loss, lse) with each position's log-sum-exp, shaped like the
"none" loss (with reduction "mean"/"sum" this runs the per-position path, which recomputes in backward).

Gradients are exact. CCE's gradient filtering (filter_eps) is an approximation this module does not make: filter_eps
accepts None and CCE's presets "auto"/"high" (the defaults a switching user carries; the result is what
filter_eps=None computes), a numeric threshold is refused by name. filter_e_grad/filter_c_grad only steer that
filtering and accum_e_fp32/accum_c_fp32 ask for fp32 sums, which this package always does: any bool is accepted.
impl: CCE's implementation names (any of them computes the same function here); vocab_parallel_options: None only.
Extra keyword: backend (as fused_linear_cross_entropy's).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..api import linear_cross_entropy_outputs

IMPLS = ("cce", "cce_exact", "cce_kahan", "cce_kahan_full_c", "cce_kahan_full_e", "cce_kahan_full",
         "torch_compile")
FILTER_EPS_PRESETS = (None, "auto", "high")


def _check_unimplemented(filter_eps: Any, accum_e_fp32: Any, accum_c_fp32: Any, filter_e_grad: Any,
                         filter_c_grad: Any, impl: Any, vocab_parallel_options: Any) -> None:
    if not any(filter_eps is preset or filter_eps == preset for preset in FILTER_EPS_PRESETS):
        raise ValueError(f"filter_eps must be one of {FILTER_EPS_PRESETS} (nitp_kernels computes exact gradients, "
                         f"as filter_eps=None does; a threshold is not implemented), got {filter_eps!r}")
    for name, flag in (("accum_e_fp32", accum_e_fp32), ("accum_c_fp32", accum_c_fp32),
                       ("filter_e_grad", filter_e_grad), ("filter_c_grad", filter_c_grad)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    impl_name = getattr(impl, "name", impl)
    if not isinstance(impl_name, str) or impl_name.lower() not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} (all compute the same here), got {impl!r}")
    if vocab_parallel_options is not None:
        raise ValueError("vocab_parallel_options is not implemented by nitp_kernels; only None is accepted")


def linear_cross_entropy(
    e: Tensor, c: Tensor, targets: Tensor, bias: Optional[Tensor] = None, ignore_index: int = -100,
    softcap: Optional[float] = None, reduction: str = "mean", shift: Union[bool, int] = 0,
    filter_eps: Union[float, str, None] = "auto", accum_e_fp32: bool = False, accum_c_fp32: bool = False,
    filter_e_grad: bool = True, filter_c_grad: bool = True, impl: Any = "cce", vocab_parallel_options: Any = None,
    return_lse: bool = False, *, backend: str = "auto",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """CCE's linear_cross_entropy: cross-entropy of e @ c.T (+ bias) against targets, fused (module doc)."""
    _check_unimplemented(filter_eps, accum_e_fp32, accum_c_fp32, filter_e_grad, filter_c_grad, impl,
                         vocab_parallel_options)
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be None or a (V,) tensor, got {type(bias).__name__} (CCE's current argument "
                        "order puts bias fourth: pass ignore_index, softcap, reduction by keyword)")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if not isinstance(targets, Tensor) or not isinstance(e, Tensor) or targets.dim() < 1:
        raise TypeError("e and targets must be tensors, targets (..., T) with e (..., T, D)")
    steps = int(shift) if isinstance(shift, (bool, int)) else -1
    if steps < 0 or steps >= targets.shape[-1]:
        raise ValueError(f"shift must be a bool or an int in [0, {targets.shape[-1]}) (targets.shape[-1]), "
                         f"got {shift!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if steps:
        if e.dim() < 2 or e.shape[:-1] != targets.shape:
            raise ValueError(f"e must be targets' shape {tuple(targets.shape)} plus D, got {tuple(e.shape)}")
        e = e[..., : targets.shape[-1] - steps, :]
        targets = targets[..., steps:]
    out = linear_cross_entropy_outputs(
        e, c, targets, ignore_index=ignore_index, reduction="none" if return_lse else reduction, softcap=softcap,
        lm_bias=bias, backend=backend, return_lse=return_lse)
    if not return_lse:
        return out.loss
    loss = out.loss
    if reduction != "none":
        loss = loss.sum()
        if reduction == "mean":
            loss = loss / (targets != ignore_index).sum().clamp_min(1)
    return loss, out.lse


class LinearCrossEntropy(torch.nn.Module):
    """CCE's module form: the options at construction, forward(e, c, targets, bias=None)."""

    def __init__(self, ignore_index: int = -100, softcap: Optional[float] = None, reduction: str = "mean",
                 shift: Union[bool, int] = 0, filter_eps: Union[float, str, None] = "auto",
                 accum_e_fp32: bool = False, accum_c_fp32: bool = False, filter_e_grad: bool = True,
                 filter_c_grad: bool = True, impl: Any = "cce", *, backend: str = "auto") -> None:
        super().__init__()
        _check_unimplemented(filter_eps, accum_e_fp32, accum_c_fp32, filter_e_grad, filter_c_grad, impl, None)
        self.options = dict(ignore_index=ignore_index, softcap=softcap, reduction=reduction, shift=shift,
                            filter_eps=filter_eps, accum_e_fp32=accum_e_fp32, accum_c_fp32=accum_c_fp32,
                            filter_e_grad=filter_e_grad, filter_c_grad=filter_c_grad, impl=impl, backend=backend)

    def forward(self, e: Tensor, c: Tensor, targets: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return linear_cross_entropy(e, c, targets, bias=bias, **self.options)


__all__ = ["LinearCrossEntropy", "linear_cross_entropy"]
