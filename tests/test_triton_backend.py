"""The "triton" backend of fused_nitp_loss and fused_linear_cross_entropy against backend="reference".

On CPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is slow,
so instead of the torch backend's full covering array this runs a smaller one over the same factors
(tests/op_cases.py): every value of every factor appears at least twice, and chunk_size=1 is left out (it only
multiplies kernel launches). fp32 must match the fp32 reference to 1e-5 relative; fp16 follows DESIGN.md's
low-precision rule (bf16 is left to the GPU check: under the interpreter bf16 matmuls are torch's anyway, and the
kernels' bf16 paths are unit-tested in test_triton_kernels.py).
"""
from __future__ import annotations

import collections

import pytest
import torch

from nitp_kernels import fused_linear_cross_entropy, fused_nitp_loss
from op_cases import FACTORS, assert_close_rel, assert_low_precision_rule, make_inputs, run_op

NAMES = ["loss", "ce_loss", "nitp_loss", "z_loss"]
TRITON_FACTORS = {**FACTORS, "chunk": ["7", "N"]}


def covering_cases(factors: dict, copies: int = 2) -> list[dict]:
    """copies x max(#values) cases; factor k takes value (i * m_k + k) mod #values in case i, with m_k in
    (1, 5, 7, 11), coprime to every factor's #values (2, 3 or 4), so each factor walks through all its values
    in every window of #values cases (every value at least `copies` times) while the factors' phases and
    strides differ, so values meet in varied combinations."""
    n_cases = copies * max(len(v) for v in factors.values())
    strides = (1, 5, 7, 11)
    return [{name: values[(i * strides[k % 4] + k) % len(values)] for k, (name, values) in enumerate(factors.items())}
            for i in range(n_cases)]


CASES = covering_cases(TRITON_FACTORS)


def _case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


def _leaf_names(inputs) -> list[str]:
    names = ["hidden", "lm_weight", "shallow"]
    if inputs.lm_bias is not None:
        names.append("lm_bias")
    if inputs.projector is not None:
        names += ["w_gate", "w_up", "w_down"]
    return names


def test_cases_cover_every_value_twice_without_chunk_one():
    for name, values in TRITON_FACTORS.items():
        seen = collections.Counter(repr(case[name]) for case in CASES)
        assert all(seen[repr(v)] >= 2 for v in values), (name, seen)
    assert all(case["chunk"] != "1" for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_backend_float32(case):
    inputs = make_inputs(case, seed=3).cast(torch.float32)
    want_out, want_grads = run_op(inputs, "reference")
    got_out, got_grads = run_op(inputs, "triton")
    for name, got, want in zip(NAMES, got_out[:4], want_out[:4]):
        assert got.dtype == torch.float32
        assert_close_rel(got, want, 1e-5, name)
    assert torch.equal(got_out[4], want_out[4]) and torch.equal(got_out[5], want_out[5]), "counts differ"
    for name, got, want in zip(_leaf_names(inputs), got_grads, want_grads):
        assert (got is None) == (want is None), f"d{name}: one backend gives no gradient"
        if got is not None:
            assert got.dtype == torch.float32 and torch.isfinite(got).all(), f"d{name}"
            assert_close_rel(got, want, 1e-5, f"d{name}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_backend_float16(case):
    truth_in = make_inputs(case, seed=4)
    lowp = truth_in.cast(torch.float16)
    truth_in = lowp.cast(torch.float64)  # the truth sees exactly the rounded inputs
    truth_out, truth_grads = run_op(truth_in, "reference")
    ref_out, ref_grads = run_op(lowp, "reference")
    got_out, got_grads = run_op(lowp, "triton")
    for name, got, ref, truth in zip(NAMES, got_out[:4], ref_out[:4], truth_out[:4]):
        assert got.dtype == torch.float32, f"{name} must be in the accumulation dtype"
        assert_low_precision_rule(got, ref, truth, name)
    # gradients are stored in fp16 in forward and scaled by grad_output in backward: one more rounding
    slack = 1e-3 + (2.0 ** -11 if case["grad_scale"] != 1.0 else 0.0)
    for name, got, ref, truth in zip(_leaf_names(lowp), got_grads, ref_grads, truth_grads):
        assert (got is None) == (truth is None)
        if got is not None:
            assert got.dtype == torch.float16, f"d{name} must be in its input's dtype"
            assert_low_precision_rule(got, ref, truth, f"d{name}", slack)


@pytest.mark.parametrize("options", [
    dict(reduction="mean", label_smoothing=0.1, softcap=5.0, chunk_size=4),
    dict(reduction="sum", z_loss_weight=1e-2, chunk_size=None, ignore_index=-7),
])
def test_triton_fused_linear_cross_entropy(options):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 5, 11, generator=gen, requires_grad=True)
    weight = (torch.randn(203, 11, generator=gen) / 3).requires_grad_()
    bias = (torch.randn(203, generator=gen) / 10).requires_grad_()
    labels = torch.randint(0, 203, (2, 5), generator=gen)
    labels[0, 2] = options.get("ignore_index", -100)
    results = []
    for backend in ("reference", "triton"):
        hidden.grad = weight.grad = bias.grad = None
        loss = fused_linear_cross_entropy(hidden, weight, labels, lm_bias=bias, backend=backend, **options)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()))
    for name, got, want in zip(("loss", "dhidden", "dlm_weight", "dlm_bias"), results[1], results[0]):
        assert_close_rel(got, want, 1e-5, name)


def test_triton_backend_is_bitwise_reproducible_and_refuses_float64():
    case = dict(CASES[1])
    inputs = make_inputs(case, seed=6).cast(torch.float32)
    first_out, first_grads = run_op(inputs, "triton")
    second_out, second_grads = run_op(inputs, "triton")
    assert all(torch.equal(a, b) for a, b in zip(first_out, second_out))
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(first_grads, second_grads))
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        fused_nitp_loss(x, torch.randn(7, 3, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.long), x, None,
                        backend="triton")
