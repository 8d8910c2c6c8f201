"""Run torchtitan 0.3.0's Trainer on CPU with gloo: for tests, demos and debugging without a GPU.

torchtitan targets accelerators. Four things stop its Trainer on a CPU-only machine, and `use_cpu()` replaces
exactly those, process-wide:

- `torchtitan.tools.utils.get_device_info()` falls back to "cuda" when no accelerator is found, and several
  modules copy its `device_type` / `device_module` at import: they are set to "cpu" / `torch.cpu`.
- `DeviceMemoryMonitor` asks the device module for its name, capacity and memory statistics, which `torch.cpu`
  does not have: a stand-in reports the machine's memory and the process's peak resident set size.
- `set_pg_timeouts` calls `barrier(device_ids=...)`, which gloo refuses: the stand-in calls a plain barrier.
- torchtitan turns FSDP's gradient division off (factor 1.0), which FSDP2 implements with PREMUL_SUM, a
  reduce op gloo lacks: FSDP is told to reduce with plain SUM (the same result, the factor being 1).

`sdpa_attention(model_config)` swaps FlexAttention (no CPU backward) for scaled_dot_product_attention in a
model config. Nothing here changes the numerics of a run.
"""
from __future__ import annotations

import os
import resource
import sys
from datetime import timedelta
from typing import Any

import torch

# Modules of torchtitan 0.3.0 that bind `device_type` / `device_module` from torchtitan.tools.utils at import.
_DEVICE_BINDING_MODULES = ("torchtitan.tools.utils", "torchtitan.distributed.utils", "torchtitan.components.metrics",
                           "torchtitan.distributed.parallel_dims", "torchtitan.models.common.token_dispatcher",
                           "torchtitan.tools.profiler", "torchtitan.components.validate")


def use_cpu() -> None:
    """Make torchtitan's Trainer run on CPU (gloo). Idempotent; call before building a Trainer."""
    import importlib

    for name in _DEVICE_BINDING_MODULES:
        module = importlib.import_module(name)
        for attr, value in (("device_type", "cpu"), ("device_module", torch.cpu)):
            if hasattr(module, attr):
                setattr(module, attr, value)

    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.fsdp as fsdp
    import torchtitan.distributed.utils as dist_utils

    metrics.DeviceMemoryMonitor = _CPUMemoryMonitor
    dist_utils.set_pg_timeouts = _set_pg_timeouts
    if not getattr(fsdp.disable_fsdp_gradient_division, "_nitp_sum_reduction", False):
        fsdp.disable_fsdp_gradient_division = _sum_reduction(fsdp.disable_fsdp_gradient_division)


def sdpa_attention(model_config: Any) -> Any:
    """Replace every FlexAttention / Varlen config in `model_config` by ScaledDotProductAttention (causal).

    SDPA takes no document mask, so packed documents attend across their boundaries, as torchtitan's own
    SDPA configurations do. Returns model_config (changed in place).
    """
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention, VarlenAttention

    for config_cls in (FlexAttention.Config, VarlenAttention.Config):
        for _, _, parent, attr in list(model_config.traverse(config_cls)):
            if isinstance(parent, list):
                parent[attr] = ScaledDotProductAttention.Config()
            else:
                setattr(parent, attr, ScaledDotProductAttention.Config())
    return model_config


def _sum_reduction(disable_division: Any) -> Any:
    def disable_division_with_sum(model: torch.nn.Module) -> None:
        from torch.distributed._composable.fsdp import FSDPModule

        disable_division(model)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)

    disable_division_with_sum._nitp_sum_reduction = True
    return disable_division_with_sum


def _set_pg_timeouts(timeout: timedelta, parallel_dims: Any) -> None:
    torch.distributed.barrier()
    groups = [mesh.get_group() for mesh in parallel_dims.get_all_one_dimensional_meshes().values()] + [None]
    for group in groups:
        torch.distributed.distributed_c10d._set_pg_timeout(timeout, group)  # set_timeout is not public in torch 2.13


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class _CPUMemoryMonitor:
    """DeviceMemoryMonitor's interface for CPU: capacity = physical memory, peak = the process's peak RSS."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device("cpu")
        self.device_name = "cpu"
        self.device_index = 0
        self.device_capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.device_capacity_gib = self.device_capacity / 2**30

    def get_peak_stats(self) -> Any:
        from torchtitan.components.metrics import DeviceMemStats

        peak = _peak_rss_bytes()
        gib, pct = peak / 2**30, 100 * peak / self.device_capacity
        return DeviceMemStats(gib, pct, gib, pct, 0, 0)

    def reset_peak_stats(self) -> None:
        pass  # the peak RSS of a process cannot be reset


__all__ = ["use_cpu", "sdpa_attention"]
