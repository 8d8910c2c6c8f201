"""The contenders, each a closure computing one scalar loss on shared inputs (`OpInputs`).

`make bench` (op level, letters a-g) and the GPU check (benchmarks/gpu_check.py) draw from this one registry:

    a naive_ntp            logits materialised, F.cross_entropy in fp32
    b ours_ntp             nitp_kernels.fused_linear_cross_entropy
    c liger_flce           Liger-Kernel's LigerFusedLinearCrossEntropyLoss, its defaults (with bf16 weights its
                           weight-gradient buffer is bf16)
    d cce                  Apple's Cut Cross-Entropy, its default impl (its Triton kernel on CUDA; make bench on a
                           CPU uses impl="torch_compile")
    e torch_compile_ce     a torch.compile'd chunked CE, gradients formed in forward (the pure-PyTorch peer)
    f naive_nitp           fused_nitp_loss(backend="reference"): logits and projector activations materialised
    g ours_nitp            nitp_kernels.fused_nitp_loss, cosine, projector H = 4d
      ours_nitp_<type>     the same with loss_type mse, smooth_l1 or kl
      liger_flce_fp32      Liger's FLCE with accum_dtype=torch.float32 (an fp32 weight-gradient buffer, as ours)
      cce_kahan_full_c     CCE with impl="cce_kahan_full_c", where the installed version has that impl
      unfused_nitp         Liger's FLCE plus a plain PyTorch NITP head (SwiGLU projector, cosine loss against the
                           shifted stop-gradient shallow rows): what a user writes without this library
A method that cannot run here raises `MethodSkipped` with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

import torch
import torch.nn.functional as F

from nitp_kernels import NITPProjector, fused_linear_cross_entropy, fused_nitp_loss

IGNORE_INDEX = -100
METHODS = ("naive_ntp", "ours_ntp", "liger_flce", "cce", "torch_compile_ce", "naive_nitp", "ours_nitp")
LETTERS = dict(zip(METHODS, "abcdefg"))
NTP_METHODS = ("naive_ntp", "ours_ntp", "liger_flce", "cce", "torch_compile_ce")
NITP_METHODS = ("naive_nitp", "ours_nitp")
COMPILED_METHODS = ("torch_compile_ce", "cce")  # compile on first call (CCE on CPU, always ours)
MATERIALISING_METHODS = ("naive_ntp", "naive_nitp")  # hold N x V logits
NITP_LOSS_TYPES = ("mse", "smooth_l1", "kl")  # besides cosine
EXTRA_METHODS = ("liger_flce_fp32", "cce_kahan_full_c", "unfused_nitp",
                 *(f"ours_nitp_{loss_type}" for loss_type in NITP_LOSS_TYPES))
ALL_METHODS = METHODS + EXTRA_METHODS


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
    """Random inputs at the scale a trained model sees (unit-variance hidden, lm_weight ~ N(0, 1/d)).

    Drawn on `device` (a CUDA generator on a GPU: a V x d weight drawn on the CPU takes seconds), so the values
    depend on the device; every method of one run sees the same ones.
    """
    for name, value in (("n", n), ("d", d), ("vocab", vocab), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    seq_len = min(seq_len, n)
    if n % seq_len:
        raise ValueError(f"n={n} must be a multiple of seq_len={seq_len}")
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        values = torch.randn(*shape, generator=gen, device=device)
        return (scale * values).to(dtype).requires_grad_()

    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    labels[::97] = IGNORE_INDEX  # a few ignored positions, as packed batches have
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = NITPProjector(d, dtype=dtype).to(device)
    # shallow is a stop-gradient target: it needs no gradient, like hidden_states[k] inside the fused op
    shallow = randn(n, d).detach()
    return OpInputs(randn(n, d), shallow, randn(vocab, d, scale=d ** -0.5), labels, projector, seq_len)


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


_COMPILED_CE_CHUNK: dict[tuple[str, bool], Callable] = {}


def torch_compile_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                     compile_backend: str = "inductor", dynamic: bool = False) -> torch.Tensor:
    """Mean CE of hidden @ weight.T; chunks sized as Liger does (a chunk's logits ~ N·d elements).

    dynamic=True compiles once for every shape (the GPU check: one compilation instead of one per shape);
    compile_backend="aot_eager" traces without generating code (the GPU check's CPU dry run).
    """
    key = (compile_backend, dynamic)
    if key not in _COMPILED_CE_CHUNK:
        _COMPILED_CE_CHUNK[key] = torch.compile(_ce_chunk, dynamic=dynamic, backend=compile_backend)
    n, d = hidden.shape
    chunk = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(n / math.ceil(weight.shape[0] / d))))))
    return _ChunkedCE.apply(hidden, weight, labels, _COMPILED_CE_CHUNK[key], chunk)


def shifted_nitp_pairs(hidden: torch.Tensor, shallow: torch.Tensor, labels: torch.Tensor, seq_len: int,
                       shift: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h rows t, stop-gradient shallow rows t + shift, mask of rows with a label), each (B, T - shift, ...)."""
    d = hidden.shape[-1]
    h = hidden.view(-1, seq_len, d)[:, : seq_len - shift]
    target = shallow.detach().view(-1, seq_len, d)[:, shift:]
    mask = labels.view(-1, seq_len)[:, : seq_len - shift] != IGNORE_INDEX
    return h, target, mask


def unfused_nitp_head(x: OpInputs) -> torch.Tensor:
    """The NITP loss as a user writes it today: the projector module, then 1 - cosine in fp32, masked mean."""
    h, target, mask = shifted_nitp_pairs(x.hidden, x.shallow, x.labels, x.seq_len)
    rows = 1.0 - F.cosine_similarity(x.projector(h).float(), target.float(), dim=-1)
    return rows[mask].mean()


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _liger_loss(accum_dtype: torch.dtype | None, on_cuda: bool, interpreter: bool):
    if not on_cuda and not interpreter:
        raise MethodSkipped("Liger's FLCE is Triton-only; on a CPU it would run under the Triton interpreter "
                            "(TRITON_INTERPRET=1), element by element in Python: unreasonably slow")
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as err:
        raise MethodSkipped(f"liger-kernel is not importable: {err}") from err
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, accum_dtype=accum_dtype)


def _cce_impl(name: str, on_cuda: bool, cpu_impl: str | None) -> str:
    """The impl string CCE gets for method `name`, or MethodSkipped with the reason."""
    if name == "cce_kahan_full_c":
        import importlib

        import cut_cross_entropy

        # newer versions export the enum; 25.1.1 keeps it in the submodule (whose name the package's
        # linear_cross_entropy function shadows as an attribute, hence import_module)
        impls = getattr(cut_cross_entropy, "LinearCrossEntropyImpl", None) or getattr(
            importlib.import_module("cut_cross_entropy.linear_cross_entropy"), "LinearCrossEntropyImpl", None)
        if impls is None or "CCE_KAHAN_FULL_C" not in impls.__members__:
            known = sorted(m.lower() for m in impls.__members__) if impls is not None else []
            raise MethodSkipped(f"cut-cross-entropy {_package_version('cut-cross-entropy')} has no impl "
                                f"'cce_kahan_full_c' (it has {known}); the Kahan variants exist only in sources "
                                "newer than its latest release on PyPI, 25.1.1")
        if not on_cuda:
            raise MethodSkipped("no CPU path: CCE's Kahan variants exist only as Triton kernels (bf16 tl.dot, "
                                "which Triton's interpreter computes wrongly)")
        return "cce_kahan_full_c"
    if on_cuda:
        return "cce"
    if cpu_impl is None:
        raise MethodSkipped("no CPU path here: CCE's default impl is a Triton kernel with bf16 tl.dot, which "
                            "Triton's interpreter computes wrongly; its torch_compile impl costs ~50 s of "
                            "compilation on 2 cores")
    return cpu_impl


def build_method(name: str, x: OpInputs, *, backend: str = "auto", triton_interpreter: bool = False,
                 compile_backend: str = "inductor", compile_dynamic: bool = False,
                 cce_cpu_impl: str | None = "torch_compile") -> Callable[[], torch.Tensor]:
    """A closure returning the scalar loss of method `name` on x; raises MethodSkipped where it cannot run.

    backend: our ops' backend. triton_interpreter: on a CPU, run Triton-only competitors (Liger) through
    Triton's interpreter (tiny shapes only). compile_*: torch_compile_ce's torch.compile settings.
    cce_cpu_impl: CCE's impl on a CPU (None: CCE is unavailable there).
    """
    h, w, y = x.hidden, x.lm_weight, x.labels
    on_cuda = h.is_cuda
    if name == "naive_ntp":
        return lambda: F.cross_entropy((h @ w.T).float(), y, ignore_index=IGNORE_INDEX)
    if name == "ours_ntp":
        return lambda: fused_linear_cross_entropy(h, w, y, backend=backend)
    if name == "naive_nitp":
        return lambda: fused_nitp_loss(h, w, y, x.shallow, x.projector, seq_len=x.seq_len, backend="reference").loss
    if name == "ours_nitp" or name.startswith("ours_nitp_"):
        loss_type = "cosine" if name == "ours_nitp" else name[len("ours_nitp_"):]
        if loss_type not in ("cosine", *NITP_LOSS_TYPES):
            raise ValueError(f"method must be one of {ALL_METHODS}, got {name!r}")
        return lambda: fused_nitp_loss(h, w, y, x.shallow, x.projector, seq_len=x.seq_len, loss_type=loss_type,
                                       backend=backend).loss
    if name == "torch_compile_ce":
        return lambda: torch_compile_ce(h, w, y, compile_backend=compile_backend, dynamic=compile_dynamic)
    if name in ("liger_flce", "liger_flce_fp32", "unfused_nitp"):
        liger = _liger_loss(torch.float32 if name == "liger_flce_fp32" else None, on_cuda, triton_interpreter)
        if name == "unfused_nitp":
            return lambda: liger(w, h, y) + unfused_nitp_head(x)
        return lambda: liger(w, h, y)
    if name in ("cce", "cce_kahan_full_c"):
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as err:
            raise MethodSkipped(f"cut-cross-entropy is not importable: {err}") from err
        impl = _cce_impl(name, on_cuda, cce_cpu_impl)
        return lambda: linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, impl=impl)
    raise ValueError(f"method must be one of {ALL_METHODS}, got {name!r}")
