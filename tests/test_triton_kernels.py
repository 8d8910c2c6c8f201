"""Each Triton kernel against PyTorch on awkward shapes, on the device the kernels run on.

Every test takes `device`: "cpu" where CUDA is absent (the kernels then run in Triton's interpreter,
TRITON_INTERPRET=1 from tests/conftest.py), "cuda" where it is present (conftest leaves the variable unset there, so
the same tests run the kernels compiled for the GPU). Never "cpu" on a CUDA machine: compiled kernels cannot take
CPU tensors.

Shapes are chosen against the kernels' tiling: rows not a multiple of anything, a single row, d and V not powers
of two and larger than one block, so the online softmax crosses blocks, and each cross-entropy config is taken
(V <= 8192, <= 32768, above), the last at the real vocabulary V = 152064. The PyTorch side computes the same
formulas in fp64 from the same (rounded) inputs, so the only differences left are the kernels' fp32 arithmetic
and the final rounding to the storage dtype.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import nitp_kernels
from nitp_kernels.kernels import cross_entropy, nitp_rows, swiglu
from nitp_kernels.kernels.cross_entropy import _tanh_sech2, cross_entropy_rows
from nitp_kernels.kernels.nitp_rows import nitp_rows as nitp_rows_kernel
from nitp_kernels.kernels.swiglu import swiglu_backward, swiglu_forward

# relative tolerance of a result stored in each dtype (fp32 results: fp32 arithmetic over up to ~1e3 terms)
STORE_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
REAL_VOCAB = 152064


@pytest.fixture(params=["cuda"] if torch.cuda.is_available() else ["cpu"])
def device(request) -> str:
    return request.param


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str) -> None:
    """max |actual - expected| <= rel * max(|expected|, tiny): a per-tensor relative error, as DESIGN.md uses."""
    err = (actual.cpu().double() - expected.cpu().double()).abs().max().item()
    bound = rel * max(expected.double().abs().max().item(), 1e-12)
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


def ce_truth(x: torch.Tensor, labels: torch.Tensor, ignore_index: int, eps: float, softcap, z_w: float,
             ce_scale: float, z_scale: float):
    """Per-row ce and z and the gradient of ce_scale*sum(ce) + z_w*z_scale*sum(z), by fp64 autograd on the CPU."""
    x = x.cpu().double().requires_grad_()
    labels = labels.cpu()
    s = softcap * torch.tanh(x / softcap) if softcap else x
    valid = labels != ignore_index
    ce = F.cross_entropy(s, labels, ignore_index=ignore_index, label_smoothing=eps, reduction="none")
    z = torch.where(valid, torch.logsumexp(s, -1) ** 2, 0.0)
    (ce_scale * ce.sum() + z_w * z_scale * z.sum()).backward()
    return ce.detach(), z.detach(), x.grad


def run_ce(logits, labels, *, ignore_index=-100, eps=0.0, softcap=None, z_w=0.0, ce_scale=1.0, z_scale=1.0,
           need_grad=True):
    """cross_entropy_rows on a copy of logits: (ce_rows, z_rows, the copy: the gradient when need_grad)."""
    work = logits.clone()
    scales = (torch.tensor(ce_scale, device=logits.device), torch.tensor(z_scale, device=logits.device))
    ce_rows, z_rows = cross_entropy_rows(work, labels, ignore_index=ignore_index, label_smoothing=eps,
                                         softcap=softcap, z_loss_weight=z_w, ce_scale=scales[0],
                                         z_scale=scales[1], need_grad=need_grad)
    return ce_rows, z_rows, work


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_rows,vocab,eps,softcap,z_w", [
    (7, 2500, 0.0, None, 0.0),           # small-V config: two 2048-lane blocks, the second ragged; rows odd
    (1, 777, 0.1, 5.0, 1e-2),            # a single row in one ragged block, smoothing + softcap + z-loss
    (5, 8195, 0.05, None, 1e-3),         # V just above 8192: the 8192-lane config, two blocks
    (3, 40000, 0.1, 30.0, 1e-4),         # large-V config: two 32768-lane blocks, softcap in half-block steps
    (4, REAL_VOCAB, 0.0, None, 1e-4),    # the real vocabulary: five 32768-lane blocks, as on the GPU
    (2, REAL_VOCAB, 0.1, 30.0, 0.0),     # ... with softcap and smoothing
])
def test_cross_entropy_kernel(device, dtype, n_rows, vocab, eps, softcap, z_w):
    gen = torch.Generator().manual_seed(n_rows * vocab)
    logits = (3 * torch.randn(n_rows, vocab, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab, (n_rows,), generator=gen)
    if n_rows > 2:
        labels[1] = -100
    ce_scale, z_scale = 1.0 / max(1, int((labels != -100).sum())), 0.5
    ce_ref, z_ref, grad_ref = ce_truth(logits, labels, -100, eps, softcap, z_w, ce_scale, z_scale)
    logits, labels = logits.to(device), labels.to(device)
    options = dict(eps=eps, softcap=softcap, z_w=z_w, ce_scale=ce_scale, z_scale=z_scale)
    ce_rows, z_rows, grad = run_ce(logits, labels, **options)
    assert ce_rows.dtype == torch.float32 and z_rows.dtype == torch.float32
    assert_close(ce_rows, ce_ref, 1e-5, "ce_rows")
    assert_close(z_rows, z_ref, 1e-5, "z_rows")
    assert_close(grad, grad_ref, STORE_TOL[dtype] + 1e-5, "d logits (in place)")
    assert torch.all(grad[labels == -100] == 0)
    # the label's element carries the -(1-eps)*ce_scale term, rounded once from fp32
    rows = torch.arange(n_rows, device=device)[labels != -100]
    assert_close(grad[rows, labels[rows]], grad_ref[rows.cpu(), labels[rows].cpu()], STORE_TOL[dtype],
                 "d logits at the labels")
    # without need_grad the logits are left untouched and the losses are the same, bitwise; a second run with
    # need_grad reproduces the first bitwise (no atomics)
    ce2, z2, untouched = run_ce(logits, labels, **options, need_grad=False)
    assert torch.equal(untouched, logits) and torch.equal(ce2, ce_rows) and torch.equal(z2, z_rows)
    _, _, grad2 = run_ce(logits, labels, **options)
    assert torch.equal(grad2, grad)


def test_cross_entropy_large_logits_and_all_ignored(device):
    """Online softmax must survive scores far from 0 (no overflow), and an all-ignored chunk is all zeros."""
    logits = torch.tensor([[1000.0, 990.0, -1000.0], [-500.0, -505.0, -499.0]])
    labels = torch.tensor([0, 1])
    ce_ref, z_ref, grad_ref = ce_truth(logits, labels, -1, 0.0, None, 1e-4, 1.0, 1.0)
    ce_rows, z_rows, grad = run_ce(logits.to(device), labels.to(device), ignore_index=-1, z_w=1e-4)
    assert torch.isfinite(grad).all()
    assert_close(ce_rows, ce_ref, 1e-6, "ce_rows")
    assert_close(z_rows, z_ref, 1e-6, "z_rows")
    assert_close(grad, grad_ref, 1e-5, "d logits")
    ce_rows, z_rows, grad = run_ce(logits.to(device), torch.full((2,), -1, device=device), ignore_index=-1,
                                   eps=0.1, softcap=2.0, z_w=1.0)
    assert not ce_rows.any() and not z_rows.any() and not grad.any()


@pytest.mark.parametrize("vocab,softcap", [(1000, None), (9000, 20.0), (40000, None)])
def test_cross_entropy_labels_out_of_range_are_never_read(device, vocab, softcap):
    """Labels V, V+5 and -7 (not ignore_index) give rows of zero loss and zero gradient, like ignored rows, and
    the valid rows are unchanged. The logits are a view into a buffer padded with NaN on both sides, so a read of
    logits[label] outside the row (before row 0, past the last row) would turn up as a NaN."""
    n_rows = 5
    gen = torch.Generator().manual_seed(vocab)
    buffer = torch.full((n_rows + 2, vocab), float("nan"))
    buffer[1:-1] = 3 * torch.randn(n_rows, vocab, generator=gen)
    labels = torch.randint(0, vocab, (n_rows,), generator=gen)
    bad = torch.tensor([0, 2, 4])
    labels[bad] = torch.tensor([-7, vocab, vocab + 5])
    good = torch.tensor([1, 3])
    ce_ref, z_ref, grad_ref = ce_truth(buffer[1:-1][good], labels[good], -100, 0.1, softcap, 1e-3, 0.5, 0.25)
    buffer = buffer.to(device)
    logits = buffer[1:-1]
    ce_rows, z_rows = cross_entropy_rows(logits, labels.to(device), ignore_index=-100, label_smoothing=0.1,
                                         softcap=softcap, z_loss_weight=1e-3,
                                         ce_scale=torch.tensor(0.5, device=device),
                                         z_scale=torch.tensor(0.25, device=device), need_grad=True)
    bad, good = bad.to(device), good.to(device)
    assert not ce_rows[bad].any() and not z_rows[bad].any() and not logits[bad].any()
    assert_close(ce_rows[good], ce_ref, 1e-5, "ce_rows of the valid rows")
    assert_close(z_rows[good], z_ref, 1e-5, "z_rows of the valid rows")
    assert_close(logits[good], grad_ref, 1e-5, "d logits of the valid rows")
    assert torch.isnan(buffer[0]).all() and torch.isnan(buffer[-1]).all(), "the padding was written"


@triton.jit
def _tanh_probe_kernel(x_ptr, tanh_ptr, sech2_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tanh, sech2 = _tanh_sech2(tl.load(x_ptr + offs, mask=mask, other=0.0))
    tl.store(tanh_ptr + offs, tanh, mask=mask)
    tl.store(sech2_ptr + offs, sech2, mask=mask)


def test_softcap_tanh_is_as_accurate_as_torch(device):
    """The kernels' tanh on a dense grid over [-12, 12] (and tiny |x|) in ulps of the fp64 truth, next to
    torch.tanh in fp32: within 1.5 ulp where torch.tanh is within ~0.5 (the exp-only form reached 9 ulp at 1/8).
    sech^2 keeps its relative accuracy where 1 - tanh^2 in fp32 cancels to nothing."""
    x = torch.cat([torch.linspace(0, 1.5, 150001), torch.linspace(1.5, 12, 20001), torch.logspace(-8, -1, 2000)])
    x = torch.cat([x, -x])
    tanh, sech2 = torch.empty_like(x, device=device), torch.empty_like(x, device=device)
    _tanh_probe_kernel[(triton.cdiv(x.numel(), 4096),)](x.to(device), tanh, sech2, x.numel(), BLOCK=4096)
    truth = torch.tanh(x.double())
    sech2_truth = 1 / torch.cosh(x.double()) ** 2

    def ulps(value: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        rounded = exact.float().abs()
        ulp = (torch.nextafter(rounded, torch.tensor(float("inf"))) - rounded).double()
        return (value.cpu().double() - exact).abs() / ulp

    torch_ulps = ulps(torch.tanh(x), truth).max().item()
    ours_ulps = ulps(tanh, truth).max().item()
    # on the GPU tl.exp is the hardware exp2 (a few ulp), damped by at most 0.31 for |x| >= 1 (an estimate)
    assert ours_ulps <= (1.5 if device == "cpu" else 2.5), f"tanh: {ours_ulps:.2f} ulp (torch: {torch_ulps:.2f})"
    assert torch_ulps <= 1.0
    sech2_rel = ((sech2.cpu().double() - sech2_truth).abs() / sech2_truth).max().item()
    assert sech2_rel <= 1e-6, f"sech^2 relative error {sech2_rel:.2e}"
    naive = 1 - torch.tanh(x) ** 2
    assert ((naive.double() - sech2_truth).abs() / sech2_truth).max() > 0.5  # what sech^2 avoids


def test_softcap_gradient_error_against_torch_fp32(device):
    """The public op's gradients with softcap 30 against fp64, next to plain torch fp32 (tanh, cross_entropy):
    max|d grad| / max|grad| of d hidden and d lm_weight within 1.5x torch fp32's, at V=1024, logits ~ 3 N(0,1),
    reduction "sum". Inputs are rounded to a few bits so that hidden @ lm_weight.T is exact in fp32: the logits
    GEMM then adds no error to either side, and what is compared is the softcapped cross-entropy itself.
    Measured under the interpreter (4 seeds): at most 1.23x torch fp32's error; the exp-only tanh reached 2.1x.
    On a GPU tl.exp is the hardware exp2, torch's softmax an accurate expf: the 3x bound there is an estimate,
    not yet measured."""
    n_rows, dim, vocab, softcap = 64, 32, 1024, 30.0

    def plain_loss(h, w, y):
        return F.cross_entropy(softcap * torch.tanh((h @ w.T) / softcap), y, reduction="sum")

    def ours_loss(h, w, y):
        return nitp_kernels.fused_linear_cross_entropy(h, w, y, reduction="sum", softcap=softcap, backend="triton")

    def grads(loss, h, w, y):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss(h, w, y).backward()
        return h.grad.cpu().double(), w.grad.cpu().double()

    bound = 1.5 if device == "cpu" else 3.0
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        hidden = torch.round(8 * torch.randn(n_rows, dim, generator=gen)) / 8
        weight = torch.round(64 * 3 / dim ** 0.5 * torch.randn(vocab, dim, generator=gen)) / 64
        labels = torch.randint(0, vocab, (n_rows,), generator=gen)
        assert torch.equal((hidden @ weight.T).double(), hidden.double() @ weight.double().T)
        truth = grads(plain_loss, hidden.double(), weight.double(), labels)
        plain = grads(plain_loss, hidden.to(device), weight.to(device), labels.to(device))
        ours = grads(ours_loss, hidden.to(device), weight.to(device), labels.to(device))
        for name, exact, yardstick, value in zip(("d hidden", "d lm_weight"), truth, plain, ours):
            plain_err = ((yardstick - exact).abs().max() / exact.abs().max()).item()
            ours_err = ((value - exact).abs().max() / exact.abs().max()).item()
            assert ours_err <= bound * plain_err, f"seed {seed} {name}: {ours_err:.2e} > {bound} x {plain_err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_rows,width,fp32_d_g", [(1, 5, False), (6, 1030, False), (6, 1030, True)])
def test_swiglu_kernels(device, dtype, n_rows, width, fp32_d_g):
    """1030: two 1024-lane blocks, the 2nd ragged. fp32_d_g: the chunk loop's fp32-accumulated d_g is read as is."""
    gen = torch.Generator().manual_seed(width)
    gate_up = (2 * torch.randn(n_rows, 2 * width, generator=gen)).to(dtype)
    d_g = torch.randn(n_rows, width, generator=gen).to(torch.float32 if fp32_d_g else dtype)
    a, b = gate_up.double().chunk(2, dim=-1)
    a.requires_grad_()
    b.requires_grad_()
    g_ref = F.silu(a) * b
    g_ref.backward(d_g.double())
    gate_up, d_g = gate_up.to(device), d_g.to(device)
    g = swiglu_forward(gate_up)
    assert g.dtype == dtype and g.shape == (n_rows, width)
    assert_close(g, g_ref, STORE_TOL[dtype], "g")
    buffer = gate_up.clone()
    d_gate_up = swiglu_backward(d_g, buffer)
    assert d_gate_up.data_ptr() == buffer.data_ptr(), "the backward writes in place of gate_up"
    assert_close(d_gate_up[:, :width], a.grad, STORE_TOL[dtype], "d_a")
    assert_close(d_gate_up[:, width:], b.grad, STORE_TOL[dtype], "d_b")


