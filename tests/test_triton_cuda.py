"""The compiled "triton" backend on a CUDA GPU against backend="reference", in fp32 and bf16.

Skipped (with the reason) where no CUDA device exists; benchmarks/gpu_check.sh runs it on a GPU machine, with
pytest or, where the machine has no pytest, as `python3 tests/test_triton_cuda.py` (same tests, plain runner).
Unlike the interpreter tests, these run the kernels as compiled for the chip, bf16 included, at sizes that take
the large-vocabulary config (V > 8192) and several vocabulary blocks.

Tolerances (DESIGN.md section 3): fp32 relative error <= 1e-5 against the fp32 reference; bf16 per tensor
max-abs error against the fp64 truth <= that of the reference run in bf16 + 1e-3 * max|truth|.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nitp_kernels import fused_linear_cross_entropy, fused_nitp_loss  # noqa: E402
from nitp_kernels.api import resolve_backend  # noqa: E402

try:
    import pytest

    pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                    reason="needs a CUDA GPU with compiled Triton (not the interpreter); "
                                           "benchmarks/gpu_check.sh runs it on a GPU machine")
except ImportError:  # the GPU machine may have no pytest: see the runner at the bottom
    pytest = None

# (loss_type, options): every loss type and every option of the op appears at least once, with both reductions
CASES = [
    ("cosine", dict(reduction="mean", stop_gradient=True)),
    ("mse", dict(reduction="sum", stop_gradient=False, label_smoothing=0.1, softcap=30.0)),
    ("smooth_l1", dict(reduction="mean", stop_gradient=False, z_loss_weight=1e-3, shift=2, chunk_size=48)),
    ("kl", dict(reduction="sum", stop_gradient=True, label_smoothing=0.05, z_loss_weight=1e-4, softcap=15.0,
                projector=None)),
]
BATCH, SEQ, DIM, VOCAB = 2, 80, 96, 10007  # N=160 rows, d not a power of 2, V > 8192 (the 4096-lane config)
DEVICE = "cuda"
LOW_PRECISION = torch.bfloat16  # compiled bf16 dots and loads: what the interpreter cannot check


def make_inputs(dtype: torch.dtype, seed: int, with_projector: bool = True, bias: bool = True) -> dict:
    """Leaf tensors on CUDA in `dtype`, generated in fp64 on the CPU so every dtype sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    cast = {"device": DEVICE, "dtype": dtype}
    hidden = torch.randn(BATCH, SEQ, DIM, generator=gen, dtype=torch.float64)
    inputs = {
        "hidden": hidden,
        "shallow": torch.randn(BATCH, SEQ, DIM, generator=gen, dtype=torch.float64),
        "lm_weight": torch.randn(VOCAB, DIM, generator=gen, dtype=torch.float64) / DIM ** 0.5,
        "lm_bias": 0.1 * torch.randn(VOCAB, generator=gen, dtype=torch.float64) if bias else None,
    }
    if with_projector:
        width = 4 * DIM
        inputs["w_gate"] = torch.randn(width, DIM, generator=gen, dtype=torch.float64) / DIM ** 0.5
        inputs["w_up"] = torch.randn(width, DIM, generator=gen, dtype=torch.float64) / DIM ** 0.5
        inputs["w_down"] = torch.randn(DIM, width, generator=gen, dtype=torch.float64) / width ** 0.5
    inputs = {k: None if v is None else v.to(**cast).requires_grad_() for k, v in inputs.items()}
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels[0, ::7] = -100
    inputs["labels"] = labels.to(DEVICE)
    return inputs


def run(inputs: dict, backend: str, loss_type: str, options: dict) -> tuple[list, dict]:
    """Loss terms and gradients of every leaf, for one backend."""
    options = dict(options)
    use_projector = options.pop("projector", True) is not None and "w_gate" in inputs
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    for leaf in leaves.values():
        leaf.grad = None
    projector = (inputs["w_gate"], inputs["w_up"], inputs["w_down"]) if use_projector else None
    out = fused_nitp_loss(inputs["hidden"], inputs["lm_weight"], inputs["labels"], inputs["shallow"], projector,
                          loss_type=loss_type, lm_bias=inputs["lm_bias"], backend=backend, **options)
    out.loss.backward()
    grads = {k: None if v.grad is None else v.grad.clone() for k, v in leaves.items()}
    return [out.loss.detach(), out.ce_loss, out.nitp_loss, out.z_loss], grads


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def test_auto_picks_triton_on_cuda():
    assert resolve_backend("auto", torch.zeros(1, device=DEVICE)) == ("triton" if DEVICE == "cuda" else "torch")


