"""Shared test helpers for the fused ops: a seeded pairwise covering array of the option factors, input
builders, and the comparison rules of docs/DESIGN.md §3 (relative error in fp64/fp32, Cut Cross-Entropy's rule in
low precision)."""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import torch

from nitp_kernels import fused_nitp_loss

# (B, T, d, V): odd, not powers of two
SHAPES = [(1, 5, 9, 13), (3, 7, 6, 29), (2, 11, 15, 101)]

FACTORS = {
    "shape": [0, 1, 2],
    "ignore_frac": [0.0, 0.2, 1.0],
    "shift": [0, 1, 2],
    "loss_type": ["cosine", "mse", "smooth_l1", "kl"],
    "projector": [True, False],
    "stop_gradient": [True, False],
    "lm_bias": [True, False],
    "reduction": ["mean", "sum"],
    "label_smoothing": [0.0, 0.1],
    "z_loss_weight": [0.0, 1e-2],
    "softcap": [None, 5.0],
    "chunk": ["1", "7", "N"],
    "grad_scale": [1.0, 0.37],
}


def pairwise_cases(factors: dict, seed: int = 0, candidates: int = 60) -> list[dict]:
    """Greedy all-pairs covering array: every pair of values of every two factors appears in some case."""
    rng = random.Random(seed)
    names = list(factors)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
                 for va in range(len(factors[a])) for vb in range(len(factors[b]))}
    cases = []
    while uncovered:
        a, va, b, vb = min(uncovered)  # seed each case with an uncovered pair, fill the rest greedily
        best, best_gain = None, -1
        for _ in range(candidates):
            pick = {n: rng.randrange(len(factors[n])) for n in names}
            pick[a], pick[b] = va, vb
            gain = sum((x, pick[x], y, pick[y]) in uncovered for x, y in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = pick, gain
        uncovered -= {(x, best[x], y, best[y]) for x, y in itertools.combinations(names, 2)}
        cases.append({n: factors[n][i] for n, i in best.items()})
    return cases


@dataclass
class OpInputs:
    hidden: torch.Tensor
    lm_weight: torch.Tensor
    labels: torch.Tensor
    shallow: torch.Tensor
    projector: tuple | None
    lm_bias: torch.Tensor | None
    kwargs: dict = field(default_factory=dict)
    grad_scale: float = 1.0

    def leaves(self) -> list[torch.Tensor]:
        out = [self.hidden, self.lm_weight, self.shallow]
        if self.lm_bias is not None:
            out.append(self.lm_bias)
        if self.projector is not None:
            out.extend(self.projector)
        return out

    def cast(self, dtype: torch.dtype) -> "OpInputs":
        def c(t):
            return t.detach().to(dtype).requires_grad_(t.requires_grad)
        return OpInputs(c(self.hidden), c(self.lm_weight), self.labels, c(self.shallow),
                        None if self.projector is None else tuple(c(w) for w in self.projector),
                        None if self.lm_bias is None else c(self.lm_bias), dict(self.kwargs), self.grad_scale)


def make_inputs(case: dict, seed: int = 0) -> OpInputs:
    """fp64 leaf tensors for one case; hidden/shallow scaled so logits and cosines are in a realistic range."""
    gen = torch.Generator().manual_seed(seed)
    B, T, d, V = SHAPES[case["shape"]] if isinstance(case["shape"], int) else case["shape"]
    f64 = torch.float64

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=f64) * scale).requires_grad_(True)

    labels = torch.randint(0, V, (B, T), generator=gen)
    n_ignored = round(case["ignore_frac"] * B * T)
    if n_ignored:
        labels.view(-1)[torch.randperm(B * T, generator=gen)[:n_ignored]] = -100
    width = 2 * d + 1  # odd projector width: nothing relies on H = 4d
    projector = (randn(width, d, scale=d ** -0.5), randn(width, d, scale=d ** -0.5),
                 randn(d, width, scale=width ** -0.5)) if case["projector"] else None
    chunk = {"1": 1, "7": 7, "N": B * T}[case["chunk"]]
    kwargs = dict(shift=case["shift"], loss_type=case["loss_type"], stop_gradient=case["stop_gradient"],
                  reduction=case["reduction"], label_smoothing=case["label_smoothing"],
                  z_loss_weight=case["z_loss_weight"], softcap=case["softcap"], chunk_size=chunk,
                  nitp_weight=0.7)
    return OpInputs(randn(B, T, d), randn(V, d, scale=d ** -0.5), labels, randn(B, T, d), projector,
                    randn(V, scale=0.1) if case["lm_bias"] else None, kwargs, case["grad_scale"])


