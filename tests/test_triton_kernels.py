"""Each Triton kernel against PyTorch on awkward shapes, under TRITON_INTERPRET=1 on CPU (tests/conftest.py).

Shapes are chosen against the kernels' tiling: rows not a multiple of anything, a single row, d and V not powers
of two and (for V) larger than one vocabulary block of the small-V config, so the online softmax crosses blocks.
The PyTorch side computes the same formulas in fp64 from the same (rounded) inputs, so the only differences left
are the kernels' fp32 arithmetic and the final rounding to the storage dtype.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nitp_kernels.kernels import cross_entropy, nitp_rows, swiglu
from nitp_kernels.kernels.cross_entropy import cross_entropy_rows
from nitp_kernels.kernels.nitp_rows import nitp_rows as nitp_rows_kernel
from nitp_kernels.kernels.swiglu import swiglu_backward, swiglu_forward

# relative tolerance of a result stored in each dtype (fp32 results: fp32 arithmetic over up to ~1e3 terms)
STORE_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str) -> None:
    """max |actual - expected| <= rel * max(|expected|, tiny): a per-tensor relative error, as DESIGN.md uses."""
    err = (actual.double() - expected.double()).abs().max().item()
    bound = rel * max(expected.double().abs().max().item(), 1e-12)
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


def ce_truth(x: torch.Tensor, labels: torch.Tensor, ignore_index: int, eps: float, softcap, z_w: float,
             ce_scale: float, z_scale: float):
    """Per-row ce and z and the gradient of ce_scale*sum(ce) + z_w*z_scale*sum(z), by fp64 autograd."""
    x = x.double().requires_grad_()
    s = softcap * torch.tanh(x / softcap) if softcap else x
    valid = labels != ignore_index
    ce = F.cross_entropy(s, labels, ignore_index=ignore_index, label_smoothing=eps, reduction="none")
    z = torch.where(valid, torch.logsumexp(s, -1) ** 2, 0.0)
    (ce_scale * ce.sum() + z_w * z_scale * z.sum()).backward()
    return ce.detach(), z.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_rows,vocab,eps,softcap,z_w", [
    (7, 1000, 0.0, None, 0.0),     # V crosses one 512-lane block, rows odd
    (1, 777, 0.1, 5.0, 1e-2),      # a single row, smoothing + softcap + z-loss
    (5, 8195, 0.05, None, 1e-3),   # V just above the small-V bound: the 4096-lane config, three blocks
])
def test_cross_entropy_kernel(dtype, n_rows, vocab, eps, softcap, z_w):
    gen = torch.Generator().manual_seed(n_rows * vocab)
    logits = (3 * torch.randn(n_rows, vocab, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab, (n_rows,), generator=gen)
    if n_rows > 2:
        labels[1] = -100
    ce_scale, z_scale = 1.0 / max(1, int((labels != -100).sum())), 0.5
    ce_ref, z_ref, grad_ref = ce_truth(logits, labels, -100, eps, softcap, z_w, ce_scale, z_scale)
    work = logits.clone()
    ce_rows, z_rows = cross_entropy_rows(
        work, labels, ignore_index=-100, label_smoothing=eps, softcap=softcap, z_loss_weight=z_w,
        ce_scale=torch.tensor(ce_scale), z_scale=torch.tensor(z_scale), need_grad=True)
    assert ce_rows.dtype == torch.float32 and z_rows.dtype == torch.float32
    assert_close(ce_rows, ce_ref, 1e-5, "ce_rows")
    assert_close(z_rows, z_ref, 1e-5, "z_rows")
    assert_close(work, grad_ref, STORE_TOL[dtype] + 1e-5, "d logits (in place)")
    assert torch.all(work[labels == -100] == 0)
    # without need_grad the logits are left untouched and the losses are the same, bitwise
    again = logits.clone()
    ce2, z2 = cross_entropy_rows(
        again, labels, ignore_index=-100, label_smoothing=eps, softcap=softcap, z_loss_weight=z_w,
        ce_scale=torch.tensor(ce_scale), z_scale=torch.tensor(z_scale), need_grad=False)
    assert torch.equal(again, logits) and torch.equal(ce2, ce_rows) and torch.equal(z2, z_rows)


def test_cross_entropy_large_logits_and_all_ignored():
    """Online softmax must survive scores far from 0 (no overflow), and an all-ignored chunk is all zeros."""
    logits = torch.tensor([[1000.0, 990.0, -1000.0], [-500.0, -505.0, -499.0]])
    labels = torch.tensor([0, 1])
    ce_ref, z_ref, grad_ref = ce_truth(logits, labels, -1, 0.0, None, 1e-4, 1.0, 1.0)
    work = logits.clone()
    ce_rows, z_rows = cross_entropy_rows(work, labels, ignore_index=-1, label_smoothing=0.0, softcap=None,
                                         z_loss_weight=1e-4, ce_scale=torch.tensor(1.0), z_scale=torch.tensor(1.0),
                                         need_grad=True)
    assert torch.isfinite(work).all()
    assert_close(ce_rows, ce_ref, 1e-6, "ce_rows")
    assert_close(z_rows, z_ref, 1e-6, "z_rows")
    assert_close(work, grad_ref, 1e-5, "d logits")
    work = logits.clone()
    ce_rows, z_rows = cross_entropy_rows(work, torch.full((2,), -1), ignore_index=-1, label_smoothing=0.1,
                                         softcap=2.0, z_loss_weight=1.0, ce_scale=torch.tensor(1.0),
                                         z_scale=torch.tensor(1.0), need_grad=True)
    assert not ce_rows.any() and not z_rows.any() and not work.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_rows,width,fp32_d_g", [(1, 5, False), (6, 1030, False), (6, 1030, True)])
def test_swiglu_kernels(dtype, n_rows, width, fp32_d_g):
    """1030: two 1024-lane blocks, the 2nd ragged. fp32_d_g: the chunk loop's fp32-accumulated d_g is read as is."""
    gen = torch.Generator().manual_seed(width)
    gate_up = (2 * torch.randn(n_rows, 2 * width, generator=gen)).to(dtype)
    d_g = torch.randn(n_rows, width, generator=gen).to(torch.float32 if fp32_d_g else dtype)
    a, b = gate_up.double().chunk(2, dim=-1)
    a.requires_grad_()
    b.requires_grad_()
    g_ref = F.silu(a) * b
    g_ref.backward(d_g.double())
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
def test_nitp_rows_kernel(pred_dtype, dtype, loss_type):
    """d = 600: two 512-lane blocks, the second ragged; the target is a strided view (every other row)."""
    n_rows, dim = 5, 600
    gen = torch.Generator().manual_seed(7)
    pred = torch.randn(n_rows, dim, generator=gen).to(pred_dtype)
    shallow = (1.5 * torch.randn(2 * n_rows, dim, generator=gen)).to(dtype)
    target = shallow[::2]  # row stride 2*dim: read in place, never copied
    valid = torch.tensor([True, False, True, True, True])
    rows_ref, dp_ref, dy_ref = nitp_truth(pred, target, valid, loss_type, 0.3)
    loss_rows, d_pred, d_target = nitp_rows_kernel(pred, target, valid, loss_type=loss_type,
                                                   scale=torch.tensor(0.3), need_grad=True, need_target_grad=True)
    assert loss_rows.dtype == d_pred.dtype == d_target.dtype == torch.float32
    assert_close(loss_rows, rows_ref, 1e-5, "loss_rows")
    assert_close(d_pred, dp_ref, 1e-5, "d_pred")
    assert_close(d_target, dy_ref, 1e-5, "d_target")
    assert not d_pred[1].any() and not d_target[1].any() and loss_rows[1] == 0
    rows_only, none_p, none_y = nitp_rows_kernel(pred, target, valid, loss_type=loss_type,
                                                 scale=torch.tensor(0.3), need_grad=False, need_target_grad=False)
    assert none_p is None and none_y is None and torch.equal(rows_only, loss_rows)


