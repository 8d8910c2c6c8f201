"""The op-level contenders (issue 6, item 1, methods a-g): each a closure computing one scalar loss.

    a naive_ntp            logits materialised, F.cross_entropy in fp32
    b flce_ours            nitp_kernels.fused_linear_cross_entropy (backend "auto")
    c liger_flce           Liger-Kernel's LigerFusedLinearCrossEntropyLoss (CUDA only, see below)
    d cce                  Apple's Cut Cross-Entropy: its Triton kernel on CUDA, impl="torch_compile" on CPU
    e compiled_chunked_ce  a torch.compile'd chunked CE, gradients formed in forward (the pure-PyTorch peer)
    f naive_nitp           fused_nitp_loss(backend="reference"): logits and projector activations materialised
    g nitp_ours            nitp_kernels.fused_nitp_loss (backend "auto"), cosine, projector H = 4d

All share one set of inputs (`OpInputs`), so every method reads the same tensors and the losses can be compared.
A method that cannot run here raises `MethodSkipped` with the reason, and the report lists it as skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from nitp_kernels import NITPProjector, fused_linear_cross_entropy, fused_nitp_loss

IGNORE_INDEX = -100
METHODS = ("naive_ntp", "flce_ours", "liger_flce", "cce", "compiled_chunked_ce", "naive_nitp", "nitp_ours")
LETTERS = dict(zip(METHODS, "abcdefg"))
NTP_METHODS = ("naive_ntp", "flce_ours", "liger_flce", "cce", "compiled_chunked_ce")
NITP_METHODS = ("naive_nitp", "nitp_ours")
COMPILED_METHODS = ("compiled_chunked_ce", "cce")  # compile on first call (CCE on CPU, always ours)
MATERIALISING_METHODS = ("naive_ntp", "naive_nitp")  # hold N x V logits


class MethodSkipped(Exception):
    """The method cannot run on this machine; the message says why."""


@dataclass
class OpInputs:
    """hidden, shallow (N, d), lm_weight (V, d), labels (N,), a projector: shared by every method."""

    hidden: torch.Tensor
    shallow: torch.Tensor
    lm_weight: torch.Tensor
    labels: torch.Tensor
    projector: NITPProjector
    seq_len: int

    def leaves(self) -> list[torch.Tensor]:
        return [self.hidden, self.shallow, self.lm_weight, *self.projector.parameters()]

    def clear_grads(self) -> None:
        for tensor in self.leaves():
            tensor.grad = None


def make_inputs(n: int, d: int, vocab: int, *, seq_len: int = 1024, device: str = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = 0) -> OpInputs:
    """Random inputs at the scale a trained model sees (unit-variance hidden, lm_weight ~ N(0, 1/d))."""
    for name, value in (("n", n), ("d", d), ("vocab", vocab), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    seq_len = min(seq_len, n)
    if n % seq_len:
        raise ValueError(f"n={n} must be a multiple of seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype).requires_grad_()

    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::97] = IGNORE_INDEX  # a few ignored positions, as packed batches have
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = NITPProjector(d, device=device, dtype=dtype)
    # shallow is a stop-gradient target: it needs no gradient, like hidden_states[k] inside the fused op
    shallow = randn(n, d).detach()
    return OpInputs(randn(n, d), shallow, randn(vocab, d, scale=d ** -0.5), labels.to(device), projector, seq_len)


def flops_ratio(d: int, vocab: int) -> float:
    """Theoretical NITP/NTP op cost: (6·V·d + 72·d²) / (6·V·d) = 1 + 12·d/V (DESIGN.md Appendix B)."""
    return (6 * vocab * d + 72 * d * d) / (6 * vocab * d)


class _ChunkedCE(torch.autograd.Function):
    """Liger's scheme in plain PyTorch: per chunk, loss and gradients in forward; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_fn, chunk_size):  # noqa: D102 (autograd protocol)
        n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            loss, grad_logits = chunk_fn(hidden[rows], weight, labels[rows])
            total += loss
            torch.mm(grad_logits, weight, out=grad_h[rows])
            grad_w.addmm_(grad_logits.T, hidden[rows])
        ctx.save_for_backward(grad_h / n_valid, grad_w / n_valid)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def _ce_chunk(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of one chunk and d loss / d logits: the logits GEMM and the softmax epilogue torch.compile fuses.
    The two gradient GEMMs stay outside, accumulating in place (addmm_) as any chunked CE does."""
    logits = (h @ w.T).float()
    valid = y != IGNORE_INDEX
    safe = torch.where(valid, y, 0)
    lse = torch.logsumexp(logits, dim=-1)
    loss = torch.where(valid, lse - logits.gather(1, safe[:, None]).squeeze(1), 0.0).sum()
    grad = torch.exp(logits - lse[:, None])
    grad = grad - F.one_hot(safe, logits.shape[1]).to(grad.dtype)
    return loss, (grad * valid[:, None]).to(h.dtype)


_COMPILED_CE_CHUNK: Callable | None = None


def compiled_chunked_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE of hidden @ weight.T; chunks sized as Liger does (a chunk's logits ~ N·d elements)."""
    global _COMPILED_CE_CHUNK
    if _COMPILED_CE_CHUNK is None:
        _COMPILED_CE_CHUNK = torch.compile(_ce_chunk, dynamic=False)
    n, d = hidden.shape
    chunk = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(n / math.ceil(weight.shape[0] / d))))))
    return _ChunkedCE.apply(hidden, weight, labels, _COMPILED_CE_CHUNK, chunk)


def build_method(name: str, x: OpInputs) -> Callable[[], torch.Tensor]:
    """A closure returning the scalar loss of method `name` on x; raises MethodSkipped where it cannot run."""
    h, w, y = x.hidden, x.lm_weight, x.labels
    on_cuda = h.is_cuda
    if name == "naive_ntp":
        return lambda: F.cross_entropy((h @ w.T).float(), y, ignore_index=IGNORE_INDEX)
    if name == "flce_ours":
        return lambda: fused_linear_cross_entropy(h, w, y)
    if name == "naive_nitp":
        return lambda: fused_nitp_loss(h, w, y, x.shallow, x.projector, seq_len=x.seq_len, backend="reference").loss
    if name == "nitp_ours":
        return lambda: fused_nitp_loss(h, w, y, x.shallow, x.projector, seq_len=x.seq_len).loss
    if name == "compiled_chunked_ce":
        return lambda: compiled_chunked_ce(h, w, y)
    if name == "liger_flce":
        if not on_cuda:
            raise MethodSkipped("Liger's FLCE is Triton-only; on a CPU it would run under the Triton interpreter "
                                "(TRITON_INTERPRET=1), element by element in Python: unreasonably slow")
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError as err:
            raise MethodSkipped(f"liger-kernel is not importable: {err}") from err
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
        return lambda: liger(w, h, y)
    if name == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as err:
            raise MethodSkipped(f"cut-cross-entropy is not importable: {err}") from err
        impl = "cce" if on_cuda else "torch_compile"
        return lambda: linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, impl=impl)
    raise ValueError(f"method must be one of {METHODS}, got {name!r}")
