"""The public API around the numbers: bad input, empty terms, gradcheck, shapes, determinism, modules."""
import pytest
import torch
import torch.nn.functional as F

from nitp_kernels import NITPLoss, NITPLossOutput, NITPProjector, fused_linear_cross_entropy, fused_nitp_loss

D, V, B, T = 6, 11, 2, 5


def _inputs(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen, dtype=dtype, requires_grad=True)
    lm_weight = torch.randn(V, D, generator=gen, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=gen)
    shallow = torch.randn(B, T, D, generator=gen, dtype=dtype)
    projector = NITPProjector(D, hidden_mult=2, dtype=dtype)
    return hidden, lm_weight, labels, shallow, projector


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_gradcheck_float64(stop_gradient):
    hidden, lm_weight, labels, shallow, projector = _inputs()
    bias = torch.randn(V, dtype=torch.float64, requires_grad=True)
    shallow.requires_grad_(not stop_gradient)
    labels[0, 1] = -100

    def loss(h, w, b, s, wg, wu, wd):
        return fused_nitp_loss(h, w, labels, s, (wg, wu, wd), lm_bias=b, stop_gradient=stop_gradient,
                               label_smoothing=0.1, z_loss_weight=0.01, softcap=4.0, chunk_size=3,
                               backend="torch").loss

    assert torch.autograd.gradcheck(loss, (hidden, lm_weight, bias, shallow, *projector.parameters()))


BAD_CALLS = [
    ("hidden", dict(hidden=torch.randn(3, D, dtype=torch.float64)), ValueError),  # 2-D without seq_len
    ("hidden", dict(hidden=torch.randn(B, T, D).long()), TypeError),
    ("hidden", dict(hidden=torch.randn(D, dtype=torch.float64)), ValueError),
    ("seq_len", dict(seq_len=4), ValueError),
    ("lm_weight", dict(lm_weight=torch.randn(V, D + 1, dtype=torch.float64)), ValueError),
    ("lm_weight", dict(lm_weight=torch.randint(0, 3, (V, D))), TypeError),
    ("lm_bias", dict(lm_bias=torch.randn(V + 1, dtype=torch.float64)), ValueError),
    ("labels", dict(labels=torch.zeros(B, T + 1, dtype=torch.long)), ValueError),
    ("labels", dict(labels=torch.zeros(B, T)), TypeError),
    ("labels", dict(labels=torch.full((B, T), V)), ValueError),
    ("labels", dict(labels=torch.full((B, T), -7)), ValueError),
    ("shallow", dict(shallow=torch.randn(B, T + 1, D, dtype=torch.float64)), ValueError),
    ("shallow", dict(shallow=torch.randn(B, T, D, dtype=torch.float32)), TypeError),
    ("projector", dict(projector="swiglu"), TypeError),
    ("projector", dict(projector=(torch.randn(4, D), torch.randn(4, D), torch.randn(D, 5))), ValueError),
    ("loss_type", dict(loss_type="cos"), ValueError),
    ("reduction", dict(reduction="avg"), ValueError),
    ("backend", dict(backend="cuda"), ValueError),
    ("shift", dict(shift=T), ValueError),
    ("shift", dict(shift=-1), ValueError),
    ("nitp_weight", dict(nitp_weight=-0.5), ValueError),
    ("label_smoothing", dict(label_smoothing=1.5), ValueError),
    ("z_loss_weight", dict(z_loss_weight=-1.0), ValueError),
    ("softcap", dict(softcap=0.0), ValueError),
    ("chunk_size", dict(chunk_size=0), ValueError),
    ("float64", dict(backend="triton"), TypeError),
]


