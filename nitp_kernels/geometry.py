"""Representation geometry of token hidden states (paper Appendix D), in plain PyTorch.

    from nitp_kernels.geometry import effective_rank, average_cosine_similarity
    h = model_last_hidden_states.reshape(-1, d)         # (N tokens, d)
    effective_rank(h)                                   # 1 .. min(N - 1, d); high = spread out
    average_cosine_similarity(h)                        # -1 .. 1; high = anisotropic (one cone)

Under plain next-token prediction the paper sees the effective rank of the last hidden states
fall and their average cosine similarity rise (collapse into a narrow cone); NITP slows both.
Both functions take a (N, d) tensor (or (..., d), flattened to rows), work in float64 for
stability, never change any global random state and return Python floats.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["effective_rank", "average_cosine_similarity"]


def _rows(hidden: Tensor, name: str = "hidden") -> Tensor:
    """Validate and flatten (..., d) to (N, d) float64 rows."""
    if not isinstance(hidden, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() < 2:
        raise ValueError(f"{name} must have shape (N, d) or (..., d), got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got dtype {hidden.dtype}")
    rows = hidden.detach().reshape(-1, hidden.shape[-1])
    if rows.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows (token representations), got {rows.shape[0]}")
    if rows.shape[1] < 1:
        raise ValueError(f"{name} needs a feature dimension d >= 1, got shape {tuple(hidden.shape)}")
    return rows.to(torch.float64)


def effective_rank(hidden: Tensor) -> float:
    """Roy & Vetterli's effective rank of the rows of ``hidden`` after mean-centring.

    The eigenvalues of the rows' covariance are the squared singular values s_i² of the centred
    matrix (any normalisation of the covariance cancels); with p_i = s_i² / Σ s_j²,
    erank = exp(-Σ p_i log p_i) (0·log 0 = 0). It lies in [1, min(N - 1, d)]: 1 when the rows vary
    along one direction only, d for isotropic data with many rows. Returns 0.0 when the rows are
    all identical (no spread at all) and nan when ``hidden`` holds a non-finite value (a diverged
    run is reported, not raised on).
    """
    rows = _rows(hidden)
    if not bool(torch.isfinite(rows).all()):
        return math.nan
    centred = rows - rows.mean(dim=0, keepdim=True)
    energy = torch.linalg.svdvals(centred).square()
    total = energy.sum()
    if float(total) <= 0.0:
        return 0.0
    p = energy / total
    p = p[p > 0]  # 0·log 0 = 0
    return float(torch.exp(-(p * p.log()).sum()))


def average_cosine_similarity(hidden: Tensor, num_pairs: int | None = None,
                              generator: torch.Generator | None = None) -> float:
    """Mean cosine similarity of pairs of distinct rows of ``hidden`` (paper Appendix D).

    num_pairs=None: the exact mean over all ordered pairs (i, j), i != j, in O(N·d) through
    Σ_{i≠j} <u_i, u_j> = |Σ_i u_i|² - Σ_i |u_i|² with u_i = h_i / |h_i|. num_pairs=n: the paper's
    estimator, the mean over n pairs drawn uniformly (with replacement) among pairs of distinct
    indices, from ``generator`` (a CPU torch.Generator; None = a fresh unseeded one, so the global
    RNG is never touched). A zero row has cosine 0 with everything. nan on non-finite input.
    """
    rows = _rows(hidden)
    if num_pairs is not None and (isinstance(num_pairs, bool) or not isinstance(num_pairs, int)
                                  or num_pairs < 1):
        raise ValueError(f"num_pairs must be a positive int or None, got {num_pairs!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
    if not bool(torch.isfinite(rows).all()):
        return math.nan
    norms = rows.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, rows / norms.clamp_min(torch.finfo(rows.dtype).tiny), 0.0)
    n = rows.shape[0]
    if num_pairs is None:
        s = unit.sum(dim=0)
        return float((s.dot(s) - unit.square().sum()) / (n * (n - 1)))
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    i = torch.randint(0, n, (num_pairs,), generator=generator)
    j = torch.randint(0, n - 1, (num_pairs,), generator=generator)
    j = j + (j >= i).long()  # uniform over the n - 1 indices other than i
    i, j = i.to(rows.device), j.to(rows.device)
    return float((unit[i] * unit[j]).sum(dim=1).mean())
