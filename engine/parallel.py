"""Process group set-up and model parallelisation (torchtitan style: kept apart from the model).

Every run goes through FSDP2, also a single process (a world of one over an in-process store),
so there is one code path and parameters are always DTensors (what checkpoints will see).

Order, as torchtitan: activation checkpointing -> torch.compile -> fully_shard.
- each Block: its own FSDP unit (reshard after forward, except the last block, whose
  parameters backward needs at once);
- the output module (final norm, LM head, projector): one unit with reshard_after_forward=False,
  outside activation checkpointing (recomputing it would redo the whole fused loss);
- the root (embeddings): the model itself.

Meta-device initialisation (``build_model``, as torchtitan): the model is built on the meta
device, the three steps above are applied to it, then ``to_empty`` allocates each rank's shards
on the real device and ``init_weights`` fills them shard by shard (engine/model/init.py). No
rank ever holds a full parameter: a rank's peak is its shards plus a few init blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from engine.config import TrainConfig
from engine.model import NITPTransformer, load_hf_weights


@dataclass
class DistInfo:
    """Where this process sits: rank, world size, device and whether we own the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(cfg: TrainConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available")
    return cfg.device


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) or make a world of one."""
    device_type = resolve_device(cfg)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if "RANK" in os.environ:  # launched by torchrun: env:// rendezvous
            kwargs = {"device_id": device} if device_type == "cuda" else {}
            dist.init_process_group(backend, **kwargs)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def close_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """bf16 compute on CUDA by default (fp32 master weights and fp32 gradient reduction)."""
    if cfg.param_dtype == "bf16" or (cfg.param_dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def _checkpointed(forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    return run


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every block's activations in backward (not the output module's).

    The block's forward is replaced on the instance rather than the block wrapped in a module, so
    parameter names stay those of the model (checkpoints and export see no wrapper prefix).
    """
    for block in model.backbone.layers:
        block.forward = _checkpointed(block.forward)


def apply_compile(model: torch.nn.Module) -> None:
    """torch.compile each block in place (names and state-dict keys unchanged)."""
    for block in model.backbone.layers:
        block.compile()


def apply_fsdp(model: torch.nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype) -> None:
    """fully_shard per block, the output module as one unsharded-after-forward unit, then the root."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = model.backbone.layers
    for i, block in enumerate(layers):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model.output, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def parallelize(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo) -> torch.nn.Module:
    """Activation checkpointing, compile and FSDP2 as the config asks; returns the model."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    apply_fsdp(model, mesh, compute_dtype(cfg, info.device))
    return model


def build_model(cfg: TrainConfig, info: DistInfo,
                hf_weights: dict[str, torch.Tensor] | None = None) -> NITPTransformer:
    """The sharded, initialised model: built on meta, parallelised, then materialised shard by shard.

    ``hf_weights`` (a full CPU state dict from ``--init-from-hf``): each rank copies its rows of
    every imported parameter; the projector keeps its fresh initialisation.
    """
    with torch.device("meta"):
        model = NITPTransformer(cfg)
    parallelize(model, cfg, info)
    model.to_empty(device=info.device)
    model.init_weights()
    if hf_weights is not None:
        load_hf_weights(model, hf_weights)
    return model