def nitp_truth(pred, target, valid, loss_type, scale):
    """Per-row loss (fp64, zeros on invalid rows) and scale * d(sum of valid rows)/d(pred, target), by autograd."""
    from nitp_kernels.reference import nitp_row_losses

    p = pred.double().requires_grad_()
    y = target.double().requires_grad_()
    rows = torch.where(valid, nitp_row_losses(p, y, loss_type), 0.0)
    (scale * rows.sum()).backward()
    return rows.detach(), p.grad, y.grad


@pytest.mark.parametrize("pred_dtype,dtype", [
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16), (torch.float32, torch.bfloat16),  # the chunk loop's fp32 projector output
], ids=str)
@pytest.mark.parametrize("loss_type", ["cosine", "mse", "smooth_l1", "kl"])
def test_nitp_rows_kernel(device, pred_dtype, dtype, loss_type):
    """d = 600: two 512-lane blocks, the second ragged; the target is a strided view (every other row)."""
    n_rows, dim = 5, 600
    gen = torch.Generator().manual_seed(7)
    pred = torch.randn(n_rows, dim, generator=gen).to(pred_dtype)
    shallow = (1.5 * torch.randn(2 * n_rows, dim, generator=gen)).to(dtype)
    valid = torch.tensor([True, False, True, True, True])
    rows_ref, dp_ref, dy_ref = nitp_truth(pred, shallow[::2], valid, loss_type, 0.3)
    pred, valid, scale = pred.to(device), valid.to(device), torch.tensor(0.3, device=device)
    target = shallow.to(device)[::2]  # row stride 2*dim: read in place, never copied
    loss_rows, d_pred, d_target = nitp_rows_kernel(pred, target, valid, loss_type=loss_type, scale=scale,
                                                   need_grad=True, need_target_grad=True)
    assert loss_rows.dtype == d_pred.dtype == d_target.dtype == torch.float32
    assert_close(loss_rows, rows_ref, 1e-5, "loss_rows")
    assert_close(d_pred, dp_ref, 1e-5, "d_pred")
    assert_close(d_target, dy_ref, 1e-5, "d_target")
    assert not d_pred[1].any() and not d_target[1].any() and loss_rows[1] == 0
    rows_only, none_p, none_y = nitp_rows_kernel(pred, target, valid, loss_type=loss_type, scale=scale,
                                                 need_grad=False, need_target_grad=False)
    assert none_p is None and none_y is None and torch.equal(rows_only, loss_rows)


