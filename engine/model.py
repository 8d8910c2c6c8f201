"""Decoder-only transformer (Llama / Qwen2 style) with an NITP output module.

Layout (names follow Hugging Face's LlamaForCausalLM so export is a rename-free copy)::

    NITPTransformer
      backbone: Backbone        embed_tokens -> layers[0..L-1] (Block: attention + MLP or MoE)
      output:   OutputHead      norm -> lm_head (+ projector) inside one fused loss call

Layer numbering as ``output_hidden_states``: hidden_states[0] is the embedding output and
hidden_states[j] the residual stream after block j. The backbone returns its last residual
stream (before the final norm) and hidden_states[k] for the NITP target layer k.

The output module applies the final norm and calls the fused op in its own ``forward`` so that
FSDP2 has the norm, LM head and projector unsharded during the call. It returns *sums* over
valid positions; the training loop divides by global counts (see engine/trainer.py).

Initialisation: every weight normal(0, init_std) (0.02), the residual output projections
(o_proj, down_proj, expert down projections) normal(0, init_std / sqrt(2 * n_layers)) as in
GPT-2 / nanoGPT, norm weights one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TrainConfig
from engine.moe import MoE
from nitp_kernels import NITPProjector, fused_linear_cross_entropy, fused_nitp_loss

try:  # pragma: no cover - flash-attn is a GPU-only extra
    from flash_attn import flash_attn_func
except Exception:
    flash_attn_func = None


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
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        if doc_ids is None and x.is_cuda and flash_attn_func is not None and x.dtype in (torch.bfloat16, torch.float16):
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return self.o_proj(y.reshape(B, T, -1))
        if doc_ids is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = causal & (doc_ids[:, :, None] == doc_ids[:, None, :])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm transformer block; returns (residual stream, MoE load-balancing loss or 0)."""

    def __init__(self, cfg: TrainConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe and layer_idx >= cfg.n_dense_layers
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, doc_ids)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, aux = self.mlp(h)
        else:
            out, aux = self.mlp(h), x.new_zeros((), dtype=torch.float32)
        return x + out, aux


class Backbone(nn.Module):
    """Embeddings and blocks. Returns (last residual stream, hidden_states[k], summed aux loss)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))

    def forward(self, input_ids: torch.Tensor, target_layer: int | None,
                doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(input_ids.shape[1], self.cfg.head_dim, self.cfg.rope_theta, x.device)
        shallow = x if target_layer == 0 else None
        aux_total = x.new_zeros((), dtype=torch.float32)
        for j, block in enumerate(self.layers, start=1):
            x, aux = block(x, cos, sin, doc_ids)
            aux_total = aux_total + aux
            if j == target_layer:
                shallow = x
        return x, shallow, aux_total


@dataclass
class OutputLosses:
    """Sums over this micro-batch's valid positions (see OutputHead.forward)."""

    loss: torch.Tensor      # ce_sum + aux_weight * aux_sum (+ z-loss): the only term with gradient
    ce_sum: torch.Tensor    # detached
    aux_sum: torch.Tensor   # detached: NITP loss sum (nitp) or per-sequence cosine sum (cosreg)


def mean_pairwise_cosine_per_sequence(h: torch.Tensor) -> torch.Tensor:
    """(B,) mean cosine similarity over ordered pairs i != j of positions in each sequence.

    With u_t = h_t / |h_t|: sum_{i != j} <u_i, u_j> = |sum_t u_t|^2 - T, in O(T d) memory.
    """
    T = h.shape[1]
    if T < 2:
        return h.new_zeros(h.shape[0], dtype=torch.float32)
    u = F.normalize(h.float(), dim=-1, eps=1e-6)
    s = u.sum(dim=1)
    return ((s * s).sum(-1) - T) / (T * (T - 1))


class OutputHead(nn.Module):
    """Final norm, LM head and NITP projector; its forward runs the (fused) loss.

    ``forward`` returns sums so that the caller can divide by global counts. ``aux_weight`` is
    the weight of the auxiliary sum relative to the CE sum: the loop passes
    λ·N_ce/N_nitp (nitp) or λ·N_ce/N_seq (cosreg) with global counts, then divides by N_ce.
    """

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.projector = (NITPProjector(cfg.d_model, hidden_mult=cfg.nitp_projector_mult)
                          if cfg.objective == "nitp" and cfg.nitp_projector else None)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None, shallow: torch.Tensor | None,
                aux_weight: float, mode: str) -> OutputLosses | torch.Tensor:
        """mode: "nitp" (fused NITP op), "ntp" (fused linear CE only), "cosreg", or "hidden"
        (no loss: the normed last hidden states, e.g. for geometry metrics)."""
        cfg = self.cfg
        h = self.norm(hidden)
        if mode == "hidden":
            return h
        if mode == "nitp":
            out = fused_nitp_loss(
                h, self.lm_head.weight, labels, shallow, self.projector, nitp_weight=aux_weight,
                loss_type=cfg.nitp_loss_type, shift=cfg.nitp_shift, stop_gradient=cfg.nitp_stop_gradient,
                reduction="sum", z_loss_weight=cfg.z_loss_weight, chunk_size=cfg.loss_chunk_size,
                backend=cfg.backend)
            return OutputLosses(out.loss, out.ce_loss.detach(), out.nitp_loss.detach())
        ce = fused_linear_cross_entropy(h, self.lm_head.weight, labels, reduction="sum",
                                        z_loss_weight=cfg.z_loss_weight, chunk_size=cfg.loss_chunk_size,
                                        backend=cfg.backend)
        ce_sum = ce.detach()
        if mode == "ntp":
            return OutputLosses(ce, ce_sum, ce_sum.new_zeros(()))
        if mode != "cosreg":
            raise ValueError(f"mode must be 'nitp', 'ntp', 'cosreg' or 'hidden', got {mode!r}")
        penalty = mean_pairwise_cosine_per_sequence(h).sum()
        return OutputLosses(ce + aux_weight * penalty.to(ce.dtype), ce_sum, penalty.detach())


class NITPTransformer(nn.Module):
    """Backbone + output module. ``forward`` returns loss sums and the MoE auxiliary loss."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.output = OutputHead(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norm weights
            elif name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                p.normal_(0.0, residual_std if "projector" not in name else std)
            else:
                p.normal_(0.0, std)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, aux_weight: float = 0.0,
                mode: str | None = None) -> tuple[OutputLosses | torch.Tensor, torch.Tensor]:
        """Returns (OutputLosses, summed MoE balance loss over MoE layers).

        mode None: the config's objective; "ntp" / "cosreg" / "nitp" force one; "hidden" returns the
        normed last hidden states instead of losses. Always call the model itself (not its
        submodules) under FSDP2, so that every parameter is unsharded when it is used.
        """
        mode = mode or self.cfg.objective
        target = self.cfg.nitp_layer if mode == "nitp" else None
        hidden, shallow, moe_aux = self.backbone(input_ids, target, doc_ids)
        return self.output(hidden, labels, shallow, aux_weight, mode), moe_aux

    def num_params(self, include_projector: bool = True) -> int:
        return sum(p.numel() for n, p in self.named_parameters()
                   if include_projector or not n.startswith("output.projector"))
