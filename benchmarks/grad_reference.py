"""fp32 reference gradients for the GPU check, and the error measure it reports.

The reference is plain PyTorch autograd in fp32 on the very values the methods see (the bf16 inputs upcast),
TF32 off: the CE term over row chunks (F.cross_entropy on fp32 logits, summed, divided by the number of labelled
rows), and the NITP term as the spec writes it (nitp_kernels.reference.nitp_row_losses on the fp32 projector's
output against the shifted stop-gradient shallow rows, mean over the rows that have a label). Neither goes
through the chunk loop or a kernel under test.

Error of a gradient g against its reference r: max|g - r| / max|r| (one number per tensor, normwise).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from benchmarks.methods import IGNORE_INDEX, OpInputs, shifted_nitp_pairs
from nitp_kernels.reference import nitp_row_losses

REFERENCE_CHUNK_ROWS = 2048  # fp32 logits of 2048 x 152064: 1.2 GB, a few of them live at once


@contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """No TF32 (or bf16 passes) in fp32 matmuls while the reference runs."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def relative_error(got: torch.Tensor | None, want: torch.Tensor) -> float | None:
    """max|got - want| / max|want|, in fp32; None when the method produced no gradient."""
    if got is None:
        return None
    scale = want.abs().max().item()
    return (got.float() - want).abs().max().item() / max(scale, 1e-30)


class ReferenceGradients:
    """d hidden and d lm_weight of CE (+ an NITP loss) in fp32 for one set of inputs; each part computed once."""

    def __init__(self, x: OpInputs) -> None:
        self.x = x
        self._ce: tuple[torch.Tensor, torch.Tensor] | None = None
        self._nitp_hidden: dict[str, torch.Tensor] = {}

    def _leaf(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().float().requires_grad_()

    def ce(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(d hidden, d lm_weight) of the mean CE over labelled rows."""
        if self._ce is None:
            x = self.x
            hidden, weight = self._leaf(x.hidden), self._leaf(x.lm_weight)
            n_valid = (x.labels != IGNORE_INDEX).sum().clamp_min(1)
            with full_fp32_matmuls():
                for start in range(0, hidden.shape[0], REFERENCE_CHUNK_ROWS):
                    rows = slice(start, start + REFERENCE_CHUNK_ROWS)
                    logits = hidden[rows] @ weight.T
                    loss = F.cross_entropy(logits, x.labels[rows], ignore_index=IGNORE_INDEX, reduction="sum")
                    (loss / n_valid).backward()
                    del logits, loss
            self._ce = (hidden.grad, weight.grad)
        return self._ce

    def nitp_hidden(self, loss_type: str) -> torch.Tensor:
        """d hidden of the mean NITP loss of `loss_type` (the projector is fixed here: only d hidden is compared)."""
        if loss_type not in self._nitp_hidden:
            x = self.x
            hidden = self._leaf(x.hidden)
            w_gate, w_up, w_down = (w.detach().float() for w in x.projector.parameters())
            h, target, mask = shifted_nitp_pairs(hidden, x.shallow.float(), x.labels, x.seq_len)
            with full_fp32_matmuls():
                pred = F.linear(F.silu(F.linear(h, w_gate)) * F.linear(h, w_up), w_down)
                rows = nitp_row_losses(pred, target, loss_type)
                (rows[mask].sum() / mask.sum().clamp_min(1)).backward()
            self._nitp_hidden[loss_type] = hidden.grad
        return self._nitp_hidden[loss_type]

    def errors(self, loss_type: str | None) -> dict[str, float | None]:
        """{"hidden", "lm_weight"}: relative errors of the gradients now in x's leaves, against CE (+ NITP of
        loss_type when given)."""
        d_hidden, d_weight = self.ce()
        if loss_type is not None:
            d_hidden = d_hidden + self.nitp_hidden(loss_type)
        return {"hidden": relative_error(self.x.hidden.grad, d_hidden),
                "lm_weight": relative_error(self.x.lm_weight.grad, d_weight)}