def test_nitp_rows_single_row_and_zero_vectors(device):
    """One row, d = 3; cosine with a zero prediction (clamped norm: finite, derivative term dropped)."""
    pred = torch.zeros(1, 3)
    target = torch.tensor([[1.0, -2.0, 0.5]])
    valid = torch.tensor([True])
    rows_ref, dp_ref, dy_ref = nitp_truth(pred, target, valid, "cosine", 1.0)
    pred, target, valid = pred.to(device), target.to(device), valid.to(device)
    loss_rows, d_pred, d_target = nitp_rows_kernel(pred, target, valid, loss_type="cosine",
                                                   scale=torch.tensor(1.0, device=device), need_grad=True,
                                                   need_target_grad=True)
    assert_close(loss_rows, rows_ref, 1e-6, "loss_rows")
    assert_close(d_pred, dp_ref, 1e-6, "d_pred")
    assert_close(d_target, dy_ref, 1e-6, "d_target")
    _, d_pred, d_target = nitp_rows_kernel(pred, target, valid, loss_type="mse",
                                           scale=torch.tensor(2.0, device=device), need_grad=True,
                                           need_target_grad=False)
    assert d_target is None and torch.allclose(d_pred, 2.0 * 2.0 * (pred - target) / 3)


def test_kernels_refuse_fp64_and_bad_arguments(device):
    x64 = torch.zeros(2, 4, dtype=torch.float64, device=device)
    one = torch.tensor(1.0, device=device)
    with pytest.raises(TypeError, match="logits"):
        cross_entropy_rows(x64, torch.zeros(2, dtype=torch.long, device=device), ignore_index=-100,
                           label_smoothing=0.0, softcap=None, z_loss_weight=0.0, ce_scale=one, z_scale=one,
                           need_grad=False)
    with pytest.raises(TypeError, match="gate_up"):
        swiglu_forward(x64)
    with pytest.raises(TypeError, match="pred"):
        nitp_rows_kernel(x64, x64, torch.ones(2, dtype=torch.bool, device=device), loss_type="mse", scale=one,
                         need_grad=False, need_target_grad=False)
    with pytest.raises(ValueError, match="loss_type"):
        nitp_rows_kernel(x64.float(), x64.float(), torch.ones(2, dtype=torch.bool, device=device), loss_type="l1",
                         scale=one, need_grad=False, need_target_grad=False)
    with pytest.raises(ValueError, match="gate_up"):
        swiglu_forward(torch.zeros(2, 5, device=device))
    with pytest.raises(TypeError, match="d_g"):
        swiglu_backward(torch.zeros(2, 3, dtype=torch.float16, device=device),
                        torch.zeros(2, 6, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="labels"):
        cross_entropy_rows(torch.zeros(2, 4, device=device), torch.zeros(3, dtype=torch.long, device=device),
                           ignore_index=-100, label_smoothing=0.0, softcap=None, z_loss_weight=0.0, ce_scale=one,
                           z_scale=one, need_grad=False)


def test_compile_specs_cover_every_launcher_config():
    """The compile gate compiles what the launchers launch: every config a launcher can pick is in its specs,
    and the config picked at the real vocabulary needs at most 8 iterations a pass."""
    ce_labels = {spec.label for spec in cross_entropy.compile_specs()}
    for vocab in (1, 2048, 8192, 8193, 32768, 32769, REAL_VOCAB):
        block, warps, _ = cross_entropy.config_for(vocab)
        for name in ("fp32", "bf16", "fp16"):
            assert f"cross_entropy[{name},BLOCK_V={block},warps={warps}]" in ce_labels
    assert triton.cdiv(REAL_VOCAB, cross_entropy.config_for(REAL_VOCAB)[0]) <= 8
    assert len(swiglu.compile_specs()) == 3 + 5  # forward per dtype; backward per (d_g, gate_up) dtype pair
    # (pred, target) dtypes: (fp32, fp32), and (X, X), (fp32, X) for X in bf16, fp16
    assert len(nitp_rows.compile_specs()) == 5  # loss_type is a runtime argument
