"""Shard-local parameter initialisation: the same weights for every world size.

A model built on ``torch.device("meta")`` and sharded by FSDP2 holds, on each rank, rows
[offset, offset + n) of every parameter (FSDP2 shards dim 0). To initialise that shard without
materialising the whole parameter, and to get the same values whatever the sharding, the rows
are cut into fixed blocks of about ``INIT_BLOCK_ELEMENTS`` values; block b of a parameter is
drawn from its own generator seeded by (seed, parameter name, b). A rank draws only the blocks
that overlap its rows (at most one block beyond them at each end), so its transient memory is
two blocks, and the result equals an unsharded initialisation bit for bit on the same device
type. (torchtitan relies on DTensor's offset-based CUDA RNG for the same property; this
scheme works on CPU too.)
"""

from __future__ import annotations

import zlib

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

INIT_BLOCK_ELEMENTS = 1 << 20


def local_shard(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's rows of p as a plain tensor sharing p's storage, index of its first row).

    A DTensor may be sharded on dim 0 (FSDP2) or replicated; anything else is refused, because
    the row-block scheme would no longer give sharding-independent values.
    """
    if not isinstance(p, DTensor):
        return p.data, 0
    if any(not isinstance(pl, (Shard, Replicate)) or (isinstance(pl, Shard) and pl.dim != 0)
           for pl in p.placements):
        raise ValueError(f"parameter placements {p.placements} are not supported: only Shard(0) and Replicate")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local(), int(offset[0]) if len(offset) else 0


def _block_seed(seed: int, name: str, block: int) -> int:
    key = f"{seed}:{name}:{block}".encode()
    return (zlib.crc32(key) << 32 | zlib.adler32(key)) & ((1 << 63) - 1)


@torch.no_grad()
def fill_normal_rows(p: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fill p (plain or a dim-0 shard) with normal(0, std) values that depend on (seed, name, row) only."""
    local, offset = local_shard(p)
    rows = local.shape[0]
    if rows == 0 or local.numel() == 0:
        return
    global_rows = p.shape[0]
    row_numel = local[0].numel()
    block = max(1, INIT_BLOCK_ELEMENTS // row_numel)
    for b in range(offset // block, (offset + rows - 1) // block + 1):
        start, stop = b * block, min((b + 1) * block, global_rows)
        gen = torch.Generator(device=local.device).manual_seed(_block_seed(seed, name, b))
        values = torch.empty((stop - start, *local.shape[1:]), device=local.device, dtype=torch.float32)
        values.normal_(0.0, std, generator=gen)
        lo, hi = max(start, offset), min(stop, offset + rows)
        local[lo - offset:hi - offset].copy_(values[lo - start:hi - start])


@torch.no_grad()
def copy_full_rows(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's rows of a full (CPU) tensor into p, plain or a dim-0 shard."""
    if tuple(full.shape) != tuple(p.shape):
        raise ValueError(f"shape {tuple(full.shape)} does not fit the parameter's {tuple(p.shape)}")
    local, offset = local_shard(p)
    local.copy_(full[offset:offset + local.shape[0]])
