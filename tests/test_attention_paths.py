"""Document-masked attention: the CPU path (SDPA with a dense mask) against FlexAttention's forward
(which runs eagerly on CPU) and against attention computed one document at a time. The CUDA paths
(flash-attn varlen, compiled FlexAttention) are compared in tests/test_engine_cuda.py."""

import pytest
import torch
import torch.nn.functional as F

from engine.model import DocumentMask, causal_attention, document_attention_path

B, H, HKV, T, D = 2, 4, 2, 40, 8


def _qkv(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g, dtype=dtype) for h in (H, HKV, HKV)]


def _doc_ids():
    doc = torch.zeros(B, T, dtype=torch.int32)
    doc[0, 7:] = 1
    doc[0, 30:] = 2          # three documents in row 0
    doc[1, 1:] = 5           # a one-token document, then one long one (ids need not be 0..n)
    return doc


def per_document_attention(q, k, v, doc):
    """Causal attention run separately on every document (keys/values repeated for GQA)."""
    k, v = k.repeat_interleave(H // HKV, dim=1), v.repeat_interleave(H // HKV, dim=1)
    out = torch.empty_like(q)
    for b in range(B):
        for d in doc[b].unique():
            idx = (doc[b] == d).nonzero().squeeze(1)
            out[b, :, idx] = F.scaled_dot_product_attention(q[b:b + 1, :, idx], k[b:b + 1, :, idx],
                                                            v[b:b + 1, :, idx], is_causal=True)[0]
    return out.transpose(1, 2).reshape(B, T, H * D)


def test_dense_mask_path_equals_per_document_attention():
    q, k, v = _qkv()
    doc = _doc_ids()
    got = causal_attention(q, k, v, DocumentMask(doc), path="sdpa_dense")
    torch.testing.assert_close(got, per_document_attention(q, k, v, doc), rtol=1e-12, atol=1e-12)
    assert document_attention_path(q) == "sdpa_dense"  # the CPU default


def test_flex_attention_forward_equals_dense_mask_path():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = _qkv(1, torch.float32)
    doc = _doc_ids()
    mask = DocumentMask(doc)
    with pytest.warns(UserWarning, match="without torch.compile"):  # eager on CPU: the unfused reference
        flex = causal_attention(q, k, v, mask, path="flex")
    dense = causal_attention(q, k, v, mask, path="sdpa_dense")
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flex.double(), per_document_attention(q.double(), k.double(), v.double(), doc),
                               rtol=1e-5, atol=1e-6)


def test_varlen_lengths_are_the_documents_and_missing_paths_are_refused():
    mask = DocumentMask(_doc_ids())
    cu, longest = mask.varlen()
    assert cu.tolist() == [0, 7, 30, 40, 41, 80] and longest == 39
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="attention path 'dense' is not one of"):
        causal_attention(q, k, v, mask, path="dense")
    with pytest.raises(ValueError, match=r"doc_ids must be \(B, T\)"):
        DocumentMask(torch.zeros(T))
