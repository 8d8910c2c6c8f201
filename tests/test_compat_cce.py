"""nitp_kernels.compat.cce against Cut Cross-Entropy's own loss tests, re-created (our code, their cases).

Cases, grids and tolerances from apple/ml-cross-entropy tests/test_cce_loss_forward.py (commit cc5b0ab) and
tests/test_cce_loss_backward.py (commit 28c48e0): shapes (N, V, D) in {(256, 512, 128), (252, 507, 128),
(252, 507, 123)}, e of shape (4, N/4, D), the first min(N, V)/2 rows of c set equal to rows of e (large logits),
20% of the targets ignored or none, softcap None or 20, bias or not; forward: shift 0 or 2, fp32/fp16/bf16 with
error tolerances 1e-5/1e-3/1e-2; backward: shift False/True, reduction none/mean/sum, bf16 with 1e-2. Their rule:
our error against an fp32 computation on the same inputs is at most the error of the plain torch computation in
the input's dtype plus the tolerance, elementwise. They run on CUDA; these run on the CPU (backend "auto" -> "torch").
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from nitp_kernels.compat.cce import LinearCrossEntropy, linear_cross_entropy

IGNORE = -100
SHAPES = [(256, 512, 128), (252, 507, 128), (252, 507, 123)]


def _inputs(shape, dtype, has_bias, invalids, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, vocab, dim = shape
    e = (torch.randn((n, dim), generator=gen) / dim ** 0.5).to(dtype)
    c = torch.randn((vocab, dim), generator=gen).to(dtype)
    c[: min(n, vocab) // 2] = e[: min(n, vocab) // 2]
    bias = (torch.randn(vocab, generator=gen) * 0.02).to(dtype) if has_bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    if invalids:
        targets[torch.randperm(n, generator=gen)[: int(0.2 * n)]] = IGNORE
    e = e.view(4, -1, dim)
    return e, c, bias, targets.view(e.shape[:-1])


def _plain(e, c, targets, bias, softcap, shift, reduction):
    """The computation CCE's tests take as ground truth (in fp32) and as the reference (in the input's dtype)."""
    if shift:
        e, targets = e[:, :-shift], targets[:, shift:]
    logits = e.flatten(0, -2) @ c.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits.float(), targets.flatten(), ignore_index=IGNORE, reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


FORWARD = list(itertools.product(
    ["cce", "torch_compile"], [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)],
    [None, 20.0], [True, False], [0, 2], [False, True], SHAPES))


@pytest.mark.parametrize("impl,dtype_tol,softcap,has_bias,shift,invalids,shape", FORWARD)
def test_loss_forward(impl, dtype_tol, softcap, has_bias, shift, invalids, shape):
    dtype, tol = dtype_tol
    e, c, bias, targets = _inputs(shape, dtype, has_bias, invalids)
    truth = _plain(e.float(), c.float(), targets, None if bias is None else bias.float(), softcap, shift, "none")
    ref = _plain(e, c, targets, bias, softcap, shift, "none")
    ours = linear_cross_entropy(e, c, targets, bias=bias, softcap=softcap, shift=shift, reduction="none",
                                impl=impl)
    assert ours.shape == truth.shape
    excess = ((truth - ours).abs() - ((truth - ref).abs() + tol)).max()
    assert excess <= 0, f"error exceeds the reference's + {tol} by {excess:.3e}"


def _grads(e, c, bias, loss_fn, reduction, n_valid):
    leaves = [e, c] + ([bias] if bias is not None else [])
    loss = loss_fn()
    if reduction == "sum":
        loss = loss / n_valid
    return torch.autograd.grad(loss.mean(), leaves)


BACKWARD = list(itertools.product(
    ["cce_exact"], [(torch.bfloat16, 1e-2)], [None, 20.0], [False, True], [False, True], [False, True],
    ["none", "mean", "sum"], SHAPES))


@pytest.mark.parametrize("impl,dtype_tol,softcap,has_bias,shift,invalids,reduction,shape", BACKWARD)
def test_loss_backward(impl, dtype_tol, softcap, has_bias, shift, invalids, reduction, shape):
    dtype, tol = dtype_tol
    e, c, bias, targets = _inputs(shape, dtype, has_bias, invalids)
    e.requires_grad_(True)
    c.requires_grad_(True)
    if bias is not None:
        bias.requires_grad_(True)
    n_valid = (targets[:, int(shift):] != IGNORE).count_nonzero()
    truth = _grads(e, c, bias, lambda: _plain(e.float(), c.float(), targets,
                                              None if bias is None else bias.float(), softcap, int(shift),
                                              reduction), reduction, n_valid)
    ref = _grads(e, c, bias, lambda: _plain(e, c, targets, bias, softcap, int(shift), reduction), reduction,
                 n_valid)
    ours = _grads(e, c, bias, lambda: linear_cross_entropy(e, c, targets, bias=bias, softcap=softcap, shift=shift,
                                                           reduction=reduction, impl=impl), reduction, n_valid)
    for name, t, r, o in zip(("e", "c", "bias"), truth, ref, ours):
        assert o.dtype == dtype
        excess = ((t - o).abs().float() - ((t - r).abs().float() + tol)).max()
        assert excess <= 0, f"d{name}: error exceeds the reference's + {tol} by {excess:.3e}"


@pytest.mark.parametrize("compute_de,compute_dc,compute_dbias",
                         [(True, False, True), (False, True, False), (False, False, True)])
def test_loss_partials(compute_de, compute_dc, compute_dbias):
    e, c, bias, targets = _inputs((256, 512, 128), torch.bfloat16, True, False)
    bias = bias * 0.5
    e.requires_grad_(compute_de)
    c.requires_grad_(compute_dc)
    bias.requires_grad_(compute_dbias)
    linear_cross_entropy(e, c, targets, bias=bias, reduction="mean").backward()
    assert (e.grad is not None) == compute_de
    assert (c.grad is not None) == compute_dc
    assert (bias.grad is not None) == compute_dbias


def test_return_lse_and_shifted_mean():
    e, c, bias, targets = _inputs((252, 507, 123), torch.float64, True, True)
    e.requires_grad_(True)
    loss, lse = linear_cross_entropy(e, c, targets, bias=bias, shift=1, softcap=20.0, return_lse=True)
    capped = 20.0 * torch.tanh((e[:, :-1] @ c.T + bias) / 20.0)
    want = F.cross_entropy(capped.flatten(0, 1), targets[:, 1:].flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(capped, -1).detach())
    got, = torch.autograd.grad(loss, e)
    ref, = torch.autograd.grad(want, e)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs,message", [
    (dict(filter_eps=1e-4), "filter_eps must be one of"),
    (dict(impl="triton_magic"), "impl must be one of"),
    (dict(vocab_parallel_options=object()), "vocab_parallel_options"),
    (dict(shift=9), r"shift must be a bool or an int in \[0, 9\)"),
    (dict(shift=-1), "shift must be"),
    (dict(accum_e_fp32=1), "accum_e_fp32 must be a bool"),
    (dict(reduction="avg"), "reduction must be"),
])
def test_options_we_do_not_implement_are_refused_by_name(kwargs, message):
    e, c, targets = torch.randn(2, 9, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 9))
    with pytest.raises((ValueError, TypeError), match=message):
        linear_cross_entropy(e, c, targets, **kwargs)


def test_old_positional_order_is_refused_not_taken_as_bias():
    e, c, targets = torch.randn(2, 9, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 9))
    with pytest.raises(TypeError, match="bias must be None or a"):
        linear_cross_entropy(e, c, targets, -100)
    for preset in (None, "auto", "high"):  # CCE's defaults are accepted: exact gradients are computed
        linear_cross_entropy(e, c, targets, filter_eps=preset)


def test_module_form_equals_the_function():
    e, c, bias, targets = _inputs((252, 507, 123), torch.float32, True, True)
    module = LinearCrossEntropy(softcap=20.0, reduction="sum", shift=2)
    torch.testing.assert_close(module(e, c, targets, bias), _plain(e, c, targets, bias, 20.0, 2, "sum"))
    with pytest.raises(ValueError, match="filter_eps must be one of"):
        LinearCrossEntropy(filter_eps=0.1)
