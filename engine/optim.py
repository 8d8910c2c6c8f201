"""AdamW with the paper's recipe and a warmup–stable–decay (WSD) learning-rate schedule."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from engine.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW(beta1, beta2), weight decay on matrices and embeddings only (not norms), as nanoGPT."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = any(p.is_cuda for p in decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=True if on_cuda else None)


def wsd_factor(step: int, total_steps: int, warmup_steps: int, decay_ratio: float,
               min_lr_ratio: float = 0.0) -> float:
    """LR multiplier at 0-based `step`: linear warmup to 1, constant, then a linear decay over the
    last decay_ratio·total_steps steps towards min_lr_ratio (the lower of the two ramps applies)."""
    warm = (step + 1) / warmup_steps if warmup_steps > 0 else 1.0
    decay_steps = round(decay_ratio * total_steps)
    decay = 1.0
    if decay_steps > 0 and step >= total_steps - decay_steps:
        progress = (step - (total_steps - decay_steps)) / decay_steps
        decay = 1.0 - (1.0 - min_lr_ratio) * progress
    return min(1.0, warm, decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, start_step: int = 0) -> LambdaLR:
    """WSD schedule stepped once per optimizer step; lr at step s is cfg.lr · wsd_factor(s).

    start_step > 0 (a resumed run): the schedule of this cfg, positioned at that step, with the
    base lr taken from each parameter group's ``initial_lr`` (set to cfg.lr when first built).
    """
    return LambdaLR(optimizer, lambda s: wsd_factor(s, cfg.steps, cfg.warmup_steps, cfg.decay_ratio,
                                                    cfg.min_lr_ratio), last_epoch=start_step - 1)
