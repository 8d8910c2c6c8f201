"""Class weights (ce_weight) with F.cross_entropy's semantics in every backend: each position's CE weighted by
the weight of its label, the "mean" divided by the summed weights of the labelled positions, the z term left
unweighted; with NITP, z-loss, softcap, bias, every reduction and a random upstream gradient."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from nitp_kernels import fused_linear_cross_entropy, fused_nitp_loss
from op_cases import assert_close_rel


def _problem(dtype, seed=0, batch=3, seq=7, d=6, vocab=29):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    width = 2 * d + 1
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels.view(-1)[::5] = -100
    return dict(hidden=randn(batch, seq, d), lm_weight=randn(vocab, d, scale=d ** -0.5), labels=labels,
                shallow=randn(batch, seq, d),
                projector=(randn(width, d, scale=d ** -0.5), randn(width, d, scale=d ** -0.5),
                           randn(d, width, scale=width ** -0.5)),
                lm_bias=randn(vocab, scale=0.1),
                ce_weight=(torch.rand(vocab, generator=gen, dtype=torch.float64) * 2).to(dtype))


def _run(p, backend, upstream, **options):
    out = fused_nitp_loss(p["hidden"], p["lm_weight"], p["labels"], p["shallow"], p["projector"],
                          lm_bias=p["lm_bias"], ce_weight=p["ce_weight"], backend=backend, nitp_weight=0.7,
                          stop_gradient=False, **options)
    leaves = [p["hidden"], p["lm_weight"], p["shallow"], p["lm_bias"], *p["projector"]]
    grads = torch.autograd.grad(out.loss, leaves, upstream.to(out.loss.dtype))
    return out, grads


# (label_smoothing, softcap): any two of class weights, label smoothing and softcap
CASES = list(itertools.product(["mean", "sum", "none"], [0.0, 1e-2], [(0.0, None), (0.0, 5.0), (0.1, None)]))


def _check(backend, dtype, tol, reduction, z_loss_weight, smoothing_softcap):
    label_smoothing, softcap = smoothing_softcap
    p = _problem(dtype)
    upstream = torch.rand(p["labels"].shape, dtype=torch.float64) + 0.5 if reduction == "none" else \
        torch.tensor(0.37, dtype=torch.float64)
    options = dict(reduction=reduction, z_loss_weight=z_loss_weight, softcap=softcap, chunk_size=4,
                   label_smoothing=label_smoothing)
    want, want_grads = _run(p, "reference", upstream, **options)
    got, got_grads = _run(p, backend, upstream, **options)
    for name in ("loss", "ce_loss", "nitp_loss", "z_loss"):
        assert_close_rel(getattr(got, name), getattr(want, name), tol, name)
    for name, g, w in zip(("hidden", "lm_weight", "shallow", "lm_bias", "w_gate", "w_up", "w_down"), got_grads,
                          want_grads):
        assert g.dtype == w.dtype == dtype
        assert_close_rel(g, w, tol, f"d{name}")


@pytest.mark.parametrize("reduction,z_loss_weight,smoothing_softcap", CASES)
def test_torch_backend_float64(reduction, z_loss_weight, smoothing_softcap):
    _check("torch", torch.float64, 1e-8, reduction, z_loss_weight, smoothing_softcap)


@pytest.mark.parametrize("reduction,z_loss_weight,smoothing_softcap", CASES[1::2])
def test_triton_backend_float32(reduction, z_loss_weight, smoothing_softcap):
    _check("triton", torch.float32, 1e-5, reduction, z_loss_weight, smoothing_softcap)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_equals_f_cross_entropy_with_weight(backend, reduction, label_smoothing):
    p = _problem(torch.float64, seed=1)
    hidden, lm_weight, labels, weight = p["hidden"], p["lm_weight"], p["labels"], p["ce_weight"]
    got = fused_linear_cross_entropy(hidden, lm_weight, labels, ce_weight=weight, reduction=reduction,
                                     chunk_size=5, backend=backend, label_smoothing=label_smoothing)
    want = F.cross_entropy((hidden @ lm_weight.T).flatten(0, 1), labels.flatten(), weight=weight,
                           reduction=reduction, label_smoothing=label_smoothing)
    want = want.view(labels.shape) if reduction == "none" else want
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.rand(want.shape, dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(got, (hidden, lm_weight), upstream),
                    torch.autograd.grad(want, (hidden, lm_weight), upstream)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_no_labelled_position_gives_zero():
    p = _problem(torch.float64)
    labels = torch.full_like(p["labels"], -100)
    loss = fused_linear_cross_entropy(p["hidden"], p["lm_weight"], labels, ce_weight=p["ce_weight"],
                                      backend="torch")
    assert loss.item() == 0.0
    grad, = torch.autograd.grad(loss, p["hidden"])
    assert torch.all(grad == 0)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(label_smoothing=0.1, softcap=30.0), ValueError,
     r"ce_weight with label_smoothing=0.1 and softcap=30.0 is not implemented"),
    (dict(ce_weight=torch.ones(5)), ValueError, r"ce_weight must be \(V=29,\)"),
    (dict(ce_weight=torch.ones(29, dtype=torch.long)), TypeError, "ce_weight must be float32"),
    (dict(ce_weight=torch.ones(29, requires_grad=True)), ValueError, "ce_weight must not require grad"),
])
def test_bad_class_weights_are_refused_by_name(kwargs, error, message):
    p = _problem(torch.float32)
    kwargs = dict(dict(ce_weight=p["ce_weight"]), **kwargs)
    with pytest.raises(error, match=message):
        fused_linear_cross_entropy(p["hidden"], p["lm_weight"], p["labels"], **kwargs)


def test_module_form_holds_the_class_weights_as_a_buffer():
    from nitp_kernels import NITPLoss
    p = _problem(torch.float64, seed=2)
    module = NITPLoss(ce_weight=p["ce_weight"], z_loss_weight=1e-2, backend="torch", return_token_accuracy=True)
    assert "ce_weight" in dict(module.named_buffers())
    got = module(p["hidden"], p["lm_weight"], p["labels"], p["shallow"], p["projector"])
    want = fused_nitp_loss(p["hidden"], p["lm_weight"], p["labels"], p["shallow"], p["projector"],
                           ce_weight=p["ce_weight"], z_loss_weight=1e-2, backend="reference",
                           return_token_accuracy=True)
    for name in ("loss", "ce_loss", "nitp_loss", "z_loss", "token_accuracy"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-10, atol=1e-12)
