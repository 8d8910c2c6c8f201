"""The chunk loop's numeric contract beyond the option sweep: normalisations applied in fp32 (not folded into
fp16 gradients), the matmul plan (CUDA layout emulated on the CPU), autocast, out-of-range labels, the
valid-position rule and the chunk-size budget."""
import math

import pytest
import torch

import nitp_kernels.chunked as chunked
import nitp_kernels.matmuls as matmuls
from nitp_kernels import default_chunk_size, fused_linear_cross_entropy, fused_nitp_loss
from nitp_kernels.contract import valid_positions
from nitp_kernels.matmuls import MatmulPlan, matmul_dtype
from nitp_kernels.options import _check_labels_range
from nitp_kernels.torch_ops import TorchChunkOps

FP16_ON_CPU = MatmulPlan(torch.float16, torch.float32, fp32_result_kernel=False, accumulates_in_place=False)


@pytest.fixture
def cuda_layout(monkeypatch):
    """The loop's CUDA layout on the CPU: fp16 matmul operands and logits, fp32 results and buffers (the path of a
    torch without mm(out_dtype); the numerics of what the loop stores in fp16 are the same)."""
    monkeypatch.setattr(chunked, "matmul_plan", lambda device, dtype: FP16_ON_CPU)


def test_ce_weight_gradient_survives_fp16_where_folding_one_over_n_flushes_it(cuda_layout):
    n, vocab = 4096, 64
    # logits: 9.2 on the row's label, 0 elsewhere (h one-hot, W = 9.2·I), so every other class has p ~ 1e-4, a
    # normal fp16 number; folded into fp16 d logits, p/N ~ 2.4e-8 is below half the smallest fp16 subnormal and
    # rounds to 0: those classes would get no gradient at all
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    hidden = torch.nn.functional.one_hot(labels, vocab).half().requires_grad_()
    lm_weight = (9.2 * torch.eye(vocab)).half().float().requires_grad_()  # fp32 master weight, fp16-exact
    p_other = 1.0 / (math.exp(lm_weight[0, 0].item()) + vocab - 1)
    assert p_other > torch.finfo(torch.float16).tiny and torch.tensor(p_other / n).half() == 0
    loss = fused_linear_cross_entropy(hidden, lm_weight, labels, chunk_size=1024, backend="torch")
    loss.backward()
    truth_weight = lm_weight.detach().double().requires_grad_()
    fused_linear_cross_entropy(hidden.detach().double(), truth_weight, labels, backend="reference").backward()
    truth = truth_weight.grad
    err = (lm_weight.grad.double() - truth).abs().max() / truth.abs().max()
    assert err < 2e-3, f"d lm_weight relative error {err:.2e}"
    off_diagonal = ~torch.eye(vocab, dtype=torch.bool)
    assert torch.all(lm_weight.grad[off_diagonal] > 0), "classes other than the label must still be pushed down"


def test_projector_gradient_survives_fp16_where_folding_nitp_weight_over_n_flushes_it(cuda_layout):
    batch, seq, d, width, vocab, nitp_weight = 4, 1024, 8, 16, 16, 1e-4
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, seq, d, generator=gen).half().requires_grad_()
    shallow = torch.randn(batch, seq, d, generator=gen).half()
    lm_weight = (0.3 * torch.randn(vocab, d, generator=gen)).requires_grad_()
    projector = tuple((torch.randn(*shape, generator=gen) * shape[1] ** -0.5).requires_grad_()
                      for shape in ((width, d), (width, d), (d, width)))
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    options = dict(nitp_weight=nitp_weight, loss_type="mse")
    out = fused_nitp_loss(hidden, lm_weight, labels, shallow, projector, chunk_size=1024, backend="torch",
                          **options)
    out.loss.backward()
    # mse: d pred = 2 (p - y) / d, about 0.3 here; times nitp_weight / N_nitp it is below 2^-25 and rounds to 0
    # in fp16
    assert torch.tensor(0.3 * nitp_weight / (batch * (seq - 1)), dtype=torch.float16) == 0
    truth = [w.detach().double().requires_grad_() for w in projector]
    ref = fused_nitp_loss(hidden.detach().double(), lm_weight.detach().double(), labels, shallow.double(),
                          truth, backend="reference", **options)
    ref.loss.backward()
    for name, got, want in zip(("w_gate", "w_up", "w_down"), projector, truth):
        err = (got.grad.double() - want.grad).abs().max() / want.grad.abs().max()
        assert err < 2e-2, f"d {name} relative error {err:.2e}"


