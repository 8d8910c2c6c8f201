"""Validation of the fused ops' inputs, and the normalised problem every backend receives.

Every misuse raises ValueError or TypeError naming the argument, before any kernel runs, so a user never
meets a crash deep inside a kernel or a silent NaN.

The label range is the one check that depends on tensor values. On CPU it raises a ValueError with the offending
value. On CUDA, reading a value back would cost a host synchronisation per call, so the check runs on the device:
one boolean reduction over the labels and torch._assert_async, which fails the CUDA context with a device-side
assertion whose text (printed to stderr by the device; at most 255 characters) names `labels` and the allowed
range; the host then sees "CUDA error: device-side assert triggered" at its next synchronisation. The chunk ops
never index with such a label meanwhile. NITP_KERNELS_DEBUG=1 makes CUDA use the eager check (with a sync).
"""
from __future__ import annotations

import math
import numbers

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .contract import BACKENDS, FLOAT_DTYPES, LOSS_TYPES, REDUCTIONS  # noqa: F401 (BACKENDS: re-exported)

ProjectorArg = Union[None, torch.nn.Module, Sequence[Tensor]]


@dataclass(frozen=True)
class LossOptions:
    """The keyword options shared by every backend (already validated)."""

    nitp_weight: float = 1.0
    loss_type: str = "cosine"
    shift: int = 1
    stop_gradient: bool = True
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss_weight: float = 0.0
    softcap: Optional[float] = None
    chunk_size: Optional[int] = None
    return_grad_norms: bool = False
    return_token_accuracy: bool = False
    return_lse: bool = False


@dataclass
class Problem:
    """Flattened, validated tensors: hidden/shallow (N, d), labels (N,) int64, sequences of length seq_len.

    `shallow` and the projector weights are None for plain cross-entropy; `projector` is None for the
    projector-free ablation (P = identity) and otherwise (w_gate (H, d), w_up (H, d), w_down (d, H)).
    """

    hidden: Tensor
    lm_weight: Tensor
    lm_bias: Optional[Tensor]
    labels: Tensor
    shallow: Optional[Tensor]
    projector: Optional[tuple[Tensor, Tensor, Tensor]]
    seq_len: int
    options: LossOptions
    hidden_input: Tensor  # the caller's tensors, which autograd differentiates
    shallow_input: Optional[Tensor]
    ce_weight: Optional[Tensor] = None  # (V,) class weights of the CE term (F.cross_entropy's `weight`)

    @property
    def with_nitp(self) -> bool:
        return self.shallow is not None


