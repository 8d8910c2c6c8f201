"""Causal self-attention kernels, with or without a document mask over packed sequences.

With ``--doc-mask`` a token attends only to earlier tokens of its own document. Three paths
compute that, chosen per call by ``document_attention_path`` (best first):

- ``flash_varlen``: flash-attn's ``flash_attn_varlen_func`` on the flattened (B·T) tokens with
  the documents' ``cu_seqlens`` (engine.data.doc_cu_seqlens): every document is its own causal
  sequence, nothing of size T×T exists. CUDA, bf16/fp16, flash-attn installed.
- ``flex``: PyTorch's FlexAttention (compiled) with a document BlockMask; blocks of 128×128 that
  the mask leaves empty are skipped, and no dense mask is materialised. CUDA.
- ``sdpa_dense``: scaled_dot_product_attention with a dense (B, 1, T, T) boolean mask. CPU, and
  the fallback; at T=8192 that is 64 MiB of mask per sequence and no flash kernel, which is why
  it is not used on CUDA.

``DocumentMask`` is built once per forward by the backbone and shared by all layers; the
backbone prepares the form its path needs before the first block (the block mask and cu_seqlens
cost a pass over the ids once per forward, not per layer, and never inside a compiled block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.data.loader import doc_cu_seqlens

try:  # pragma: no cover - flash-attn is a GPU-only extra
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except Exception:
    flash_attn_func = flash_attn_varlen_func = None

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch < 2.5
    BlockMask = create_block_mask = flex_attention = None

PATHS = ("flash_varlen", "flex", "sdpa_dense")
_compiled_flex = None


class DocumentMask:
    """(B, T) document ids of packed sequences, and the mask forms the attention paths need."""

    def __init__(self, doc_ids: torch.Tensor):
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be (B, T), got shape {tuple(doc_ids.shape)}")
        self.doc_ids = doc_ids
        self._varlen: tuple[torch.Tensor, int] | None = None
        self._block_mask = None

    def prepare(self, path: str) -> "DocumentMask":
        """Build the form `path` uses now, outside the blocks (so compiled blocks only read it)."""
        if path == "flash_varlen":
            self.varlen()
        elif path == "flex":
            self.block_mask()
        return self

    def dense(self) -> torch.Tensor:
        """(B, 1, T, T) bool: True where query t may attend to key s (s <= t, same document)."""
        T = self.doc_ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.doc_ids.device).tril()
        return (causal & (self.doc_ids[:, :, None] == self.doc_ids[:, None, :]))[:, None]

    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens int32 over the flattened tokens, longest document) for flash-attn."""
        if self._varlen is None:
            self._varlen = doc_cu_seqlens(self.doc_ids)
        return self._varlen

    def block_mask(self):
        """FlexAttention BlockMask of the same rule (built without a dense mask on CUDA)."""
        if self._block_mask is None:
            doc = self.doc_ids

            def same_document_causal(b, h, q, kv):
                return (q >= kv) & (doc[b, q] == doc[b, kv])

            B, T = doc.shape
            self._block_mask = create_block_mask(same_document_causal, B, None, T, T, device=doc.device,
                                                 _compile=doc.is_cuda)
        return self._block_mask


def document_attention_path(x: torch.Tensor) -> str:
    """The best document-mask path available for activations x (see the module docstring)."""
    if x.is_cuda and flash_attn_varlen_func is not None and x.dtype in (torch.bfloat16, torch.float16):
        return "flash_varlen"
    if x.is_cuda and flex_attention is not None:
        return "flex"
    return "sdpa_dense"


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    global _compiled_flex
    if not q.is_cuda:  # eager FlexAttention (tests on CPU): correct, but it materialises the scores
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    if _compiled_flex is None:  # compiled once: the fused kernel that skips empty blocks
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_mask: DocumentMask | None = None,
                     path: str | None = None) -> torch.Tensor:
    """Causal GQA attention of q (B, H, T, D) over k, v (B, Hkv, T, D) -> (B, T, H·D).

    ``doc_mask``: restrict each token to its own document. ``path``: force one of PATHS (tests
    compare them); None picks the best available.
    """
    B, H, T, D = q.shape
    if doc_mask is None:
        if q.is_cuda and flash_attn_func is not None and q.dtype in (torch.bfloat16, torch.float16):
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return y.reshape(B, T, H * D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return y.transpose(1, 2).reshape(B, T, H * D)
    path = path or document_attention_path(q)
    if path not in PATHS:
        raise ValueError(f"attention path {path!r} is not one of {PATHS}")
    if path == "flash_varlen":
        if flash_attn_varlen_func is None:
            raise RuntimeError("attention path 'flash_varlen' needs flash-attn, which is not installed")
        cu, max_len = doc_mask.varlen()
        # flash-attn's varlen layout: (total tokens, heads, head dim); GQA by the head counts
        y = flash_attn_varlen_func(q.transpose(1, 2).reshape(B * T, H, D),
                                   k.transpose(1, 2).reshape(B * T, k.shape[1], D),
                                   v.transpose(1, 2).reshape(B * T, v.shape[1], D),
                                   cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
                                   causal=True)
        return y.reshape(B, T, H * D)
    if path == "flex":
        if flex_attention is None:
            raise RuntimeError("attention path 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        y = _flex(q, k, v, doc_mask.block_mask())
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=doc_mask.dense(), enable_gqa=True)
    return y.transpose(1, 2).reshape(B, T, H * D)