def _small_problem(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, seq, d, vocab, width = 2, 24, 16, 50, 24
    hidden = torch.randn(batch, seq, d, generator=gen, dtype=dtype, requires_grad=True)
    shallow = torch.randn(batch, seq, d, generator=gen, dtype=dtype)
    lm_weight = (torch.randn(vocab, d, generator=gen, dtype=dtype) * d ** -0.5).requires_grad_()
    projector = tuple((torch.randn(*shape, generator=gen, dtype=dtype) * shape[1] ** -0.5).requires_grad_()
                      for shape in ((width, d), (width, d), (d, width)))
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, 3] = -100
    return hidden, lm_weight, labels, shallow, projector


def _loss_and_grads(inputs, **options):
    hidden, lm_weight, labels, shallow, projector = inputs
    leaves = [hidden, lm_weight, *projector]
    for t in leaves:
        t.grad = None
    out = fused_nitp_loss(hidden, lm_weight, labels, shallow, projector, **options)
    out.loss.backward()
    return [out.loss.detach(), out.ce_loss, out.nitp_loss] + [t.grad.clone() for t in leaves]


def test_cuda_layout_matches_the_reference_within_fp16_rounding(cuda_layout):
    inputs = _small_problem()
    got = _loss_and_grads(inputs, chunk_size=7, backend="torch", z_loss_weight=0.01, label_smoothing=0.1)
    want = _loss_and_grads(inputs, backend="reference", z_loss_weight=0.01, label_smoothing=0.1)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 3e-3 * b.abs().max() + 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_on_cpu_changes_nothing(backend):
    """Under autocast the loop's matmuls take the autocast dtype (matmul_dtype) and run with autocast off; the CPU
    path upcasts matmul operands to fp32 anyway, so the results are those of the op without autocast, bitwise."""
    inputs = _small_problem()
    plain = _loss_and_grads(inputs, chunk_size=16, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul_dtype(inputs[0]) == torch.bfloat16
        cast = _loss_and_grads(inputs, chunk_size=16, backend=backend)
    for a, b in zip(plain, cast):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_matmul_dtype_follows_autocast_except_for_float64():
    x32, x64 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64)
    assert matmul_dtype(x32) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul_dtype(x32) == torch.bfloat16 and matmul_dtype(x64) == torch.float64


@pytest.mark.parametrize("version,kernels,in_place,fp32_result", [
    ("2.11.0+cu128", {"aten::mm.dtype_out", "aten::addmm.dtype_out"}, True, True),
    ("2.10.0a0+git1234", {"aten::mm.dtype_out", "aten::addmm.dtype_out"}, False, True),  # pre-release: unsure
    ("2.9.1+cu126", {"aten::mm.dtype_out", "aten::addmm.dtype_out"}, False, True),  # fp32 self refused
    ("2.7.1+cu126", set(), False, False),
])
def test_matmul_plan_is_decided_from_the_registry_and_version(monkeypatch, version, kernels, in_place,
                                                              fp32_result):
    monkeypatch.setattr(matmuls, "_has_cuda_kernel", lambda name: name in kernels)
    monkeypatch.setattr(torch, "__version__", version)
    plan = matmuls.matmul_plan.__wrapped__(torch.device("cuda", 0), torch.bfloat16)
    assert plan.operand_dtype == torch.bfloat16 and plan.result_dtype == torch.float32
    assert plan.accumulates_in_place is in_place and plan.fp32_result_kernel is fp32_result
    fp32 = matmuls.matmul_plan.__wrapped__(torch.device("cuda", 0), torch.float32)
    assert fp32.operand_dtype == fp32.result_dtype == torch.float32 and not fp32.accumulates_in_place


def test_cpu_plan_upcasts_and_is_decided_once():
    plan = matmuls.matmul_plan(torch.device("cpu"), torch.bfloat16)
    assert plan.operand_dtype == plan.result_dtype == torch.float32
    assert matmuls.matmul_plan(torch.device("cpu"), torch.bfloat16) is plan


def test_low_precision_plan_fallbacks_sum_in_fp32():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 32, generator=gen).half(), torch.randn(32, 16, generator=gen).half()
    want = a.double() @ b.double()
    out = torch.zeros(64, 16)
    FP16_ON_CPU.accumulate(out, a, b)
    FP16_ON_CPU.accumulate(out, a, b)
    assert out.dtype == torch.float32 and ((out.double() - 2 * want).abs().max() <= 2e-3 * want.abs().max())
    product = FP16_ON_CPU.product(a, b, out=torch.empty(64, 16))
    assert product.dtype == torch.float32 and ((product.double() - want).abs().max() <= 1e-3 * want.abs().max())


