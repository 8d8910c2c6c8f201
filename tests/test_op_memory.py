"""The memory contract of docs/DESIGN.md §3: what the fused op keeps for backward is exactly the gradient
buffers (d hidden, d lm_weight, the projector's weight gradients) plus at most 1 MiB, counted by storage through
saved-tensor hooks; evaluation keeps nothing."""
import pytest
import torch

from nitp_kernels import NITPProjector, fused_linear_cross_entropy, fused_nitp_loss


def _saved_bytes(fn):
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_tensors_are_the_gradient_buffers(dtype):
    n, d, vocab, seq = 4096, 256, 32000, 512
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    shallow = torch.randn(n, d, generator=gen).to(dtype)
    lm_weight = (torch.randn(vocab, d, generator=gen) * d ** -0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    projector = NITPProjector(d, dtype=dtype)

    saved, out = _saved_bytes(lambda: fused_nitp_loss(hidden, lm_weight, labels, shallow, projector,
                                                      seq_len=seq, backend="torch"))
    element = torch.finfo(dtype).bits // 8
    gradient_buffers = (n * d + vocab * d + 12 * d * d) * element
    assert gradient_buffers <= saved <= gradient_buffers + 2**20, (saved, gradient_buffers)
    out.loss.backward()
    assert hidden.grad.dtype == dtype and torch.isfinite(hidden.grad.float()).all()

    # plain cross-entropy keeps d hidden and d lm_weight only
    hidden.grad = lm_weight.grad = None
    saved, loss = _saved_bytes(lambda: fused_linear_cross_entropy(hidden, lm_weight, labels, backend="torch"))
    assert (n * d + vocab * d) * element <= saved <= (n * d + vocab * d) * element + 2**20


def test_evaluation_keeps_nothing_and_builds_no_graph():
    d, vocab = 16, 50
    hidden, shallow = torch.randn(2, 9, d), torch.randn(2, 9, d)
    lm_weight, labels = torch.randn(vocab, d), torch.randint(0, vocab, (2, 9))
    projector = NITPProjector(d)
    with torch.no_grad():
        saved, out = _saved_bytes(lambda: fused_nitp_loss(hidden, lm_weight, labels, shallow, projector))
    assert saved == 0 and out.loss.grad_fn is None
    projector.requires_grad_(False)
    saved, out = _saved_bytes(lambda: fused_nitp_loss(hidden, lm_weight, labels, shallow, projector))
    assert saved == 0 and out.loss.grad_fn is None
    reference = fused_nitp_loss(hidden, lm_weight, labels, shallow, projector, backend="reference")
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-5, atol=1e-6)
