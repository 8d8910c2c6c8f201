"""The torch backend against the reference backend over a pairwise covering array of every option factor,
in float64, float32 and bfloat16 (docs/DESIGN.md §3 tolerances), plus a full cross product of the NITP
factors in float64."""
import itertools

import pytest
import torch

from op_cases import (FACTORS, case_id, check_against_reference, check_low_precision, make_inputs,
                      pairwise_cases)

CASES = pairwise_cases(FACTORS)


def test_covering_array_covers_every_pair():
    for a, b in itertools.combinations(FACTORS, 2):
        seen = {(repr(c[a]), repr(c[b])) for c in CASES}
        assert len(seen) == len(FACTORS[a]) * len(FACTORS[b]), (a, b)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_backend_float64(case):
    check_against_reference(make_inputs(case), "torch", 1e-8)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_backend_float32(case):
    check_against_reference(make_inputs(case).cast(torch.float32), "torch", 1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_backend_bfloat16(case):
    check_low_precision(make_inputs(case), torch.bfloat16, "torch")


NITP_PRODUCT = list(itertools.product(["cosine", "mse", "smooth_l1", "kl"], [0, 1, 2], [True, False],
                                      [True, False], ["mean", "sum"]))


@pytest.mark.parametrize("loss_type,shift,projector,stop_gradient,reduction", NITP_PRODUCT)
def test_torch_backend_nitp_cross_product_float64(loss_type, shift, projector, stop_gradient, reduction):
    case = dict(shape=1, ignore_frac=0.2, shift=shift, loss_type=loss_type, projector=projector,
                stop_gradient=stop_gradient, lm_bias=False, reduction=reduction, label_smoothing=0.0,
                z_loss_weight=0.0, softcap=None, chunk="7", grad_scale=1.3)
    check_against_reference(make_inputs(case, seed=1), "torch", 1e-8)
