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
GPT-2 / nanoGPT, norm weights one. The values are drawn block of rows by block of rows from
generators seeded by (seed, parameter name, block), so a rank initialises its own shard of a
parameter without materialising the rest, and every world size gets the same weights
(engine/model/init.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TrainConfig
from engine.model.attention import DocumentMask, document_attention_path
from engine.model.init import fill_normal_rows, local_shard
from engine.model.layers import MLP, Attention, RMSNorm, rope_cos_sin
from engine.model.moe import MoE
from nitp_kernels import NITPProjector, fused_linear_cross_entropy, fused_nitp_loss


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
                doc_mask: DocumentMask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, doc_mask)
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
        doc_mask = None if doc_ids is None else DocumentMask(doc_ids).prepare(document_attention_path(x))
        aux_total = x.new_zeros((), dtype=torch.float32)
        for j, block in enumerate(self.layers, start=1):
            x, aux = block(x, cos, sin, doc_mask)
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
        """Initialise every parameter in place, shard by shard (engine/model/init.py).

        Meta parameters (a model built on ``torch.device("meta")`` before sharding) are left
        alone: the caller runs this again after ``to_empty``. The values depend on cfg.seed and
        the parameter's name only, not on the world size, the device mesh or the global RNG.
        """
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if p.dim() == 1:
                local_shard(p)[0].fill_(1.0)  # norm weights
            elif name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                fill_normal_rows(p, residual_std if "projector" not in name else std, self.cfg.seed, name)
            else:
                fill_normal_rows(p, std, self.cfg.seed, name)

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
