"""Micro-benchmarks of the op, forward + backward, as pytest-benchmark tests. Not part of `make test`.

    pytest benchmarks --benchmark-only                        # per shape: ours NTP, ours NITP and the naive ones
    pytest benchmarks --benchmark-only --benchmark-autosave   # also saves .benchmarks/<machine>/NNNN_<commit>.json
    pytest benchmarks --benchmark-only --benchmark-compare    # against the last saved run (another commit, say)
    pytest benchmarks --benchmark-only --benchmark-json=out.json

Small CPU shapes, fp32, on the default backend (torch on CPU). `make bench` stays the headline report (memory
saved for backward, fresh-process peaks, Liger and Cut Cross-Entropy, the training step); these are quick timings
to check a change to the op. Each benchmark first checks its loss against the naive computation's, so a fast but
wrong op fails instead of showing a good time.
"""
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")

from benchmarks.methods import IGNORE_INDEX, OpInputs, make_inputs  # noqa: E402
from nitp_kernels import fused_linear_cross_entropy, fused_nitp_loss  # noqa: E402

# (N rows, d, V): a single chunk, and several chunks at a vocabulary eight times d's multiple.
SHAPES = [(256, 128, 4096), (1024, 256, 16384)]
SEQ_LEN = 256


def naive_ntp(x: OpInputs) -> torch.Tensor:
    """Logits materialised, then F.cross_entropy in fp32: what the fused op replaces."""
    return F.cross_entropy((x.hidden @ x.lm_weight.T).float(), x.labels, ignore_index=IGNORE_INDEX)


def ours_ntp(x: OpInputs) -> torch.Tensor:
    return fused_linear_cross_entropy(x.hidden, x.lm_weight, x.labels)


def naive_nitp(x: OpInputs) -> torch.Tensor:
    """The reference backend: logits and the projector's activations materialised, plain autograd."""
    return fused_nitp_loss(x.hidden, x.lm_weight, x.labels, x.shallow, x.projector, seq_len=SEQ_LEN,
                           backend="reference").loss


def ours_nitp(x: OpInputs) -> torch.Tensor:
    return fused_nitp_loss(x.hidden, x.lm_weight, x.labels, x.shallow, x.projector, seq_len=SEQ_LEN).loss


# Each method with the naive method whose loss it must reproduce.
METHODS: dict[str, tuple[Callable[[OpInputs], torch.Tensor], Callable[[OpInputs], torch.Tensor]]] = {
    "naive_ntp": (naive_ntp, naive_ntp), "ours_ntp": (ours_ntp, naive_ntp),
    "naive_nitp": (naive_nitp, naive_nitp), "ours_nitp": (ours_nitp, naive_nitp),
}


@pytest.mark.parametrize("n,d,vocab", SHAPES, ids=[f"N{n}-d{d}-V{v}" for n, d, v in SHAPES])
@pytest.mark.parametrize("method", list(METHODS))
def test_fwd_bwd(benchmark, method: str, n: int, d: int, vocab: int) -> None:
    compute, naive = METHODS[method]
    x = make_inputs(n, d, vocab, seq_len=SEQ_LEN)

    def fwd_bwd() -> torch.Tensor:
        x.clear_grads()
        loss = compute(x)
        loss.backward()
        return loss.detach()

    with torch.no_grad():
        want = naive(x)
    got = fwd_bwd()  # also the warm-up call: first-touch allocations stay out of the timings
    assert torch.isclose(got, want, rtol=1e-5, atol=0), f"{method}: loss {got.item()} != naive {want.item()}"
    assert x.hidden.grad is not None and torch.isfinite(x.hidden.grad).all()

    benchmark.group = f"fwd+bwd N={n} d={d} V={vocab}"
    # torch's version and thread count decide CPU timings as much as the CPU does (the plugin records the CPU).
    benchmark.extra_info.update(n=n, d=d, vocab=vocab, dtype="float32", torch=torch.__version__,
                                torch_threads=torch.get_num_threads())
    benchmark(fwd_bwd)