def test_triton_matches_reference_fp32():
    for seed, (loss_type, options) in enumerate(CASES):
        inputs = make_inputs(torch.float32, seed, with_projector=options.get("projector", True) is not None)
        want_terms, want_grads = run(inputs, "reference", loss_type, options)
        got_terms, got_grads = run(inputs, "triton", loss_type, options)
        for i, (got, want) in enumerate(zip(got_terms, want_terms)):
            assert max_err(got, want) <= 1e-5 * max(want.abs().item(), 1e-6), (loss_type, "term", i)
        for name, want in want_grads.items():
            got = got_grads[name]
            assert (got is None) == (want is None), (loss_type, name)
            if want is not None:
                bound = 1e-5 * max(want.abs().max().item(), 1e-12)
                assert max_err(got, want) <= bound, (loss_type, name, max_err(got, want), bound)


def test_triton_matches_reference_bf16_by_the_low_precision_rule():
    for seed, (loss_type, options) in enumerate(CASES):
        with_projector = options.get("projector", True) is not None
        low = make_inputs(LOW_PRECISION, seed, with_projector)
        # the fp64 truth sees exactly the bf16-rounded inputs
        truth_in = {k: v if not isinstance(v, torch.Tensor) or not v.is_floating_point()
                    else v.detach().double().requires_grad_() for k, v in low.items()}
        truth_terms, truth_grads = run(truth_in, "reference", loss_type, options)
        ref_terms, ref_grads = run(low, "reference", loss_type, options)
        got_terms, got_grads = run(low, "triton", loss_type, options)
        pairs = [(f"term{i}", g, r, t) for i, (g, r, t) in enumerate(zip(got_terms, ref_terms, truth_terms))]
        pairs += [(name, got_grads[name], ref_grads[name], truth) for name, truth in truth_grads.items()]
        for name, got, ref, truth in pairs:
            assert (got is None) == (truth is None), (loss_type, name)
            if truth is None:
                continue
            assert torch.isfinite(got).all(), (loss_type, name)
            bound = max_err(ref, truth) + 1e-3 * truth.abs().max().item()
            assert max_err(got, truth) <= bound, (loss_type, name, max_err(got, truth), bound)


def test_triton_fused_linear_cross_entropy_and_determinism():
    inputs = make_inputs(torch.float32, 11, with_projector=False)
    h, w, b, labels = inputs["hidden"], inputs["lm_weight"], inputs["lm_bias"], inputs["labels"]
    results = {}
    for backend in ("reference", "triton", "triton"):
        h.grad = w.grad = b.grad = None
        loss = fused_linear_cross_entropy(h, w, labels, lm_bias=b, label_smoothing=0.1, z_loss_weight=1e-3,
                                          softcap=20.0, chunk_size=64, backend=backend)
        loss.backward()
        current = [loss.detach(), h.grad.clone(), w.grad.clone(), b.grad.clone()]
        if backend in results:  # the second triton run: bitwise the same (no atomics across programs)
            assert all(torch.equal(x, y) for x, y in zip(current, results[backend]))
        results[backend] = current
    for got, want in zip(results["triton"], results["reference"]):
        assert max_err(got, want) <= 1e-5 * max(want.abs().max().item(), 1e-12)


def _main() -> int:
    """Plain runner for machines without pytest: prints pytest's closing-line format."""
    if not torch.cuda.is_available():
        print("0 passed, 0 failed, 4 skipped (no CUDA)")
        return 0
    passed = failed = 0
    for name, fn in sorted(globals().items()):
        if name.startswith("test_") and callable(fn):
            try:
                fn()
                passed += 1
                print(f"PASSED {name}", flush=True)
            except Exception as err:  # report every test, then fail the run
                failed += 1
                print(f"FAILED {name}: {type(err).__name__}: {err}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
