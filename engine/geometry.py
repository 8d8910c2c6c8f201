"""Representation geometry during training (paper Appendix D), on a fixed sample of tokens.

Every ``--geometry-every`` steps the loop calls ``GeometryProbe.measure``: one no-grad forward of
the model on the same held-out tokens (windows spread over the validation split, else the
training split, read without moving the training loader), then

- eff_rank_last / avg_cos_last: effective rank and average pairwise cosine of the last hidden
  states after the final norm, as fed to the LM head (the model's mode="hidden");
- eff_rank_target / avg_cos_target: the same for hidden_states[k], k = cfg.nitp_layer (the NITP
  target; a collapse of the target would show here), captured by a forward hook;
- objective nitp only: ce_grad_norm / nitp_grad_norm, the norms of d(mean CE)/dh and
  d(mean NITP loss)/dh on the sample from the op's return_grad_norms, and grad_norm_ratio =
  ce / nitp (λ / ratio is the size of the λ-weighted NITP gradient relative to the CE one, for
  tuning λ).

Under FSDP every rank runs the forward (its collectives need all ranks) and the weight gathers;
the metrics are computed on rank 0's tokens and returned there only. The average cosine is the
exact mean over all pairs of distinct sampled tokens, the expectation of the paper's estimator
over randomly drawn pairs.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from engine.config import TrainConfig
from engine.data import IGNORE_INDEX, DataBundle, make_batch
from nitp_kernels import fused_nitp_loss
from nitp_kernels.geometry import average_cosine_similarity, effective_rank


def _full(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if isinstance(x, DTensor) else x


def fixed_sample(cfg: TrainConfig, data: DataBundle, rank: int,
                 world_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches holding at least cfg.geometry_tokens positions (same on every call).

    Windows spread evenly over the validation split (the training split when there is none), so
    the sample spans many documents, as the paper's mini-batches do; read straight from the token
    stream, so the training loader's position never moves. Every rank gets the same number of
    batches (the forwards hold collectives) and its own windows.
    """
    per_batch = cfg.micro_batch_size * cfg.seq_len
    n_batches = max(1, math.ceil(cfg.geometry_tokens / per_batch))
    source = data.val if data.val is not None else data.train
    stream = source.stream
    n_windows = max(1, (stream.n_tokens - 1) // cfg.seq_len)
    n_rows = n_batches * cfg.micro_batch_size
    spread = np.linspace(0, n_windows - 1, n_rows * world_size).round().astype(np.int64)
    mine = spread[rank * n_rows:(rank + 1) * n_rows] * cfg.seq_len
    return [make_batch(stream, mine[b * cfg.micro_batch_size:(b + 1) * cfg.micro_batch_size], cfg.seq_len,
                       source.doc_mask, source.pad_id)
            for b in range(n_batches)]


class GeometryProbe:
    """Holds the fixed sample for a run and measures its geometry (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, data: DataBundle, rank: int, device: torch.device,
                 world_size: int | None = None):
        self.cfg, self.rank, self.device = cfg, rank, device
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.batches = fixed_sample(cfg, data, rank, world_size)

    def _target_module(self, model: torch.nn.Module) -> torch.nn.Module:
        k = self.cfg.nitp_layer
        return model.backbone.embed_tokens if k == 0 else model.backbone.layers[k - 1]

    @torch.no_grad()
    def _forward(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normed last hidden, hidden_states[k], labels), micro-batches concatenated along B."""
        captured: list[torch.Tensor] = []

        def keep_output(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = self._target_module(model).register_forward_hook(keep_output)
        lasts, labels = [], []
        try:
            for batch in self.batches:
                b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                h, _ = model(b["input_ids"], None, b.get("doc_ids"), mode="hidden")
                lasts.append(h)
                labels.append(b["labels"])
        finally:
            handle.remove()
        if len(captured) != len(lasts):
            raise RuntimeError(f"the hidden_states[{self.cfg.nitp_layer}] hook fired {len(captured)} "
                               f"times for {len(lasts)} forwards")
        return torch.cat(lasts), torch.cat(captured), torch.cat(labels)

    def _grad_norms(self, model: torch.nn.Module, last: torch.Tensor, target: torch.Tensor,
                    labels: torch.Tensor) -> dict[str, float]:
        """CE and NITP parts of d hidden (mean reductions) from the op; collectives on all ranks."""
        cfg, head = self.cfg, model.output
        weight = _full(head.lm_head.weight).detach().to(last.dtype)
        projector = None
        if head.projector is not None:
            projector = tuple(_full(w).detach().to(last.dtype)
                              for w in (head.projector.w_gate, head.projector.w_up, head.projector.w_down))
        if self.rank != 0:
            return {}
        with torch.enable_grad():
            out = fused_nitp_loss(
                last.detach().requires_grad_(True), weight, labels, target.detach(), projector,
                loss_type=cfg.nitp_loss_type, shift=cfg.nitp_shift, stop_gradient=True, reduction="mean",
                z_loss_weight=cfg.z_loss_weight, chunk_size=cfg.loss_chunk_size, backend=cfg.backend,
                return_grad_norms=True)
        ce_norm, nitp_norm = float(out.ce_grad_norm), float(out.nitp_grad_norm)
        return {"ce_grad_norm": ce_norm, "nitp_grad_norm": nitp_norm,
                "grad_norm_ratio": ce_norm / nitp_norm if nitp_norm > 0 else math.inf}

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        """Geometry metrics on rank 0 ({} on other ranks); every rank must call it."""
        start = time.perf_counter()
        last, target, labels = self._forward(model)
        metrics: dict[str, float] = {}
        if self.cfg.objective == "nitp":
            metrics.update(self._grad_norms(model, last, target, labels))
        if self.rank != 0:
            return {}
        valid = (labels != IGNORE_INDEX).reshape(-1)
        rows_last = last.reshape(-1, last.shape[-1])[valid][: self.cfg.geometry_tokens]
        rows_target = target.reshape(-1, target.shape[-1])[valid][: self.cfg.geometry_tokens]
        if rows_last.shape[0] >= 2:  # a sample of padding only has no geometry
            metrics.update({
                "eff_rank_last": effective_rank(rows_last),
                "avg_cos_last": average_cosine_similarity(rows_last),
                "eff_rank_target": effective_rank(rows_target),
                "avg_cos_target": average_cosine_similarity(rows_target),
                "geometry_tokens": int(rows_last.shape[0]),
            })
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        metrics["geometry_seconds"] = time.perf_counter() - start
        return metrics
