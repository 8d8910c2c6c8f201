"""The "triton" backend of fused_nitp_loss and fused_linear_cross_entropy against backend="reference".

On CPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is slow,
so instead of the torch backend's full covering array this runs a smaller one over the same factors
(tests/op_cases.py): every value of every factor appears at least twice, and chunk_size=1 is left out (it only
multiplies kernel launches). fp32 must match the fp32 reference to 1e-5 relative; fp16 and bf16 follow docs/DESIGN.md's
low-precision rule (the kernels contain no tl.dot, so the interpreter's bf16 dot problem does not arise).
"""
from __future__ import annotations

import collections

import pytest
import torch

from nitp_kernels import fused_linear_cross_entropy, fused_nitp_loss
from op_cases import (FACTORS, assert_close_rel, case_id, check_against_reference, check_low_precision,
                      make_inputs, run_op)

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


def test_cases_cover_every_value_twice_without_chunk_one():
    for name, values in TRITON_FACTORS.items():
        seen = collections.Counter(repr(case[name]) for case in CASES)
        assert all(seen[repr(v)] >= 2 for v in values), (name, seen)
    assert all(case["chunk"] != "1" for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_backend_float32(case):
    check_against_reference(make_inputs(case, seed=3).cast(torch.float32), "triton", 1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_backend_float16(case):
    check_low_precision(make_inputs(case, seed=4), torch.float16, "triton")


# The kernels use no tl.dot (the matmuls of the chunk loop are torch's), so the interpreter's bf16 dot problem
# (triton #11584) does not arise: the bf16 kernel paths are checked end to end here too.
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_backend_bfloat16(case):
    check_low_precision(make_inputs(case, seed=7), torch.bfloat16, "triton")


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
