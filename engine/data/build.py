"""build_data: the one entry point of the engine's data pipeline.

    bundle = build_data(cfg, rank=rank, world_size=world_size)
    bundle.vocab_size                      # the model's vocabulary (cfg.vocab_size is set from it)
    bundle.info                            # "data_*" keys merged into the run's config.json
    batch = bundle.train.next_batch()      # input_ids, labels (and doc_ids with cfg.doc_mask)
    sd = bundle.train.state_dict()         # plain ints: JSON-able position; load_state_dict(sd) resumes
    for batch in bundle.val.batches(n): ...  # deterministic validation windows (bundle.val may be None)

Sources (cfg.data): "synthetic" (engine.data.synthetic: learnable bigram structure, for tests);
everything else ("stdlib", local files, Hugging Face names) is prepared once into memory-mapped
token files by engine.data.corpus. Packing, sharding and document masking: engine.data.loader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from engine.data.loader import DataError, PackedLoader, ValidationSet, split_documents
from engine.data.synthetic import SYNTHETIC_TOKENS, open_synthetic

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """What build_data returns; see the module docstring."""

    vocab_size: int
    eod_id: int
    info: dict[str, Any]
    train: PackedLoader
    val: ValidationSet | None


def _val_fraction(cfg: Any) -> float:
    return float(getattr(cfg, "val_fraction", 0.01))


def _check_args(cfg: Any, rank: int, world_size: int) -> None:
    for name in ("seq_len", "micro_batch_size"):
        value = getattr(cfg, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"cfg.{name} must be a positive int, got {value!r}")
    if not isinstance(getattr(cfg, "seed", None), int) or cfg.seed < 0:
        raise ValueError(f"cfg.seed must be an int >= 0, got {getattr(cfg, 'seed', None)!r}")
    if not isinstance(getattr(cfg, "data", None), str) or not cfg.data:
        raise TypeError(f"cfg.data must be a non-empty str, got {getattr(cfg, 'data', None)!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    split_documents(0, _val_fraction(cfg))  # validates val_fraction


def build_data(cfg: Any, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Open (preparing once if needed) cfg.data and return this rank's loaders."""
    _check_args(cfg, rank, world_size)
    if cfg.data == "synthetic":
        n_tokens = int(getattr(cfg, "synthetic_tokens", SYNTHETIC_TOKENS))
        train, val, vocab_size, eod_id, info = open_synthetic(cfg.vocab_size, n_tokens,
                                                              _val_fraction(cfg))
    else:
        from engine.data.corpus import open_prepared  # tokenizers/datasets only when real data is used
        train, val, vocab_size, eod_id, info = open_prepared(cfg, rank, world_size)
    need = world_size * cfg.micro_batch_size * cfg.seq_len + 1
    if train.n_tokens < need:
        raise DataError(
            f"--data {cfg.data!r}: the training split has {train.n_tokens} tokens, but one batch needs "
            f"{need} (world_size {world_size} x micro_batch_size {cfg.micro_batch_size} x seq_len "
            f"{cfg.seq_len} + 1). Use more data or a smaller seq_len / micro_batch_size.")
    doc_mask = bool(getattr(cfg, "doc_mask", False))
    loader = PackedLoader(train, cfg.seq_len, cfg.micro_batch_size, cfg.seed, rank, world_size,
                          doc_mask, eod_id)
    val_set = None
    if val is not None and val.n_tokens >= 2:
        val_set = ValidationSet(val, cfg.seq_len, cfg.micro_batch_size, rank, world_size, doc_mask,
                                eod_id)
    info = {**info, "data_n_windows_train": loader.n_windows,
            "data_n_windows_val": val_set.n_windows if val_set else 0, "data_doc_mask": doc_mask}
    if rank == 0:
        log.info("data %s: %d train tokens in %d windows of %d, %d val tokens, vocabulary %d",
                 cfg.data, train.n_tokens, loader.n_windows, cfg.seq_len,
                 val.n_tokens if val is not None else 0, vocab_size)
    return DataBundle(vocab_size=vocab_size, eod_id=eod_id, info=info, train=loader, val=val_set)
