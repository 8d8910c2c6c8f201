"""Training FLOPs per token, NTP and NITP (docs/DESIGN.md §6; the paper's Appendix G).

Two counts, both "training = 3 x forward" (forward 2 FLOPs per multiply-add, backward twice that):

- paper formula: NTP = L·(6·A + 18·d·F) + 6·V·d with A the attention parameters per layer
  (q, k, v, o projections from the config: 3·d² for the MoE presets' 8/4 heads) and F the active
  FFN width per token (k routed experts + shared experts, or the dense FFN), every layer counted
  alike; no attention scores, no router, no embedding lookup. NITP = 6·3·d·H + 18·d
  (projector of hidden width H = 4d: 72·d²; cosine loss 18·d).
- full count: every matmul of the config: the same projections, attention scores 12·h·q·T per
  token per layer at sequence length T (QKᵀ and AV, not halved for causality, as torchtitan and
  nanoGPT count), the router (6·d·E), the dense first layers at their own width, and the LM head.

The full count feeds MFU in the training loop.

    python -m engine.flops --preset moe-9b-a1b    # paper-formula NITP overhead: 2.33%
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from engine.config import TrainConfig


@dataclass(frozen=True)
class FlopsPerToken:
    ntp: float    # baseline next-token prediction training FLOPs per token
    nitp: float   # additional FLOPs of the NITP objective per token

    @property
    def overhead(self) -> float:
        return self.nitp / self.ntp


def attention_params(cfg: TrainConfig) -> int:
    """q, k, v and o projection parameters of one layer."""
    q = cfg.n_heads * cfg.head_dim
    kv = cfg.n_kv_heads * cfg.head_dim
    return cfg.d_model * q + 2 * cfg.d_model * kv + q * cfg.d_model


def active_moe_width(cfg: TrainConfig) -> int:
    """Summed hidden width of the experts a token passes through (routed top-k + shared)."""
    return cfg.moe_top_k * cfg.moe_ffn_hidden + cfg.n_shared_experts * cfg.shared_ffn_hidden


def nitp_flops(cfg: TrainConfig) -> float:
    """Projector (6 x its 3·d·H parameters; 0 without projector) plus the cosine loss (18·d)."""
    d = cfg.d_model
    projector = 6 * 3 * d * (cfg.nitp_projector_mult * d) if cfg.nitp_projector else 0
    return float(projector + 18 * d)


def paper_formula(cfg: TrainConfig) -> FlopsPerToken:
    """The paper's Appendix G estimate, with the attention term taken from the config."""
    d = cfg.d_model
    ffn = active_moe_width(cfg) if cfg.is_moe else cfg.ffn_hidden
    ntp = cfg.n_layers * (6 * attention_params(cfg) + 18 * d * ffn) + 6 * cfg.vocab_size * d
    return FlopsPerToken(float(ntp), nitp_flops(cfg))


def full_count(cfg: TrainConfig, seq_len: int | None = None) -> FlopsPerToken:
    """Every matmul, including attention scores at seq_len (default cfg.seq_len) and the router."""
    d, T = cfg.d_model, seq_len or cfg.seq_len
    total = 6 * cfg.vocab_size * d
    for layer in range(cfg.n_layers):
        total += 6 * attention_params(cfg) + 12 * cfg.n_heads * cfg.head_dim * T
        if cfg.is_moe and layer >= cfg.n_dense_layers:
            total += 18 * d * active_moe_width(cfg) + 6 * d * cfg.n_experts
        else:
            total += 18 * d * cfg.ffn_hidden
    return FlopsPerToken(float(total), nitp_flops(cfg))


def training_flops_per_token(cfg: TrainConfig, objective: str | None = None) -> float:
    """Full-count FLOPs per token of the given objective (for MFU)."""
    counts = full_count(cfg)
    return counts.ntp + (counts.nitp if (objective or cfg.objective) == "nitp" else 0.0)


def report(cfg: TrainConfig) -> str:
    paper, full = paper_formula(cfg), full_count(cfg)
    return "\n".join([
        f"preset {cfg.preset}: d={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads}/{cfg.n_kv_heads} "
        f"V={cfg.vocab_size} T={cfg.seq_len}"
        + (f" experts={cfg.n_experts} top-k={cfg.moe_top_k} shared={cfg.n_shared_experts}" if cfg.is_moe else ""),
        f"paper-formula FLOPs/token: NTP {paper.ntp:.3e}, NITP {paper.nitp:.3e}",
        f"paper-formula NITP overhead: {100 * paper.overhead:.2f}%",
        f"full-count FLOPs/token (every matmul: attention scores 12·L·h·q·T at T={cfg.seq_len}, "
        f"not halved for causality; router; dense first layers): NTP {full.ntp:.3e}, NITP {full.nitp:.3e}",
        f"full-count NITP overhead: {100 * full.overhead:.2f}%",
    ])


def main(argv: list[str] | None = None) -> None:
    from engine.config import parse_cli

    print(report(parse_cli(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