@pytest.mark.parametrize("name,override,error", BAD_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_bad_input_names_the_argument(name, override, error):
    hidden, lm_weight, labels, shallow, projector = _inputs()
    args = dict(hidden=hidden, lm_weight=lm_weight, labels=labels, shallow=shallow, projector=projector)
    args.update({k: v for k, v in override.items() if k in args})
    kwargs = {k: v for k, v in override.items() if k not in args}
    with pytest.raises(error, match=name):
        fused_nitp_loss(args["hidden"], args["lm_weight"], args["labels"], args["shallow"], args["projector"],
                        **kwargs)


def test_device_mismatch_is_refused():
    hidden, lm_weight, labels, shallow, projector = _inputs()
    meta_labels = torch.zeros(B, T, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="labels"):
        fused_nitp_loss(hidden, lm_weight, meta_labels, shallow, projector)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_labels_give_zero_loss_and_zero_gradients(backend, reduction):
    hidden, lm_weight, labels, shallow, projector = _inputs(torch.float32)
    labels.fill_(-100)
    out = fused_nitp_loss(hidden, lm_weight, labels, shallow, projector, backend=backend, reduction=reduction,
                          z_loss_weight=0.1)
    out.loss.backward()
    assert out.loss.item() == 0 and out.n_ce.item() == 0 and out.n_nitp.item() == 0
    for tensor in (hidden, lm_weight, *projector.parameters()):
        assert tensor.grad is not None and torch.all(tensor.grad == 0), "gradient must be zero, not NaN"


def test_two_dimensional_input_with_seq_len_equals_three_dimensional():
    hidden, lm_weight, labels, shallow, projector = _inputs()
    out3 = fused_nitp_loss(hidden, lm_weight, labels, shallow, projector, backend="torch")
    out2 = fused_nitp_loss(hidden.reshape(-1, D), lm_weight, labels.reshape(-1), shallow.reshape(-1, D), projector,
                           seq_len=T, backend="torch")
    for a, b in zip(out3[:6], out2[:6]):
        assert torch.equal(a, b)
    assert isinstance(out3, NITPLossOutput) and out3.n_nitp.item() == B * (T - 1)


def test_deterministic_bitwise():
    hidden, lm_weight, labels, shallow, projector = _inputs(torch.float32)
    grads = []
    for _ in range(2):
        hidden.grad = lm_weight.grad = None
        out = fused_nitp_loss(hidden, lm_weight, labels, shallow, projector, chunk_size=3, backend="torch")
        out.loss.backward()
        grads.append((out.loss.detach(), hidden.grad.clone(), lm_weight.grad.clone()))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_linear_cross_entropy_matches_f_cross_entropy(reduction):
    hidden, lm_weight, labels, _, _ = _inputs()
    labels[1, 2] = -100
    loss = fused_linear_cross_entropy(hidden, lm_weight, labels, reduction=reduction, chunk_size=4,
                                      backend="torch")
    want = F.cross_entropy((hidden @ lm_weight.T).reshape(-1, V), labels.reshape(-1), reduction=reduction)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(loss, (hidden, lm_weight))
    want_grads = torch.autograd.grad(want, (hidden, lm_weight))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_weights_in_fp32_with_bf16_hidden_get_fp32_gradients():
    hidden, lm_weight, labels, shallow, projector = _inputs(torch.float32)
    hidden16 = hidden.detach().bfloat16().requires_grad_()
    out = fused_nitp_loss(hidden16, lm_weight, labels, shallow.bfloat16(), projector, backend="torch")
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert hidden16.grad.dtype == torch.bfloat16 and lm_weight.grad.dtype == torch.float32
    assert projector.w_down.grad.dtype == torch.float32


def test_projector_module_and_loss_module():
    hidden, lm_weight, labels, shallow, projector = _inputs()
    x = hidden.detach()
    want = F.linear(F.silu(x @ projector.w_gate.T) * (x @ projector.w_up.T), projector.w_down)
    torch.testing.assert_close(projector(x), want)
    assert sum(p.numel() for p in NITPProjector(8).parameters()) == 12 * 8 * 8
    module = NITPLoss(loss_type="mse", shift=2, backend="torch")
    got = module(hidden, lm_weight, labels, shallow, projector)
    want = fused_nitp_loss(hidden, lm_weight, labels, shallow, projector, loss_type="mse", shift=2,
                           backend="reference")
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="loss_type"):
        NITPLoss(loss_type="l2")


def test_projector_none_is_identity():
    hidden, lm_weight, labels, shallow, _ = _inputs()
    out = fused_nitp_loss(hidden, lm_weight, labels, shallow, None, loss_type="mse", reduction="sum",
                          backend="torch")
    h, s = hidden.detach(), shallow
    want = ((h[:, :-1] - s[:, 1:]) ** 2).mean(-1).sum()
    torch.testing.assert_close(out.nitp_loss, want)