def test_nitp_rows_single_row_and_zero_vectors():
    """One row, d = 3; cosine with a zero prediction (clamped norm: finite, derivative term dropped)."""
    pred = torch.zeros(1, 3)
    target = torch.tensor([[1.0, -2.0, 0.5]])
    valid = torch.tensor([True])
    rows_ref, dp_ref, dy_ref = nitp_truth(pred, target, valid, "cosine", 1.0)
    loss_rows, d_pred, d_target = nitp_rows_kernel(pred, target, valid, loss_type="cosine",
                                                   scale=torch.tensor(1.0), need_grad=True, need_target_grad=True)
    assert_close(loss_rows, rows_ref, 1e-6, "loss_rows")
    assert_close(d_pred, dp_ref, 1e-6, "d_pred")
    assert_close(d_target, dy_ref, 1e-6, "d_target")
    _, d_pred, d_target = nitp_rows_kernel(pred, target, valid, loss_type="mse", scale=torch.tensor(2.0),
                                           need_grad=True, need_target_grad=False)
    assert d_target is None and torch.allclose(d_pred, 2.0 * 2.0 * (pred - target) / 3)


def test_kernels_refuse_fp64_and_bad_arguments():
    x64 = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="logits"):
        cross_entropy_rows(x64, torch.zeros(2, dtype=torch.long), ignore_index=-100, label_smoothing=0.0,
                           softcap=None, z_loss_weight=0.0, ce_scale=torch.tensor(1.0), z_scale=torch.tensor(1.0),
                           need_grad=False)
    with pytest.raises(TypeError, match="gate_up"):
        swiglu_forward(x64)
    with pytest.raises(TypeError, match="pred"):
        nitp_rows_kernel(x64, x64, torch.ones(2, dtype=torch.bool), loss_type="mse", scale=torch.tensor(1.0),
                         need_grad=False, need_target_grad=False)
    with pytest.raises(ValueError, match="loss_type"):
        nitp_rows_kernel(x64.float(), x64.float(), torch.ones(2, dtype=torch.bool), loss_type="l1",
                         scale=torch.tensor(1.0), need_grad=False, need_target_grad=False)
    with pytest.raises(ValueError, match="gate_up"):
        swiglu_forward(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="d_g"):
        swiglu_backward(torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 6, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="labels"):
        cross_entropy_rows(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long), ignore_index=-100,
                           label_smoothing=0.0, softcap=None, z_loss_weight=0.0, ce_scale=torch.tensor(1.0),
                           z_scale=torch.tensor(1.0), need_grad=False)


def test_compile_specs_cover_every_launcher_config():
    """The compile gate compiles what the launchers launch: every config a launcher can pick is in its specs."""
    ce_labels = {spec.label for spec in cross_entropy.compile_specs()}
    for vocab in (1, 512, 8192, 8193, 152064):
        block, warps = cross_entropy._ce_config(vocab)
        for name in ("fp32", "bf16", "fp16"):
            assert f"cross_entropy[{name},BLOCK_V={block},warps={warps}]" in ce_labels
    assert len(swiglu.compile_specs()) == 3 + 5  # forward per dtype; backward per (d_g, gate_up) dtype pair
    # (pred, target) dtypes: (fp32, fp32), and (X, X), (fp32, X) for X in bf16, fp16
    assert len(nitp_rows.compile_specs()) == 5  # loss_type is a runtime argument