def _scalar(name: str, value: object) -> object:
    """A 0-d tensor's Python value (numeric options may come from a scheduler as tensors); others unchanged."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)} "
                            f"and dtype {value.dtype}")
        return value.item()
    return value


def _real(name: str, value: object, requirement: str, ok) -> float:
    """A finite real number (int, float, numpy scalar or 0-d tensor; never bool) for which ok(value) holds.

    Non-finite values are refused by name: softcap=inf would give NaN, nitp_weight=inf an infinite loss.
    """
    value = _scalar(name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number ({requirement}), got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    return value


def _integer(name: str, value: object) -> int:
    """An int (numpy integer or 0-d integer tensor accepted; never bool)."""
    value = _scalar(name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def validate_options(
    *, nitp_weight: float = 1.0, loss_type: str = "cosine", shift: int = 1, stop_gradient: bool = True,
    ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0, softcap: Optional[float] = None, chunk_size: Optional[int] = None,
    return_grad_norms: bool = False, return_token_accuracy: bool = False, return_lse: bool = False,
) -> LossOptions:
    nitp_weight = _real("nitp_weight", nitp_weight, "a finite number >= 0", lambda v: v >= 0)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    shift = _integer("shift", shift)
    if shift < 0:
        raise ValueError(f"shift must be an int >= 0, got {shift!r}")
    if not isinstance(stop_gradient, bool):
        raise TypeError(f"stop_gradient must be a bool, got {type(stop_gradient).__name__}")
    ignore_index = _integer("ignore_index", ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    label_smoothing = _real("label_smoothing", label_smoothing, "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
    z_loss_weight = _real("z_loss_weight", z_loss_weight, "a finite number >= 0", lambda v: v >= 0)
    if softcap is not None:
        softcap = _real("softcap", softcap, "None or a finite number > 0", lambda v: v > 0)
    if chunk_size is not None:
        chunk_size = _integer("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if not isinstance(return_grad_norms, bool):
        raise TypeError(f"return_grad_norms must be a bool, got {type(return_grad_norms).__name__}")
    if return_grad_norms and reduction == "none":
        raise ValueError("return_grad_norms=True needs reduction 'mean' or 'sum' (the norms are those of the "
                         "gradient of a scalar loss), got reduction='none'")
    for name, flag in (("return_token_accuracy", return_token_accuracy), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if return_lse and reduction != "none":
        raise ValueError(f"return_lse=True needs reduction='none' (the log-sum-exp is per token), "
                         f"got reduction={reduction!r}")
    return LossOptions(nitp_weight, loss_type, shift, stop_gradient, ignore_index, reduction,
                       label_smoothing, z_loss_weight, softcap, chunk_size, return_grad_norms,
                       return_token_accuracy, return_lse)


def _check_float_tensor(name: str, tensor: object) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {tensor.dtype}")
    return tensor


def projector_weights(projector: ProjectorArg) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """(w_gate, w_up, w_down) from an NITPProjector-like module or a 3-sequence; None stays None."""
    if projector is None:
        return None
    if isinstance(projector, torch.nn.Module):
        try:
            return projector.w_gate, projector.w_up, projector.w_down
        except AttributeError as err:
            raise TypeError("projector module must have parameters w_gate, w_up, w_down (use NITPProjector)") from err
    if isinstance(projector, (tuple, list)) and len(projector) == 3:
        return tuple(projector)  # type: ignore[return-value]
    raise TypeError("projector must be None, an NITPProjector, or a tuple (w_gate, w_up, w_down), "
                    f"got {type(projector).__name__}")


def _check_labels_range(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Every label in [0, vocab) or equal to ignore_index: eagerly on CPU, on the device on CUDA (module doc)."""
    allowed = f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}"
    eager = labels.device.type == "cpu" or os.environ.get("NITP_KERNELS_DEBUG", "0") not in ("", "0")
    if not eager:
        in_range = (labels == ignore_index) | ((labels >= 0) & (labels < vocab))
        torch._assert_async(in_range.all(), f"fused NITP loss: {allowed}; found one outside "
                                            "(NITP_KERNELS_DEBUG=1 shows its value)")
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        example = int(labels[bad][0])
        raise ValueError(f"{allowed}; found {example} ({int(bad.sum())} bad labels)")


