"""nitp_kernels.compat.liger against Liger-Kernel's own fused linear cross-entropy tests, re-created (our code,
their cases).

Cases, grids and tolerances from linkedin/Liger-Kernel test/transformers/test_fused_linear_cross_entropy.py
(commit ead96b6): test_correctness and its forward-only twin (shapes (8, 128, 1024, 4096) and (4, 47, 31, 123);
mean/sum in bf16/fp32 with their atol/rtol; bias or not; the default options, and the non-default set
label_smoothing 0.1, ignore_index 42, lse_square_scale 1e-4, softcap 30, return_z_loss, accum_dtype fp32),
test_correctness_functional, test_correctness_with_token_accuracy, test_amp, the structured-output test and the
reduction="none" per-token upstream-gradient test. Their ground truth is a torch nn.Linear + cross-entropy
(+ z-loss) module; ours below is written from the same formulas. They run on CUDA; these run on the CPU.
Where they differ: the large shape runs for the fp32 rows only, and test_amp's for bf16 autocast with
accum_dtype fp32 only (CPU time); their cases that combine ce_weight, label_smoothing and softcap (refused
here) run once without each of the three instead.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from nitp_kernels.compat.liger import (CrossEntropyOutput, LigerFusedLinearCrossEntropyLoss,
                                       liger_fused_linear_cross_entropy)

SMALL, LARGE = (4, 47, 31, 123), (8, 128, 1024, 4096)
PRECISIONS = [("mean", torch.bfloat16, 5e-3, 5e-2), ("mean", torch.float32, 1e-5, 5e-4),
              ("sum", torch.bfloat16, 5e-0, 5e1), ("sum", torch.float32, 1e-3, 5e-2)]
# (ce_weight, label_smoothing, ignore_index, lse_square_scale, softcap, return_z_loss, accum_dtype)
# Liger's non-default set combines ce_weight, label_smoothing and softcap, which this package refuses (tested in
# test_class_weights.py; any two of the three are accepted): it runs once without each of them instead
OPTION_SETS = [(False, 0.0, -100, 0.0, None, False, None), (False, 0.1, 42, 1e-4, 30.0, True, torch.float32),
               (True, 0.0, 42, 1e-4, 30.0, True, torch.float32), (True, 0.1, 42, 1e-4, None, True, torch.float32)]


def torch_lm_head_ce(x, weight, bias, target, *, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
                     label_smoothing=0.0, reduction="mean", softcap=None):
    """(loss, z_loss) the plain way: fp32 logits, softcap, F.cross_entropy, z = scale·lse² over labelled rows."""
    logits = F.linear(x, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, target, weight=ce_weight, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)
    valid = target != ignore_index
    z_rows = torch.where(valid, lse_square_scale * torch.logsumexp(logits, -1) ** 2, 0.0)
    z = {"mean": z_rows.sum() / valid.sum(), "sum": z_rows.sum(), "none": z_rows}[reduction]
    return loss + z, z


def _case_inputs(shape, dtype, bias, ignore_index, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, T, H, V = shape
    weight = torch.rand(V, H, generator=gen).to(dtype)
    lin_bias = torch.rand(V, generator=gen).to(dtype) if bias else None
    x = torch.randn(B * T, H, generator=gen).to(dtype)
    target = torch.randint(0, V, (B * T,), generator=gen)
    n_ignored = int(torch.randint(1, B * T // 2, (1,), generator=gen))
    target[torch.randperm(B * T, generator=gen)[:n_ignored]] = ignore_index
    return x, weight, lin_bias, target


def _close(got, want, atol, rtol, what):
    assert torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol), \
        f"{what}: max abs diff {(got.float() - want.float()).abs().max():.3e}"


CORRECTNESS = [(shape, *prec, bias, opts) for shape, prec, bias, opts
               in itertools.product([SMALL, LARGE], PRECISIONS, [True, False], OPTION_SETS)
               if shape == SMALL or prec[:2] == ("mean", torch.float32)]


@pytest.mark.parametrize("forward_only", [False, True])
@pytest.mark.parametrize("shape,reduction,dtype,atol,rtol,bias,options", CORRECTNESS)
def test_correctness(shape, reduction, dtype, atol, rtol, bias, options, forward_only):
    has_ce_weight, label_smoothing, ignore_index, lse_square_scale, softcap, return_z_loss, accum_dtype = options
    x, weight, lin_bias, target = _case_inputs(shape, dtype, bias, ignore_index)
    ce_weight = torch.rand(shape[3], generator=torch.Generator().manual_seed(5)) if has_ce_weight else None
    kwargs = dict(ce_weight=ce_weight, ignore_index=ignore_index, lse_square_scale=lse_square_scale, label_smoothing=label_smoothing,
                  reduction=reduction, softcap=softcap)
    leaves = [x, weight] + ([lin_bias] if bias else [])
    for t in leaves:
        t.requires_grad_(not forward_only)
    want, want_z = torch_lm_head_ce(x, weight, lin_bias, target, **kwargs)
    module = LigerFusedLinearCrossEntropyLoss(return_z_loss=return_z_loss, accum_dtype=accum_dtype, **kwargs)
    with torch.no_grad() if forward_only else torch.enable_grad():
        result = module(weight, x, target, lin_bias)
    if return_z_loss:
        assert isinstance(result, CrossEntropyOutput)
        _close(result.z_loss, want_z, atol, rtol, "z_loss")
        result = result.loss
    _close(result, want, atol, rtol, "loss")
    if forward_only:
        return
    got_grads = torch.autograd.grad(result, leaves)
    want_grads = torch.autograd.grad(want, leaves)
    for name, g, w in zip(("input", "weight", "bias"), got_grads, want_grads):
        _close(g, w, atol, rtol, f"d {name}")


@pytest.mark.parametrize("shape", [(2, 2, 8, 8), (9, 7, 41, 41)])
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.bfloat16, 5e-3, 5e-2), (torch.float32, 1e-5, 5e-4)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("has_ce_weight", [True, False])
def test_correctness_functional(shape, dtype, atol, rtol, bias, has_ce_weight):
    """Liger's functional form against its module form and against torch, with Liger's non-default options
    (with ce_weight softcap is off: this package does not combine class weights, smoothing and softcap)."""
    B, T, H, V = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B * T, H, generator=gen).to(dtype).requires_grad_()
    target = torch.randint(0, V, (B * T,), generator=gen)
    weight = torch.randn(V, H, generator=gen).to(dtype)
    lin_bias = torch.randn(V, generator=gen).to(dtype) if bias else None
    ce_weight = torch.randn(V, generator=gen) if has_ce_weight else None  # Liger's: signed weights
    softcap = None if has_ce_weight else 30.0
    options = (-100, 1e-4, 0.1, "mean", softcap, True, torch.float32)
    result = liger_fused_linear_cross_entropy(x, weight, target, lin_bias, ce_weight, *options)
    module = LigerFusedLinearCrossEntropyLoss(ce_weight, *options)(weight, x, target, lin_bias)
    # Liger compares two forms of its own op; ours are compared with torch in fp32 on the same (rounded) inputs
    x32 = x.detach().float().requires_grad_()
    want, want_z = torch_lm_head_ce(x32, weight.float(), None if lin_bias is None else lin_bias.float(), target,
                                    ce_weight=ce_weight, lse_square_scale=1e-4, label_smoothing=0.1,
                                    softcap=softcap)
    for got in (result, module):
        _close(got.loss, want, atol, rtol, "loss")
        _close(got.z_loss, want_z, atol, rtol, "z_loss")
    upstream = torch.randn((), generator=gen)
    got, = torch.autograd.grad(result.loss, x, upstream)
    ref, = torch.autograd.grad(want, x32, upstream)
    _close(got, ref, atol, rtol, "d input")


TOKEN_ACCURACY = [(shape, *prec, bias, flag) for shape, prec, bias, flag in itertools.product(
    [SMALL, LARGE], [(torch.bfloat16, 5e-3, 5e-2), (torch.float32, 1e-5, 5e-4)], [True, False], [True, False])
    if shape == SMALL or prec[0] == torch.float32]


@pytest.mark.parametrize("shape,dtype,atol,rtol,bias,return_token_accuracy", TOKEN_ACCURACY)
def test_correctness_with_token_accuracy(shape, dtype, atol, rtol, bias, return_token_accuracy):
    x, weight, lin_bias, target = _case_inputs(shape, dtype, bias, -100, seed=2)
    x.requires_grad_()
    want, _ = torch_lm_head_ce(x, weight, lin_bias, target)
    result = liger_fused_linear_cross_entropy(x, weight, target, lin_bias,
                                              return_token_accuracy=return_token_accuracy)
    if return_token_accuracy:
        assert isinstance(result, CrossEntropyOutput) and result.z_loss is None
        logits = F.linear(x, weight, lin_bias).float()
        valid = target != -100
        expected = ((logits.argmax(-1) == target) & valid).sum().float() / valid.sum()
        _close(result.token_accuracy, expected, atol, rtol, "token_accuracy")
        result = result.loss
    _close(result, want, atol, rtol, "loss")
    _close(torch.autograd.grad(result, x)[0], torch.autograd.grad(want, x)[0], atol, rtol, "d input")


AMP = [(shape, bias, cast, accum) for shape, bias, cast, accum in itertools.product(
    [SMALL, LARGE], [True, False], [torch.bfloat16, torch.float16], [None, torch.float32])
    if shape == SMALL or (cast == torch.bfloat16 and accum is not None)]


@pytest.mark.parametrize("shape,bias,cast_dtype,accum_dtype", AMP)
def test_amp(shape, bias, cast_dtype, accum_dtype):
    atol, rtol = 5e-3, 5e-2
    x, weight, lin_bias, target = _case_inputs(shape, torch.float32, bias, -100, seed=3)
    leaves = [x, weight] + ([lin_bias] if bias else [])
    for t in leaves:
        t.requires_grad_()
    module = LigerFusedLinearCrossEntropyLoss(accum_dtype=accum_dtype)
    with torch.autocast("cpu", dtype=cast_dtype):
        want, _ = torch_lm_head_ce(x, weight, lin_bias, target)
        got = module(weight, x, target, lin_bias)
    _close(got, want, atol, rtol, "loss")
    for name, g, w in zip(("input", "weight", "bias"), torch.autograd.grad(got, leaves),
                          torch.autograd.grad(want, leaves)):
        _close(g, w, atol, rtol, f"d {name}")


@pytest.mark.parametrize("return_z_loss,return_token_accuracy", list(itertools.product([False, True], repeat=2)))
def test_structured_output(return_z_loss, return_token_accuracy):
    hidden = torch.tensor([[0.2, -0.1], [1.0, 0.5], [-0.3, 0.7]], requires_grad=True)
    weight = torch.tensor([[0.5, -0.4], [-0.2, 0.3], [0.1, 0.6]])
    lin_bias = torch.tensor([0.1, -0.2, 0.05])
    targets = torch.tensor([0, 1, 2])
    logits = hidden @ weight.T + lin_bias
    expected = F.cross_entropy(logits, targets)
    flags = dict(return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy)
    for result in (liger_fused_linear_cross_entropy(input=hidden, weight=weight, target=targets, bias=lin_bias,
                                                    **flags),
                   LigerFusedLinearCrossEntropyLoss(**flags)(weight, hidden, targets, lin_bias)):
        if not (return_z_loss or return_token_accuracy):
            assert isinstance(result, torch.Tensor)
            assert torch.allclose(result, expected, atol=1e-6)
            continue
        assert isinstance(result, CrossEntropyOutput)
        assert torch.allclose(result.loss, expected, atol=1e-6)
        assert (result.z_loss is not None) == return_z_loss
        assert (result.token_accuracy is not None) == return_token_accuracy
        if return_token_accuracy:
            assert torch.allclose(result.token_accuracy, (logits.argmax(-1) == targets).float().mean(), atol=1e-6)
        result.loss.backward()
        assert hidden.grad is not None


@pytest.mark.parametrize("shape", [(2, 16, 32, 64), (1, 32, 64, 128)])
@pytest.mark.parametrize("bias", [True, False])
def test_reduction_none_per_token_grad_output(shape, bias):
    B, T, H, V = shape
    gen = torch.Generator().manual_seed(42)
    x = (torch.randn(B * T, H, generator=gen) * 0.1).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * 0.1).requires_grad_()
    lin_bias = (torch.randn(V, generator=gen) * 0.1).requires_grad_() if bias else None
    target = torch.randint(0, V, (B * T,), generator=gen)
    upstream = torch.rand(B * T, generator=gen) + 0.5  # not uniform: a scalar factor would not pass
    leaves = [x, weight] + ([lin_bias] if bias else [])
    got = liger_fused_linear_cross_entropy(x, weight, target, lin_bias, reduction="none")
    want = F.cross_entropy(F.linear(x, weight, lin_bias), target, reduction="none")
    _close(got, want, 1e-4, 1e-4, "loss")
    for name, g, w in zip(("input", "weight", "bias"), torch.autograd.grad(got, leaves, upstream),
                          torch.autograd.grad(want, leaves, upstream)):
        _close(g, w, 1e-4, 1e-4, f"d {name}")


@pytest.mark.parametrize("kwargs,message", [
    (dict(use_token_scaling=True), "use_token_scaling=True is not implemented"),
    (dict(return_predicted_tokens=True), "return_predicted_tokens=True is not implemented"),
    (dict(chunk_mem_const=4), "chunk_mem_const must be 1"),
    (dict(accum_dtype=torch.float16), "accum_dtype must be None or torch.float32"),
    (dict(return_z_loss=1), "return_z_loss must be a bool"),
])
def test_options_we_do_not_implement_are_refused_by_name(kwargs, message):
    x, weight, target = torch.randn(6, 4), torch.randn(7, 4), torch.randint(0, 7, (6,))
    with pytest.raises((ValueError, TypeError), match=message):
        liger_fused_linear_cross_entropy(x, weight, target, **kwargs)
