"""The compiled "triton" backend on a CUDA GPU against backend="reference" and an fp64 truth.

Every test here carries the `cuda` marker and is skipped (with the reason) where no CUDA device exists;
benchmarks/gpu_check.sh runs `pytest -m cuda tests/` on a GPU machine, so any test marked `cuda` in any file runs
there. Unlike the interpreter tests, these run the kernels as compiled for the chip, bf16 included: at small
awkward sizes that take the large-vocabulary config (V > 8192), at the paper's real shape (N=2048 rows of d=1280,
V=152064), and with an out-of-range label, which must fail with an error naming `labels` and read nothing out of
bounds.

Tolerances (DESIGN.md section 3): fp32 relative error <= 1e-5 against the fp32 reference; bf16 per tensor
max-abs error against the fp64 truth <= that of the reference run in bf16 + 1e-3 * max|truth|.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nitp_kernels import fused_linear_cross_entropy, fused_nitp_loss
from nitp_kernels.api import resolve_backend

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="needs a CUDA GPU with compiled Triton (not the interpreter); "
                                        "benchmarks/gpu_check.sh runs it on a GPU machine")]

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


# The paper's LM head: 2048 rows (two sequences of 1024) of width 1280 against a 152064-token vocabulary
REAL_ROWS, REAL_SEQ, REAL_DIM, REAL_VOCAB = 2048, 1024, 1280, 152064


def _real_shape_inputs() -> tuple[dict, torch.Tensor]:
    """bf16 leaves at the paper's shape (drawn on the GPU: a V x d weight drawn on the CPU takes seconds)."""
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    d, width = REAL_DIM, 4 * REAL_DIM

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen, device=DEVICE)).to(torch.bfloat16)

    tensors = {"hidden": randn(REAL_ROWS, d), "shallow": randn(REAL_ROWS, d),
               "lm_weight": randn(REAL_VOCAB, d, scale=d ** -0.5), "w_gate": randn(width, d, scale=d ** -0.5),
               "w_up": randn(width, d, scale=d ** -0.5), "w_down": randn(d, width, scale=width ** -0.5)}
    labels = torch.randint(0, REAL_VOCAB, (REAL_ROWS,), generator=gen, device=DEVICE)
    labels[::97] = -100
    return tensors, labels


def _run_real(tensors: dict, labels: torch.Tensor, backend: str, with_nitp: bool,
              dtype: torch.dtype) -> tuple[list, dict]:
    """Loss terms and gradients of hidden, lm_weight (and the projector) with the tensors cast to `dtype`."""
    leaves = {k: v.detach().to(dtype).requires_grad_(k != "shallow") for k, v in tensors.items()}
    if with_nitp:
        out = fused_nitp_loss(leaves["hidden"], leaves["lm_weight"], labels, leaves["shallow"],
                              (leaves["w_gate"], leaves["w_up"], leaves["w_down"]), seq_len=REAL_SEQ,
                              backend=backend)
        out.loss.backward()
        terms = [out.loss.detach(), out.ce_loss, out.nitp_loss]
    else:
        loss = fused_linear_cross_entropy(leaves["hidden"], leaves["lm_weight"], labels, backend=backend)
        loss.backward()
        terms = [loss.detach()]
    return terms, {k: v.grad for k, v in leaves.items() if v.grad is not None}


@pytest.mark.parametrize("with_nitp", [True, False], ids=["fused_nitp_loss", "fused_linear_cross_entropy"])
def test_paper_shape_bf16_against_fp64_truth(with_nitp):
    """N=2048, d=1280, V=152064 in bf16 with the default chunking: every loss term and gradient within the
    low-precision rule of the fp64 truth (computed by the reference backend on exactly the bf16 values)."""
    tensors, labels = _real_shape_inputs()
    truth_terms, truth_grads = _run_real(tensors, labels, "reference", with_nitp, torch.float64)
    ref_terms, ref_grads = _run_real(tensors, labels, "reference", with_nitp, torch.bfloat16)
    got_terms, got_grads = _run_real(tensors, labels, "triton", with_nitp, torch.bfloat16)
    assert sorted(got_grads) == sorted(truth_grads)
    pairs = [(f"term{i}", g, r, t) for i, (g, r, t) in enumerate(zip(got_terms, ref_terms, truth_terms))]
    pairs += [(name, got_grads[name], ref_grads[name], truth) for name, truth in truth_grads.items()]
    for name, got, ref, truth in pairs:
        assert torch.isfinite(got).all(), name
        bound = max_err(ref, truth) + 1e-3 * truth.abs().max().item()
        assert max_err(got, truth) <= bound, (name, max_err(got, truth), bound)


# Run in a fresh process: a device-side assert leaves the CUDA context unusable. The script's own names avoid
# the word the test looks for, and only exception messages are printed (no traceback, whose source lines
# would mention it): "labels" must come from the library's error.
OUT_OF_RANGE_SCRIPT = """
import sys, torch
from nitp_kernels import NITPProjector, fused_nitp_loss
bad_value, n, d, vocab = int(sys.argv[1]), 256, 64, 10007
gen = torch.Generator(device="cuda").manual_seed(0)
hidden = torch.randn(n, d, device="cuda", generator=gen, requires_grad=True)
shallow = torch.randn(n, d, device="cuda", generator=gen)
weight = (torch.randn(vocab, d, device="cuda", generator=gen) / d ** 0.5).requires_grad_()
targets = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
targets[5] = bad_value
try:
    out = fused_nitp_loss(hidden, weight, targets, shallow, NITPProjector(d, device="cuda"), seq_len=128)
    out.loss.backward()
    torch.cuda.synchronize()
except Exception as err:
    print("RAISED", type(err).__name__, str(err), flush=True)
    sys.exit(3)
print("NO ERROR RAISED", flush=True)
"""


def test_out_of_range_label_raises_naming_labels_without_reading_out_of_bounds():
    """A label neither in [0, V) nor ignore_index (just past the end, negative, far out) fails the call with an
    error that names `labels`, without NITP_KERNELS_DEBUG. 2**40 would fault if the kernel read logits at it:
    no 'illegal memory access' may appear, only the library's own error."""
    env = {k: v for k, v in os.environ.items() if k != "NITP_KERNELS_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    runs = {bad: subprocess.Popen([sys.executable, "-c", OUT_OF_RANGE_SCRIPT, str(bad)], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for bad in (10007, -7, 2 ** 40)}  # three at once: each pays CUDA's start-up
    for bad, proc in runs.items():
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode != 0 and "NO ERROR RAISED" not in out, (bad, out[-3000:])
        assert "labels" in out, (bad, out[-3000:])
        assert "illegal memory access" not in out, (bad, out[-3000:])