def run_op(inputs: OpInputs, backend: str) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Outputs (loss, ce, nitp, z, n_ce, n_nitp) and the gradients of grad_scale·loss for every leaf."""
    for t in inputs.leaves():
        t.grad = None
    out = fused_nitp_loss(inputs.hidden, inputs.lm_weight, inputs.labels, inputs.shallow, inputs.projector,
                          lm_bias=inputs.lm_bias, backend=backend, **inputs.kwargs)
    (out.loss * inputs.grad_scale).backward()
    grads = [None if t.grad is None else t.grad.detach().clone() for t in inputs.leaves()]
    return [t.detach().clone() for t in out[:6]], grads


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want| (absolute when want is all zero)."""
    diff = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = want.double().abs().max().item() if want.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_close_rel(got, want, tol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_err(got, want)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_low_precision_rule(got, ref_lowp, truth, what: str, slack: float = 1e-3) -> None:
    """Cut Cross-Entropy's convention: our max-abs error against the fp64 truth is at most the reference
    backend's own error in the same precision plus slack·max|truth|."""
    ours = (got.double() - truth.double()).abs().max().item()
    theirs = (ref_lowp.double() - truth.double()).abs().max().item()
    bound = theirs + slack * truth.double().abs().max().item()
    assert ours <= bound + 1e-12, f"{what}: error {ours:.3e} > reference's {theirs:.3e} + slack"


OUTPUT_NAMES = ["loss", "ce_loss", "nitp_loss", "z_loss"]


def case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


def leaf_names(inputs: OpInputs) -> list[str]:
    """Names of inputs.leaves(), in order."""
    names = ["hidden", "lm_weight", "shallow"]
    if inputs.lm_bias is not None:
        names.append("lm_bias")
    if inputs.projector is not None:
        names += ["w_gate", "w_up", "w_down"]
    return names


def check_against_reference(inputs: OpInputs, backend: str, tol: float) -> None:
    """Outputs, counts and every gradient of `backend` equal the reference's within relative error `tol`."""
    want_out, want_grads = run_op(inputs, "reference")
    got_out, got_grads = run_op(inputs, backend)
    for name, got, want in zip(OUTPUT_NAMES, got_out[:4], want_out[:4]):
        assert got.dtype == want.dtype
        assert_close_rel(got, want, tol, name)
    assert torch.equal(got_out[4], want_out[4]) and torch.equal(got_out[5], want_out[5]), "counts differ"
    for name, got, want in zip(leaf_names(inputs), got_grads, want_grads):
        assert (got is None) == (want is None), f"d{name}: one backend gives no gradient"
        if got is not None:
            assert got.dtype == want.dtype and torch.isfinite(got).all(), f"d{name}"
            assert_close_rel(got, want, tol, f"d{name}")


def check_low_precision(inputs: OpInputs, dtype: torch.dtype, backend: str) -> None:
    """docs/DESIGN.md's rule in `dtype` against the fp64 truth computed from exactly the rounded inputs.

    The gradients are formed in forward and stored in `dtype`; backward's scaling by a grad_output other than
    1 rounds them a second time (the scheme of Liger's FLCE). That one extra rounding, at most half an ulp
    (eps/2) of the largest value, is added to the slack; with grad_output 1 the plain rule holds.
    """
    lowp = inputs.cast(dtype)
    truth_out, truth_grads = run_op(lowp.cast(torch.float64), "reference")
    ref_out, ref_grads = run_op(lowp, "reference")
    got_out, got_grads = run_op(lowp, backend)
    for name, got, ref, truth in zip(OUTPUT_NAMES, got_out[:4], ref_out[:4], truth_out[:4]):
        assert got.dtype == torch.float32, f"{name} must be in the accumulation dtype"
        assert_low_precision_rule(got, ref, truth, name)
    slack = 1e-3 + (torch.finfo(dtype).eps / 2 if inputs.grad_scale != 1.0 else 0.0)
    for name, got, ref, truth in zip(leaf_names(lowp), got_grads, ref_grads, truth_grads):
        assert (got is None) == (truth is None)
        if got is not None:
            assert got.dtype == dtype, f"d{name} must be in its input's dtype"
            assert_low_precision_rule(got, ref, truth, f"d{name}", slack)