def test_out_of_range_labels_are_masked_by_the_torch_chunk_op():
    vocab = 7
    logits = torch.randn(4, vocab, dtype=torch.float64)
    labels = torch.tensor([2, vocab + 3, -7, -100])
    ce, z = torch.empty(4, dtype=torch.float64), torch.empty(4, dtype=torch.float64)
    grad = TorchChunkOps().cross_entropy(logits.clone(), labels, ignore_index=-100, label_smoothing=0.0,
                                         softcap=None, z_loss_weight=0.0, need_grad=True, ce_out=ce, z_out=z)
    assert torch.all(ce[1:] == 0) and torch.all(grad[1:] == 0) and ce[0] > 0


def test_cuda_label_check_is_one_device_assert_naming_labels(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: calls.append((cond, msg)))
    monkeypatch.delenv("NITP_KERNELS_DEBUG", raising=False)
    labels = torch.zeros(3, 5, dtype=torch.long, device="meta")  # not CPU: the device path, no value read back
    _check_labels_range(labels, vocab=152064, ignore_index=-100)
    (cond, msg), = calls
    assert cond.shape == () and cond.dtype == torch.bool
    assert "labels must be in [0, 152064) or equal ignore_index=-100" in msg and len(msg) < 255


@pytest.mark.parametrize("shift", [0, 1, 3, 5, 9])
def test_valid_positions_count_what_the_op_counts(shift):
    gen = torch.Generator().manual_seed(shift)
    labels = torch.randint(0, 4, (3, 5), generator=gen).masked_fill_(torch.rand(3, 5, generator=gen) < 0.3, -100)
    ce_valid, nitp_valid = valid_positions(labels, -100, shift)
    flat_ce, flat_nitp = valid_positions(labels.reshape(-1), -100, shift, seq_len=5)
    assert torch.equal(flat_ce, ce_valid.reshape(-1)) and torch.equal(flat_nitp, nitp_valid.reshape(-1))
    # the rule written out: a label, and the target t + shift inside the sequence (none when shift >= T)
    assert int(nitp_valid.sum()) == int((labels != -100)[:, : max(5 - shift, 0)].sum())
    if shift < 5:  # the op refuses shift >= T
        hidden = torch.randn(3, 5, 4, dtype=torch.float64)
        for backend in ("reference", "torch"):
            out = fused_nitp_loss(hidden, torch.randn(4, 4, dtype=torch.float64), labels, hidden, None,
                                  shift=shift, backend=backend)
            assert int(out.n_ce) == int(ce_valid.sum()) and int(out.n_nitp) == int(nitp_valid.sum())


def test_default_chunk_size_budget():
    # the paper's shape: at least 1024 rows, the bf16 logits chunk no larger than the fp32 V x d gradient buffer
    n, d, vocab = 16384, 1280, 152064
    rows = default_chunk_size(n, d, vocab, torch.bfloat16)
    assert rows >= 1024 and rows * vocab * 2 <= vocab * d * 4
    for d, dtype in [(512, torch.float32), (1280, torch.float32), (2560, torch.bfloat16), (256, torch.float32)]:
        rows = default_chunk_size(1 << 20, d, vocab, dtype)
        assert rows >= chunked.MIN_CHUNK_ROWS and rows * dtype.itemsize <= 4 * d and rows & (rows - 1) == 0
    assert default_chunk_size(300, 4096, 32000, torch.float32) == 300  # never more rows than there are
    assert default_chunk_size(50000, 8, 32000, torch.float32) == chunked.MIN_CHUNK_ROWS
    nitp_rows = chunked.nitp_chunk_size(n, 1280, 5120, vocab)
    assert nitp_rows >= default_chunk_size(n, 1280, vocab, torch.bfloat16)
    assert nitp_rows * (8 * 5120 + 4 * 1280) * 4 <= vocab * 1280 * 4


def test_cuda_plan_calls_bind_on_meta_tensors():
    """The CUDA-only overloads (mm/addmm with out_dtype, out=) have meta kernels: the calls the CUDA plan makes
    bind, keep fp32 results and write into the given buffers, checked here without a GPU."""
    plan = MatmulPlan(torch.bfloat16, torch.float32, fp32_result_kernel=True, accumulates_in_place=True)
    a = torch.empty(64, 32, dtype=torch.bfloat16, device="meta")
    b = torch.empty(32, 16, dtype=torch.bfloat16, device="meta")
    out = torch.empty(64, 16, dtype=torch.float32, device="meta")
    assert plan.product(a, b).dtype == torch.float32 and plan.product(a, b, out=out) is out
    plan.accumulate(out, a, b, first=True)
    plan.accumulate(out, a, b)
    without_in_place = MatmulPlan(torch.bfloat16, torch.float32, fp32_result_kernel=True, accumulates_in_place=False)
    without_in_place.accumulate(out, a, b)
    assert out.dtype == torch.float32 and out.shape == (64, 16)
