"""The transformer's building blocks, Llama / Qwen2 style: RMSNorm, RoPE, grouped-query attention,
the SwiGLU MLP. On CUDA, Liger-Kernel's fused RMSNorm / RoPE / SwiGLU and flash-attn are used when
installed; elsewhere the plain PyTorch forms below, which follow Hugging Face's numerics. The
attention kernels themselves (and the document-mask paths) are in engine/model/attention.py.

Imported by moe and transformer; it imports neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TrainConfig
from engine.model.attention import DocumentMask, causal_attention


class _Liger:
    """Liger-Kernel's RMSNorm / RoPE / SwiGLU functions, imported on first use with a CUDA tensor.

    Importing liger_kernel pulls in torch._dynamo (seconds of start-up per process); a CPU run never needs it.
    """

    loaded = False
    rms_norm = rope = silu_mul = None

    @classmethod
    def ready(cls, x: torch.Tensor) -> bool:
        if not x.is_cuda:
            return False
        if not cls.loaded:
            cls.loaded = True
            try:
                from liger_kernel.ops.rms_norm import LigerRMSNormFunction
                from liger_kernel.ops.rope import LigerRopeFunction
                from liger_kernel.ops.swiglu import LigerSiLUMulFunction
                cls.rms_norm, cls.rope, cls.silu_mul = LigerRMSNormFunction, LigerRopeFunction, LigerSiLUMulFunction
            except Exception:  # liger is optional
                pass
        return cls.rms_norm is not None


class RMSNorm(nn.Module):
    """RMSNorm as in Llama: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _Liger.ready(x):
            return _Liger.rms_norm.apply(x, self.weight, self.eps, 0.0, "llama", False)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, through Liger's fused kernel on CUDA."""
    if _Liger.ready(gate):
        return _Liger.silu_mul.apply(gate, up)
    return F.silu(gate) * up


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim) in Hugging Face's half-split layout (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, H, T, D) and k (B, Hkv, T, D) by position, HF's ``apply_rotary_pos_emb``."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    if _Liger.ready(q):
        return _Liger.rope.apply(q, k, cos[None], sin[None])
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE; optional block-diagonal document mask."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                doc_mask: DocumentMask | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        return self.o_proj(causal_attention(q, k, v, doc_mask))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