def build_problem(
    hidden: Tensor, lm_weight: Tensor, labels: Tensor, shallow: Optional[Tensor], projector: ProjectorArg,
    options: LossOptions, *, seq_len: Optional[int], lm_bias: Optional[Tensor], with_nitp: bool,
    ce_weight: Optional[Tensor] = None,
) -> Problem:
    """Check shapes, dtypes and devices; flatten to (N, d). Raises ValueError/TypeError naming the argument."""
    _check_float_tensor("hidden", hidden)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (B, T, d) or (N, d), got shape {tuple(hidden.shape)}")
    d = hidden.shape[-1]
    n_rows = hidden.numel() // d if d else 0
    if d == 0 or n_rows == 0:
        raise ValueError(f"hidden must have at least one row and d >= 1, got shape {tuple(hidden.shape)}")
    if hidden.dim() == 3:
        if seq_len is not None and seq_len != hidden.shape[1]:
            raise ValueError(f"seq_len={seq_len} does not match hidden.shape[1]={hidden.shape[1]}")
        seq_len = hidden.shape[1]
    elif seq_len is None:
        if with_nitp:
            raise ValueError("seq_len is required when hidden is 2-D (N, d): NITP targets stay inside a sequence")
        seq_len = n_rows
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1 or n_rows % seq_len:
        raise ValueError(f"seq_len must be an int >= 1 dividing the number of rows {n_rows}, got {seq_len!r}")
    if with_nitp and options.shift >= seq_len:
        raise ValueError(f"shift must satisfy 0 <= shift < seq_len={seq_len}, got {options.shift}")

    _check_float_tensor("lm_weight", lm_weight)
    if lm_weight.dim() != 2 or lm_weight.shape[1] != d or lm_weight.shape[0] < 1:
        raise ValueError(f"lm_weight must be (V, d={d}), got shape {tuple(lm_weight.shape)}")
    vocab = lm_weight.shape[0]
    if lm_bias is not None:
        _check_float_tensor("lm_bias", lm_bias)
        if lm_bias.shape != (vocab,):
            raise ValueError(f"lm_bias must be (V={vocab},), got shape {tuple(lm_bias.shape)}")
    if ce_weight is not None:
        _check_float_tensor("ce_weight", ce_weight)
        if ce_weight.shape != (vocab,):
            raise ValueError(f"ce_weight must be (V={vocab},), got shape {tuple(ce_weight.shape)}")
        if options.label_smoothing and options.softcap is not None:
            raise ValueError(f"ce_weight with label_smoothing={options.label_smoothing} and softcap="
                             f"{options.softcap} is not implemented (any two of the three are)")
        if options.return_grad_norms:
            raise ValueError("return_grad_norms=True is not implemented with ce_weight")
        if ce_weight.requires_grad:
            raise ValueError("ce_weight must not require grad (class weights are constants here)")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden.shape[:-1]), "
                         f"got {tuple(labels.shape)}")

    weights = None
    if with_nitp:
        _check_float_tensor("shallow", shallow)
        if shallow.shape != hidden.shape:
            raise ValueError(f"shallow must have the shape of hidden {tuple(hidden.shape)}, got {tuple(shallow.shape)}")
        if shallow.dtype != hidden.dtype:
            raise TypeError(f"shallow must have hidden's dtype {hidden.dtype}, got {shallow.dtype}")
        weights = projector_weights(projector)
        if weights is not None:
            w_gate, w_up, w_down = weights
            for name, w in zip(("w_gate", "w_up", "w_down"), weights):
                _check_float_tensor(f"projector.{name}", w)
            width = w_gate.shape[0] if w_gate.dim() == 2 else -1
            if (w_gate.dim() != 2 or w_gate.shape[1] != d or width < 1 or w_up.shape != (width, d)
                    or w_down.shape != (d, width)):
                raise ValueError(f"projector weights must be w_gate (H, {d}), w_up (H, {d}), w_down ({d}, H); got "
                                 f"{tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}")

    named = [("lm_weight", lm_weight), ("labels", labels), ("lm_bias", lm_bias), ("shallow", shallow),
             ("ce_weight", ce_weight)]
    if weights is not None:
        named += list(zip(("projector.w_gate", "projector.w_up", "projector.w_down"), weights))
    for name, tensor in named:
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    _check_labels_range(labels, vocab, options.ignore_index)
    if options.return_grad_norms and not (torch.is_grad_enabled() and hidden.requires_grad):
        raise ValueError("return_grad_norms=True needs hidden to require grad (and grad mode on): the norms are "
                         "those of d loss / d hidden")

    return Problem(
        hidden=hidden.reshape(n_rows, d), lm_weight=lm_weight, lm_bias=lm_bias,
        labels=labels.reshape(n_rows).long(),
        shallow=shallow.reshape(n_rows, d) if with_nitp else None,
        projector=weights, seq_len=seq_len, options=options, hidden_input=hidden,
        shallow_input=shallow if with_nitp else None, ce_weight=ce_weight,
    )
