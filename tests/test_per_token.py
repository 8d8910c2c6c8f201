"""reduction="none" (per-position losses, recomputed chunk by chunk in backward), token accuracy and the
per-position log-sum-exp: every backend against the reference backend, with random per-position upstream
gradients; plain fused_linear_cross_entropy also against F.cross_entropy on materialised logits."""
import pytest
import torch
import torch.nn.functional as F

from nitp_kernels import fused_linear_cross_entropy, fused_nitp_loss
from op_cases import FACTORS, OpInputs, assert_close_rel, case_id, leaf_names, make_inputs, pairwise_cases

PER_TOKEN_FACTORS = {k: v for k, v in FACTORS.items() if k not in ("reduction", "grad_scale")}
CASES = pairwise_cases(PER_TOKEN_FACTORS, seed=3)
TRITON_CASES = [c for c in CASES if c["chunk"] != "1"][:6]  # the interpreter is slow; chunks of 1 row add nothing
OUTPUTS = ("loss", "ce_loss", "nitp_loss", "z_loss", "token_accuracy", "lse")


def _inputs(case: dict, seed: int) -> OpInputs:
    return make_inputs(dict(case, reduction="none", grad_scale=1.0), seed=seed)


def _run(inputs: OpInputs, backend: str, upstream: torch.Tensor):
    """Outputs and the gradients of sum(upstream · loss) for every leaf."""
    kwargs = dict(inputs.kwargs, return_token_accuracy=True, return_lse=True)
    out = fused_nitp_loss(inputs.hidden, inputs.lm_weight, inputs.labels, inputs.shallow, inputs.projector,
                          lm_bias=inputs.lm_bias, backend=backend, **kwargs)
    leaves = inputs.leaves()
    wanted = [t for t in leaves if t.requires_grad]
    grads = dict(zip(map(id, wanted), torch.autograd.grad(out.loss, wanted, upstream.to(out.loss.dtype),
                                                          allow_unused=True)))
    return out, [grads.get(id(t)) for t in leaves]


def _check(inputs: OpInputs, backend: str, tol: float, seed: int = 0) -> None:
    upstream = torch.randn(inputs.labels.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    want, want_grads = _run(inputs, "reference", upstream)
    got, got_grads = _run(inputs, backend, upstream)
    for name in OUTPUTS:
        g, w = getattr(got, name), getattr(want, name)
        assert g.shape == inputs.labels.shape and g.dtype == w.dtype, name
        assert_close_rel(g, w, tol, name)
    assert torch.equal(got.n_ce, want.n_ce) and torch.equal(got.n_nitp, want.n_nitp)
    for name, g, w in zip(leaf_names(inputs), got_grads, want_grads):
        assert (g is None) == (w is None), f"d{name}: one backend gives no gradient"
        if g is not None:
            assert g.dtype == w.dtype
            assert_close_rel(g, w, tol, f"d{name}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_backend_float64(case):
    _check(_inputs(case, seed=11), "torch", 1e-8)


@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
def test_torch_backend_float32(case):
    _check(_inputs(case, seed=12).cast(torch.float32), "torch", 1e-5)


@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_triton_backend_float32(case):
    _check(_inputs(case, seed=13).cast(torch.float32), "triton", 1e-5)


def _ce_problem(dtype=torch.float64, seed=0, n=(3, 9), d=8, vocab=37):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n, d, generator=gen, dtype=dtype, requires_grad=True)
    lm_weight = torch.randn(vocab, d, generator=gen, dtype=dtype, requires_grad=True)
    lm_bias = torch.randn(vocab, generator=gen, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, n, generator=gen)
    labels.view(-1)[::4] = -100
    return hidden, lm_weight, lm_bias, labels


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_linear_cross_entropy_none_equals_f_cross_entropy_on_logits(backend):
    hidden, lm_weight, lm_bias, labels = _ce_problem()
    upstream = torch.randn(labels.shape, dtype=torch.float64)
    out = fused_linear_cross_entropy(hidden, lm_weight, labels, lm_bias=lm_bias, reduction="none", chunk_size=5,
                                     backend=backend, return_token_accuracy=True, return_lse=True)
    grads = torch.autograd.grad(out.loss, (hidden, lm_weight, lm_bias), upstream)
    logits = hidden @ lm_weight.T + lm_bias
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    want_grads = torch.autograd.grad(want, (hidden, lm_weight, lm_bias), upstream)
    assert out.loss.shape == labels.shape
    torch.testing.assert_close(out.loss.detach(), want.detach(), rtol=1e-12, atol=1e-12)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    valid = labels != -100
    torch.testing.assert_close(out.lse, torch.logsumexp(logits, -1).detach(), rtol=1e-12, atol=1e-12)
    correct = (logits.argmax(-1) == labels) & valid
    assert torch.equal(out.token_accuracy, correct.double())
    assert torch.all(out.loss[~valid] == 0)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_token_accuracy_of_the_fused_path(backend, reduction):
    hidden, lm_weight, lm_bias, labels = _ce_problem(torch.float32, seed=1)
    # make some rows right: hidden of a row aligned with its label's weight row
    rows = torch.arange(0, labels.numel(), 3)
    with torch.no_grad():
        hidden.view(-1, hidden.shape[-1])[rows] = 5 * lm_weight[labels.view(-1)[rows].clamp_min(0)]
    out = fused_linear_cross_entropy(hidden, lm_weight, labels, lm_bias=lm_bias, reduction=reduction,
                                     chunk_size=4, backend=backend, return_token_accuracy=True)
    out.loss.backward()
    logits = hidden.detach() @ lm_weight.detach().T + lm_bias.detach()
    valid = labels != -100
    want = ((logits.argmax(-1) == labels) & valid).sum() / valid.sum()
    assert 0 < want < 1
    torch.testing.assert_close(out.token_accuracy, want.float())
    # the loss and its gradient are those without the extra output
    ref = fused_linear_cross_entropy(hidden, lm_weight, labels, lm_bias=lm_bias, reduction=reduction,
                                     backend="reference")
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)