def test_backend_selection():
    hidden, lm_weight, labels, shallow, projector = _inputs(torch.float32)
    from nitp_kernels.api import resolve_backend
    assert resolve_backend("auto", hidden) == "torch"  # CPU tensors
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("gpu", hidden)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("projector_on,nitp_weight", [(True, 0.6), (False, 0.6), (True, 0.0)])
def test_grad_norms_match_autograd_of_each_term(backend, projector_on, nitp_weight):
    hidden, lm_weight, labels, shallow, projector = _inputs()
    projector = projector if projector_on else None
    labels[1, 3] = -100
    options = dict(nitp_weight=nitp_weight, z_loss_weight=0.05, loss_type="cosine", chunk_size=4)
    # independent truth: autograd through the materialised reference, one term at a time
    ref = fused_nitp_loss(hidden, lm_weight, labels, shallow, projector, backend="reference", **options)
    logits = (hidden @ lm_weight.T).reshape(-1, V)
    mask = labels.reshape(-1) != -100
    ce = F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)
    z = (torch.logsumexp(logits, -1)[mask] ** 2).mean()
    ce_grad, = torch.autograd.grad(ce + 0.05 * z, hidden)
    pred = hidden if projector is None else projector(hidden)
    cos = F.cosine_similarity(pred[:, :-1], shallow[:, 1:], dim=-1)
    nitp_mask = labels[:, :-1] != -100
    nitp_grad, = torch.autograd.grad((1 - cos)[nitp_mask].mean(), hidden)
    out = fused_nitp_loss(hidden, lm_weight, labels, shallow, projector, backend=backend, return_grad_norms=True,
                          **options)
    torch.testing.assert_close(out.ce_grad_norm, ce_grad.norm(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out.nitp_grad_norm, nitp_grad.norm(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
    # the gradients themselves are unchanged by asking for the norms
    got, = torch.autograd.grad(out.loss, hidden)
    want, = torch.autograd.grad(ref.loss, hidden)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert fused_nitp_loss(hidden, lm_weight, labels, shallow, projector, backend=backend).ce_grad_norm is None


def test_grad_norms_need_a_gradient():
    hidden, lm_weight, labels, shallow, projector = _inputs()
    with torch.no_grad(), pytest.raises(ValueError, match="return_grad_norms"):
        fused_nitp_loss(hidden, lm_weight, labels, shallow, projector, return_grad_norms=True)


def test_double_backward_is_refused_by_the_fused_backends_and_exact_on_the_reference():
    """create_graph=True: the fused op's gradients are formed in forward, so a second derivative would be
    silently wrong (a gradient penalty was off by 0.1); it is refused, and the reference backend does it."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 32, (2, 8))
    loss = fused_linear_cross_entropy(hidden, weight, labels, backend="torch")
    with pytest.raises(RuntimeError, match="double backward .*create_graph=True.* backend='reference'"):
        torch.autograd.grad(loss, hidden, create_graph=True)
    # the reference backend gives a real second derivative: the penalty's gradient is not zero
    loss = fused_linear_cross_entropy(hidden, weight, labels, backend="reference")
    (g,) = torch.autograd.grad(loss, hidden, create_graph=True)
    (penalty_grad,) = torch.autograd.grad(g.square().sum(), weight)
    assert penalty_grad.abs().max() > 0


@pytest.mark.parametrize("name,value", [("softcap", float("inf")), ("nitp_weight", float("inf")),
                                        ("z_loss_weight", float("inf")), ("label_smoothing", float("nan")),
                                        ("nitp_weight", float("nan"))])
def test_non_finite_options_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be .*got (inf|nan)"):
        NITPLoss(**{name: value})


def test_numpy_and_zero_dim_tensor_scalars_are_accepted_and_give_the_same_loss():
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    hidden, shallow = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    weight, labels = torch.randn(32, 16), torch.randint(0, 32, (2, 8))
    projector = NITPProjector(16)
    plain = fused_nitp_loss(hidden, weight, labels, shallow, projector, nitp_weight=0.3, softcap=20.0, shift=1)
    for weight_form, cap, shift in ((np.float32(0.3), np.float64(20.0), np.int64(1)),
                                    (torch.tensor(0.3), torch.tensor(20.0), torch.tensor(1))):
        other = fused_nitp_loss(hidden, weight, labels, shallow, projector, nitp_weight=weight_form, softcap=cap,
                                shift=shift)
        torch.testing.assert_close(other.loss, plain.loss, rtol=1e-6, atol=0)
    with pytest.raises(TypeError, match="nitp_weight must be a real number"):
        fused_nitp_loss(hidden, weight, labels, shallow, projector, nitp_weight=torch.tensor([0.3]))
    with pytest.raises(TypeError, match="shift must be an int"):
        fused_nitp_loss(hidden, weight, labels, shallow, projector, shift=np.float32(1.0))


def test_nitp_loss_module_validates_its_options_at_construction():
    with pytest.raises(ValueError, match="backend must be one of"):
        NITPLoss(backend="gpu")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        NITPLoss(loss_type="l2")
