"""nitp_kernels.geometry: effective rank of constructed spectra, cosine of constructed vectors,
bad input refused. Expected values are computed by hand / numpy, not by the code under test."""

import math

import numpy as np
import pytest
import torch

from nitp_kernels.geometry import average_cosine_similarity, effective_rank


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_isotropic_gaussian_has_rank_close_to_d():
    d = 16
    h = torch.randn(20000, d, generator=_gen(1))
    assert effective_rank(h) == pytest.approx(d, rel=0.01)


def test_rank_r_data_has_rank_close_to_r():
    # 6 orthonormal directions with equal variance inside a 32-dim space, plus an offset (centring).
    q, _ = torch.linalg.qr(torch.randn(32, 6, generator=_gen(2), dtype=torch.float64))
    coeffs = torch.randn(20000, 6, generator=_gen(3), dtype=torch.float64)
    h = coeffs @ q.T + 5.0
    assert effective_rank(h.float()) == pytest.approx(6.0, rel=0.01)


def test_one_direction_has_rank_one():
    direction = torch.randn(24, generator=_gen(4))
    h = torch.randn(500, 1, generator=_gen(5)) * direction + torch.randn(24, generator=_gen(6))
    assert effective_rank(h) == pytest.approx(1.0, abs=1e-6)


def test_known_spectrum_matches_entropy_formula():
    # Centred rows along the axes with variances 4, 1, 1 -> p = (2/3, 1/6, 1/6).
    scales = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    signs = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    h = signs * scales  # columns are orthogonal with zero mean
    p = np.array([4.0, 1.0, 1.0]) / 6.0
    expected = math.exp(-(p * np.log(p)).sum())
    assert effective_rank(h) == pytest.approx(expected, rel=1e-12)


def test_identical_rows_rank_zero_and_nan_on_nonfinite():
    assert effective_rank(torch.ones(10, 4)) == 0.0
    bad = torch.randn(10, 4)
    bad[3, 1] = float("nan")
    assert math.isnan(effective_rank(bad))
    assert math.isnan(average_cosine_similarity(bad))


def test_batched_input_is_flattened_to_rows():
    h = torch.randn(4, 50, 8, generator=_gen(7))
    assert effective_rank(h) == pytest.approx(effective_rank(h.reshape(200, 8)), rel=1e-12)
    assert average_cosine_similarity(h) == pytest.approx(average_cosine_similarity(h.reshape(200, 8)))


def test_cosine_identical_orthogonal_antipodal():
    v = torch.tensor([3.0, -1.0, 2.0])
    assert average_cosine_similarity(v.repeat(7, 1)) == pytest.approx(1.0)
    assert average_cosine_similarity(torch.eye(5) * 3.0) == pytest.approx(0.0, abs=1e-12)
    assert average_cosine_similarity(torch.stack([v, -2.0 * v])) == pytest.approx(-1.0)
    # Sampled pairs hit the same exact values.
    assert average_cosine_similarity(torch.eye(5), num_pairs=100, generator=_gen()) == pytest.approx(0.0)
    assert average_cosine_similarity(torch.stack([v, -v]), 50, _gen()) == pytest.approx(-1.0)


def test_cosine_known_average():
    # Rows e1, e1, e2: ordered distinct pairs (6): cos(e1,e1)=1 twice, the other 4 are 0 -> 1/3.
    h = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    assert average_cosine_similarity(h) == pytest.approx(1.0 / 3.0)
    # Zero row: cosine 0 with everything: rows e1, e1, 0 -> 2 of 6 pairs are 1 -> 1/3.
    h0 = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 0.0]])
    assert average_cosine_similarity(h0) == pytest.approx(1.0 / 3.0)


def test_sampled_estimate_matches_exact_mean_against_numpy():
    h = torch.randn(300, 12, generator=_gen(8)) + 0.7  # positive mean: cosine clearly > 0
    x = h.double().numpy()
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    g = u @ u.T
    exact = (g.sum() - np.trace(g)) / (300 * 299)
    assert average_cosine_similarity(h) == pytest.approx(exact, rel=1e-10)
    sampled = average_cosine_similarity(h, num_pairs=20000, generator=_gen(9))
    assert sampled == pytest.approx(exact, abs=0.01)
    # Same generator seed -> same pairs; the global RNG is untouched.
    state = torch.get_rng_state()
    assert average_cosine_similarity(h, 64, _gen(3)) == average_cosine_similarity(h, 64, _gen(3))
    assert torch.equal(state, torch.get_rng_state())


def test_sampled_pairs_are_distinct_rows():
    # Two antipodal rows: any pair of distinct rows has cosine -1; a pair (i, i) would give +1.
    h = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    assert average_cosine_similarity(h, num_pairs=1000, generator=_gen(1)) == pytest.approx(-1.0)


@pytest.mark.parametrize("fn", [effective_rank, average_cosine_similarity])
def test_bad_input_refused(fn):
    with pytest.raises(TypeError, match="hidden"):
        fn(np.ones((4, 3)))
    with pytest.raises(TypeError, match="hidden"):
        fn(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="hidden"):
        fn(torch.ones(5))
    with pytest.raises(ValueError, match="hidden"):
        fn(torch.ones(1, 5))


def test_bad_pairs_and_generator_refused():
    h = torch.randn(6, 3)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_pairs"):
            average_cosine_similarity(h, num_pairs=bad)
    with pytest.raises(TypeError, match="generator"):
        average_cosine_similarity(h, 10, generator=0)
