"""The engine's CUDA paths, run by the GPU check (`pytest -m cuda tests/`, benchmarks/gpu_check.sh);
skipped, with the reason, where there is no CUDA device.

- document-masked attention: compiled FlexAttention with a document BlockMask and (when flash-attn
  is installed) flash_attn_varlen_func with cu_seqlens, each against per-document attention in
  fp32, forward and gradients, no worse than twice the error of the dense-mask SDPA path in bf16;
  the block mask of a T=8192 row is built without a T×T tensor;
- MoE experts: torch._grouped_mm against the per-expert loop (bf16, forward and gradients);
- meta-device initialisation on CUDA equals an unsharded model initialised on CUDA, and a training
  step with document masks runs;
- engine.plan's CUDA activation estimate against the bytes autograd saves on the GPU.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import make_config
from engine.model import DocumentMask, MoE, NITPTransformer, causal_attention, document_attention_path
from engine.model import attention as attention_module
from engine.model.moe import expert_swiglu_grouped, expert_swiglu_loop
from engine.parallel import close_distributed
from engine.plan import make_plan, saved_activation_bytes
from engine.trainer import build_state, next_batches, train_step

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU; the GPU check (benchmarks/gpu_check.sh) runs it")]
CUDA = torch.device("cuda")


def _doc_ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """Documents of random lengths (1 to ~T/3 tokens): boundaries inside and across 128-token blocks."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        ids, doc = [], 0
        while len(ids) < T:
            ids += [doc] * int(torch.randint(1, T // 3, (1,), generator=g))
            doc += 1
        rows.append(ids[:T])
    return torch.tensor(rows, dtype=torch.int32, device=CUDA)


def _per_document(q, k, v, doc):
    """fp32 truth: causal attention on each document alone (GQA by repeating k, v)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for d in doc[b].unique():
            idx = (doc[b] == d).nonzero().squeeze(1)
            out[b, :, idx] = F.scaled_dot_product_attention(q[b:b + 1, :, idx], k[b:b + 1, :, idx],
                                                            v[b:b + 1, :, idx], is_causal=True)[0]
    B, H, T, D = q.shape
    return out.transpose(1, 2).reshape(B, T, H * D)


def _run(fn, inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach().float()] + [x.grad.float() for x in leaves]


def _max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("path", ["flex", "flash_varlen"])
def test_document_attention_paths_match_per_document_attention(path):
    if path == "flash_varlen" and attention_module.flash_attn_varlen_func is None:
        pytest.skip("flash-attn is not installed on this machine (the engine then uses FlexAttention)")
    B, H, HKV, T, D = 2, 8, 2, 1024, 64
    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, generator=g, device=CUDA) for h in (H, HKV, HKV))
    grad_out = torch.randn(B, T, H * D, generator=g, device=CUDA)
    doc = _doc_ids(B, T)
    truth = _run(lambda q, k, v: _per_document(q, k, v, doc), (q, k, v), grad_out)
    bf16 = [x.bfloat16() for x in (q, k, v)]
    mask = DocumentMask(doc)
    dense = _run(lambda q, k, v: causal_attention(q, k, v, mask, path="sdpa_dense"), bf16, grad_out.bfloat16())
    got = _run(lambda q, k, v: causal_attention(q, k, v, mask, path=path), bf16, grad_out.bfloat16())
    for name, g_, d_, t_ in zip(("out", "dq", "dk", "dv"), got, dense, truth):
        assert _max_err(g_, t_) <= 2 * _max_err(d_, t_) + 1e-3 * t_.abs().max().item(), name
    assert document_attention_path(bf16[0]) in ("flash_varlen", "flex")  # never the dense mask on CUDA


def test_block_mask_of_a_long_row_needs_no_dense_mask():
    T = 8192
    doc = _doc_ids(1, T, seed=1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    DocumentMask(doc).block_mask()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < T * T // 4  # a dense bool mask is T*T bytes


def test_grouped_gemm_experts_match_the_per_expert_loop():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    E, d, h, n = 8, 256, 128, 1000
    g = torch.Generator(device=CUDA).manual_seed(0)
    counts = [300, 0, 1, 150, 249, 0, 200, 100]  # empty experts and a one-token expert included
    x = torch.randn(n, d, generator=g, device=CUDA)
    ws = [torch.randn(E, h, d, generator=g, device=CUDA) * 0.05, torch.randn(E, h, d, generator=g, device=CUDA) * 0.05,
          torch.randn(E, d, h, generator=g, device=CUDA) * 0.05]
    grad_out = torch.randn(n, d, generator=g, device=CUDA)
    truth = _run(lambda x, a, b, c: expert_swiglu_loop(x, counts, a, b, c), [x, *ws], grad_out)
    bf16 = [t.bfloat16() for t in (x, *ws)]
    loop = _run(lambda x, a, b, c: expert_swiglu_loop(x, counts, a, b, c), bf16, grad_out.bfloat16())
    grouped = _run(lambda x, a, b, c: expert_swiglu_grouped(x, counts, a, b, c), bf16, grad_out.bfloat16())
    for name, g_, l_, t_ in zip(("y", "dx", "dw_gate", "dw_up", "dw_down"), grouped, loop, truth):
        assert _max_err(g_, t_) <= 2 * _max_err(l_, t_) + 1e-3 * t_.abs().max().item(), name


def test_moe_block_grouped_and_loop_agree_in_bf16():
    cfg = make_config("tiny-moe", d_model=128, moe_ffn_hidden=96)
    outs = []
    for grouped in (True, False):
        moe = MoE(cfg, grouped_mm=grouped).to(CUDA)
        torch.manual_seed(0)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.05)
        moe = moe.bfloat16()  # as FSDP2's bf16 compute casts it
        x = torch.randn(4, 64, cfg.d_model, device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(1))
        y, balance = moe(x.bfloat16())
        outs.append((y.float(), balance.float()))
    torch.testing.assert_close(outs[0][1], outs[1][1])  # the same routing
    scale = outs[1][0].abs().max().item()
    assert _max_err(outs[0][0], outs[1][0]) <= 2e-2 * scale


def test_meta_init_on_cuda_and_a_document_masked_step(tmp_path):
    cfg = make_config("tiny", data="synthetic", vocab_size=256, seq_len=256, batch_size=4, doc_mask=True,
                      device="cuda", steps=2, out=str(tmp_path))
    state = build_state(cfg)
    try:
        with torch.device(CUDA):
            plain = NITPTransformer(state.cfg)
        for (name, p), q in zip(state.model.named_parameters(), plain.parameters()):
            assert torch.equal(p.full_tensor(), q), name
        metrics = train_step(state, next_batches(state))
        assert math.isfinite(metrics["loss"]) and abs(metrics["ce_loss"] - math.log(256)) < 0.5
    finally:
        close_distributed(state.dist)


def test_plan_cuda_activations_match_the_bytes_saved_on_the_gpu():
    # the plan's CUDA form counts Liger's RMSNorm / RoPE / SwiGLU (the engine's kernels when installed)
    pytest.importorskip("liger_kernel", reason="the plan's CUDA activations assume Liger-Kernel's kernels")
    cfg = make_config("tiny", vocab_size=4096, seq_len=512, micro_batch_size=2)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), device=CUDA)
    with torch.device(CUDA):
        model = NITPTransformer(cfg).bfloat16()
    measured = saved_activation_bytes(model, ids, ids)
    planned = make_plan(cfg, 1, kernels="cuda").activations
    assert abs(planned - measured) <= 0.1 * measured, (planned, measured)
