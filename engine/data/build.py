"""build_data: the one entry point of the engine's data pipeline.

    bundle = build_data(cfg, rank=rank, world_size=world_size)   # a TrainConfig or a DataConfig
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
from typing import TYPE_CHECKING, Any

from engine.data.config import DataConfig, DataError
from engine.data.loader import PackedLoader, ValidationSet, split_documents
from engine.data.synthetic import open_synthetic

if TYPE_CHECKING:
    from engine.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """What build_data returns; see the module docstring."""

    vocab_size: int
    eod_id: int
    info: dict[str, Any]
    train: PackedLoader
    val: ValidationSet | None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_args(cfg: DataConfig, rank: int, world_size: int) -> None:
    for name in ("seq_len", "micro_batch_size"):
        if not _positive_int(getattr(cfg, name)):
            raise ValueError(f"{name} must be a positive int, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {cfg.seed!r}")
    if not isinstance(cfg.data, str) or not cfg.data:
        raise ValueError(f"--data must be a non-empty string, got {cfg.data!r}")
    if not _positive_int(world_size):
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    split_documents(0, cfg.val_fraction)  # validates val_fraction


def build_data(cfg: TrainConfig | DataConfig, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Open (preparing once if needed) cfg.data and return this rank's loaders."""
    if not isinstance(cfg, DataConfig):
        cfg = DataConfig.from_train_config(cfg)
    _check_args(cfg, rank, world_size)
    if cfg.data == "synthetic":
        train, val, vocab_size, eod_id, info = open_synthetic(cfg.vocab_size, cfg.synthetic_tokens,
                                                              cfg.val_fraction)
    else:
        from engine.data.corpus import open_prepared  # tokenizers/datasets only when real data is used
        train, val, vocab_size, eod_id, info = open_prepared(cfg, rank, world_size)
    need = world_size * cfg.micro_batch_size * cfg.seq_len + 1
    if train.n_tokens < need:
        raise DataError(
            f"--data {cfg.data!r}: the training split has {train.n_tokens} tokens, but one batch needs "
            f"{need} (world_size {world_size} x micro_batch_size {cfg.micro_batch_size} x seq_len "
            f"{cfg.seq_len} + 1). Use more data or a smaller seq_len / micro_batch_size.")
    loader = PackedLoader(train, cfg.seq_len, cfg.micro_batch_size, cfg.seed, rank, world_size,
                          cfg.doc_mask, eod_id)
    val_set = None
    if val is not None and val.n_tokens >= 2:
        val_set = ValidationSet(val, cfg.seq_len, cfg.micro_batch_size, rank, world_size, cfg.doc_mask,
                                eod_id)
    if val_set is None and cfg.need_validation:
        n_docs = info.get("data_n_docs_train", train.n_docs) + info.get("data_n_docs_val", 0)
        raise DataError(
            f"--eval-every needs a validation split, but --data {cfg.data!r} gave none "
            f"({n_docs} document(s), --val-fraction {cfg.val_fraction}; a split needs at least two "
            "documents). Use more documents or --eval-every 0.")
    info = {**info, "data_n_windows_train": loader.n_windows,
            "data_n_windows_val": val_set.n_windows if val_set else 0, "data_doc_mask": cfg.doc_mask}
    if rank == 0:
        log.info("data %s: %d train tokens in %d windows of %d, %d val tokens, vocabulary %d",
                 cfg.data, train.n_tokens, loader.n_windows, cfg.seq_len,
                 val.n_tokens if val is not None else 0, vocab_size)
    return DataBundle(vocab_size=vocab_size, eod_id=eod_id, info=info, train=loader, val=val_set)