def test_repeated_backward_recomputes_the_same_gradients():
    hidden, lm_weight, lm_bias, labels = _ce_problem(seed=2)
    loss = fused_linear_cross_entropy(hidden, lm_weight, labels, reduction="none", backend="torch")
    upstream = torch.rand(labels.shape, dtype=torch.float64)
    first = torch.autograd.grad(loss, (hidden, lm_weight), upstream, retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, lm_weight), 2 * upstream)
    for a, b in zip(first, second):
        torch.testing.assert_close(2 * a, b, rtol=1e-12, atol=1e-14)


def test_per_token_path_saves_inputs_not_logits():
    hidden, lm_weight, lm_bias, labels = _ce_problem(seed=3, n=(4, 50), vocab=101)
    loss = fused_linear_cross_entropy(hidden, lm_weight, labels, lm_bias=lm_bias, reduction="none",
                                      backend="torch")
    node = loss.grad_fn.next_functions[0][0]  # under the view to labels' shape
    assert type(node).__name__ == "PerTokenFunctionBackward"
    saved = [t for t in node.saved_tensors if t is not None]
    assert sorted(t.numel() for t in saved) == sorted(t.numel() for t in (hidden, lm_weight, lm_bias))
    assert all(t.numel() < labels.numel() * 101 for t in saved)


@pytest.mark.parametrize("kwargs,message", [
    (dict(return_lse=True), "return_lse=True needs reduction='none'"),
    (dict(return_lse=1, reduction="none"), "return_lse must be a bool"),
    (dict(return_token_accuracy="yes"), "return_token_accuracy must be a bool"),
    (dict(reduction="avg"), "reduction must be one of"),
])
def test_bad_options_are_refused_by_name(kwargs, message):
    hidden, lm_weight, _, labels = _ce_problem()
    with pytest.raises((ValueError, TypeError), match=message):
        fused_linear_cross_entropy(hidden, lm_weight, labels, **kwargs)


def test_grad_norms_need_a_scalar_loss():
    hidden, lm_weight, _, labels = _ce_problem()
    with pytest.raises(ValueError, match="return_grad_norms=True needs reduction 'mean' or 'sum'"):
        fused_nitp_loss(hidden, lm_weight, labels, hidden.detach(), None, reduction="none",
                        return_grad_norms=True)


def test_per_row_factors_in_the_cuda_layout(monkeypatch):
    """fp16 matmul operands (CUDA's layout, emulated on the CPU): the per-row factors scale d hidden after the
    product and h's rows before d lm_weight's, never the fp16 d logits."""
    import nitp_kernels.chunked as chunked
    from nitp_kernels.matmuls import MatmulPlan
    monkeypatch.setattr(chunked, "matmul_plan", lambda device, dtype: MatmulPlan(
        torch.float16, torch.float32, fp32_result_kernel=False, accumulates_in_place=False))
    hidden, lm_weight, lm_bias, labels = _ce_problem(torch.float32, seed=4, n=(4, 64), vocab=50)
    upstream = torch.rand(labels.shape) * 1e-3  # small factors, as a mean over many tokens would give
    loss = fused_linear_cross_entropy(hidden, lm_weight, labels, lm_bias=lm_bias, reduction="none",
                                      chunk_size=32, backend="torch")
    got = torch.autograd.grad(loss, (hidden, lm_weight, lm_bias), upstream)
    leaves = [t.detach().half().double().requires_grad_() for t in (hidden, lm_weight, lm_bias)]
    want_loss = fused_linear_cross_entropy(*leaves[:2], labels, lm_bias=leaves[2], reduction="none",
                                           backend="reference")
    want = torch.autograd.grad(want_loss, leaves, upstream.double())
    for name, g, w in zip(("hidden", "lm_weight", "lm_bias"), got, want):
        err = (g.double() - w).abs().max() / w.abs().max()
        assert err < 2e-3, f"d {name} relative error {err:.2e}"


def test_backward_recomputes_in_the_forward_autocast_dtype(monkeypatch):
    """Under torch.autocast the forward's matmuls follow the autocast dtype; backward, which runs outside the
    autocast region, must recompute in that same dtype (the loop is asked for it through matmul_dtype)."""
    import nitp_kernels.chunked as chunked
    seen = []
    real = chunked.matmul_dtype
    monkeypatch.setattr(chunked, "matmul_dtype", lambda t: seen.append(real(t)) or seen[-1])
    hidden, lm_weight, _, labels = _ce_problem(torch.float32, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, lm_weight, labels, reduction="none", backend="torch")
    loss.sum().backward()
    assert seen == [torch.bfloat16, torch.bfloat16]


def test_double_backward_is_refused():
    hidden, lm_weight, _, labels = _ce_problem(seed=6)
    loss = fused_linear_cross_entropy(hidden, lm_weight, labels, reduction="none", backend="torch")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss.sum(), hidden, create_graph=True)
