"""DeepSeek-V2-style mixture-of-experts feed-forward block.

    y = shared(x) + sum_{e in topk(x)} p_e(x) * expert_e(x)

- Router: softmax over the routed experts (fp32), top-k, weights = the top-k probabilities
  (not renormalised, as DeepSeek-V2).
- Shared experts are always active; n_shared experts of width h are one SwiGLU of width n·h.
- Routed experts run on the tokens routed to them only: token copies are sorted by expert and
  each expert multiplies its contiguous slice (torch._grouped_mm on CUDA when it is available,
  else one matmul per expert with tokens) — never every expert over every token. Outputs are
  un-permuted by index assignment and combined with a fixed-order sum over the k choices, so the
  result is deterministic (no scatter-add atomics).
- Load-balancing loss (DeepSeek-V2's expert-level balance loss, weight cfg.moe_aux_weight in the
  loop): sum_e f_e · P_e with f_e = E/(k·N) · tokens routed to e and P_e the mean router
  probability of e; it is 1 under perfectly uniform routing.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.layers import MLP

_GROUPED_MM_FAILED = False


def expert_swiglu_loop(x: torch.Tensor, counts: list[int], w_gate: torch.Tensor, w_up: torch.Tensor,
                       w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU of expert e over its slice of the expert-sorted tokens x; one matmul set per expert."""
    outs = []
    for e, xs in enumerate(torch.split(x, counts)):
        if xs.shape[0] == 0:
            continue
        outs.append((F.silu(xs @ w_gate[e].t()) * (xs @ w_up[e].t())) @ w_down[e].t())
    return torch.cat(outs) if outs else x.new_zeros(0, w_down.shape[1])


def expert_swiglu_grouped(x: torch.Tensor, counts: list[int], w_gate: torch.Tensor, w_up: torch.Tensor,
                          w_down: torch.Tensor) -> torch.Tensor:
    """The same with torch._grouped_mm: one grouped GEMM per projection over all experts."""
    offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    gate = torch._grouped_mm(x, w_gate.transpose(1, 2), offs=offs)
    up = torch._grouped_mm(x, w_up.transpose(1, 2), offs=offs)
    return torch._grouped_mm((F.silu(gate) * up).contiguous(), w_down.transpose(1, 2), offs=offs)


def _grouped_mm_serves(x: torch.Tensor, w_down: torch.Tensor) -> bool:
    # The CUDA kernel takes bf16 with 16-byte aligned rows; elsewhere the loop is as fast.
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and not _GROUPED_MM_FAILED and x.shape[-1] % 8 == 0 and w_down.shape[-1] % 8 == 0)


class MoE(nn.Module):
    """Shared + routed SwiGLU experts with top-k routing; forward returns (y, balance loss)."""

    def __init__(self, cfg, grouped_mm: bool | None = None):
        super().__init__()
        d, h, E = cfg.d_model, cfg.moe_ffn_hidden, cfg.n_experts
        self.n_experts, self.top_k = E, cfg.moe_top_k
        self.grouped_mm = grouped_mm  # None: decide per call (CUDA + bf16)
        self.router = nn.Linear(d, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, h, d))
        self.w_up = nn.Parameter(torch.empty(E, h, d))
        self.w_down = nn.Parameter(torch.empty(E, d, h))
        self.shared = None
        if cfg.n_shared_experts > 0:
            self.shared = MLP(d, cfg.n_shared_experts * cfg.shared_ffn_hidden)

    def _experts(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        global _GROUPED_MM_FAILED
        w_gate, w_up, w_down = (w.to(x.dtype) for w in (self.w_gate, self.w_up, self.w_down))
        use_grouped = self.grouped_mm if self.grouped_mm is not None else _grouped_mm_serves(x, w_down)
        if use_grouped:
            try:
                return expert_swiglu_grouped(x, counts, w_gate, w_up, w_down)
            except RuntimeError as exc:  # an unsupported GPU/shape: fall back, once, loudly
                if self.grouped_mm:
                    raise
                _GROUPED_MM_FAILED = True
                warnings.warn(f"torch._grouped_mm failed ({exc}); using the per-expert loop")
        return expert_swiglu_loop(x, counts, w_gate, w_up, w_down)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N, k, E = x.shape[0], self.top_k, self.n_experts
        probs = F.softmax(self.router(x).float(), dim=-1)               # (N, E)
        top_p, top_e = probs.topk(k, dim=-1)                             # (N, k)
        flat_e = top_e.reshape(-1)
        order = torch.argsort(flat_e, stable=True)                       # token copies by expert
        counts_t = torch.bincount(flat_e, minlength=E)
        counts = counts_t.tolist()
        y_sorted = self._experts(x[order // k], counts)
        y_flat = torch.empty_like(y_sorted)
        y_flat[order] = y_sorted                                         # back to (token, choice)
        y = (y_flat.view(N, k, -1) * top_p.unsqueeze(-1).to(x.dtype)).sum(dim=1)
        if self.shared is not None:
            y = y + self.shared(x)
        f = counts_t.to(torch.float32) * (E / (k * N))
        balance = (f * probs.mean(dim=0)).sum()
        return y.view(shape), balance
