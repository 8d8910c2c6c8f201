"""torchtitan configs with NITP on CPU, on data and a tokenizer this repository has (no download).

A config_registry module for torchtitan's launcher, from the repository root:

    python -m torchtitan.train --module examples.titan_nitp --config llama3_debug_nitp_cpu

(`make titan-demo` runs `python examples/titan_demo.py`, which builds the same Trainer and prints the losses.)
torchtitan 0.3.0's wheel ships no data or tokenizer, so the data loader and tokenizer here wrap the engine's:
the Python standard library's own source (or a synthetic bigram corpus for tests), tokenized with a byte-level
BPE trained once and cached, packed into windows of seq_len. They are ordinary torchtitan components
(BaseDataLoader, BaseTokenizer), resumable through torchtitan's checkpoints.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import torch
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.models.common.config_utils import decoder_vocab_size
from torchtitan.models.llama3.config_registry import llama3_debugmodel
from torchtitan.trainer import Trainer

from nitp_kernels.integrations.torchtitan import NITPTrainer, nitp_trainer_config
from nitp_kernels.integrations.torchtitan_cpu import sdpa_attention, use_cpu

DEFAULT_CACHE = os.environ.get("NITP_DATA_CACHE", ".cache/nitp-data")


def _engine_data(data: str, vocab_size: int, seq_len: int, batch_size: int, seed: int, cache_dir: str,
                 rank: int, world_size: int, synthetic_tokens: int = 2**20) -> Any:
    """The engine's corpus, BPE tokenizer and packing, through its one public entry point."""
    from engine.data import build_data
    from engine.data.config import DataConfig

    settings = DataConfig(data=data, vocab_size=vocab_size, seq_len=seq_len, micro_batch_size=batch_size,
                          seed=seed, val_fraction=0.01, data_cache_dir=cache_dir, synthetic_tokens=synthetic_tokens)
    return build_data(settings, rank=rank, world_size=world_size)


class EngineTokenizer(BaseTokenizer):
    """The BPE tokenizer the engine trained on the corpus; for synthetic data, token ids written as numbers."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        data: str = "stdlib"
        vocab_size: int = 2048
        cache_dir: str = DEFAULT_CACHE

    def __init__(self, config: Config, *, tokenizer_path: str | None = None) -> None:
        super().__init__()
        # Only the vocabulary, EOD id and tokenizer file are read here: a small synthetic stream is enough.
        bundle = _engine_data(config.data, config.vocab_size, 1, 1, 0, config.cache_dir, 0, 1, synthetic_tokens=4096)
        self.vocab_size = bundle.vocab_size
        self.eos_id = bundle.eod_id
        path = bundle.info.get("data_tokenizer")
        self._tokenizer = None
        if path:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(path)

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]:
        if self._tokenizer is None:
            return [int(piece) for piece in text.split()]
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int], *args: Any, **kwargs: Any) -> str:
        if self._tokenizer is None:
            return " ".join(str(i) for i in ids)
        return self._tokenizer.decode(ids)

    def get_vocab_size(self) -> int:
        return self.vocab_size


class EngineDataLoader(BaseDataLoader):
    """Packed windows of the engine's token stream, sharded over data-parallel ranks, resumable."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        dataset: str = "stdlib"
        """"stdlib" (this Python's standard library source) or "synthetic" (a bigram chain, for tests)."""
        vocab_size: int = 2048
        seed: int = 0
        cache_dir: str = DEFAULT_CACHE

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer: Any, seq_len: int,
                 local_batch_size: int, snapshot_every_n_steps: int | None = None) -> None:
        bundle = _engine_data(config.dataset, config.vocab_size, seq_len, local_batch_size, config.seed,
                              config.cache_dir, dp_rank, dp_world_size)
        self._loader = bundle.train
        self._key = f"dp_rank_{dp_rank}"

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            batch = self._loader.next_batch()
            yield {"input": batch["input_ids"]}, batch["labels"]

    def state_dict(self) -> dict[str, Any]:
        return {self._key: dict(self._loader.state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._key in state_dict:
            self._loader.load_state_dict(state_dict[self._key])


def cpu_config(config: Trainer.Config, *, data: str = "stdlib", seq_len: int = 128, batch_size: int = 4,
               steps: int = 10, seed: int = 0) -> Trainer.Config:
    """Adapt a torchtitan config to CPU: SDPA attention, fp32, the engine's data, gloo-friendly settings."""
    use_cpu()
    sdpa_attention(config.model_spec.model)
    vocab_size = decoder_vocab_size(config.model_spec)
    config.tokenizer = EngineTokenizer.Config(data=data, vocab_size=vocab_size)
    config.dataloader = EngineDataLoader.Config(dataset=data, vocab_size=vocab_size, seed=seed)
    config.training.seq_len = seq_len
    config.training.local_batch_size = batch_size
    config.training.steps = steps
    config.training.mixed_precision_param = "float32"
    config.training.disable_cuda_graphs = True
    config.parallelism.spmd_backend = "partial_dtensor"  # spmd_types fails inside FSDP on torch 2.13
    config.validator.enable = False
    config.checkpoint.enable = False
    config.debug.seed = seed
    config.dump_folder = os.environ.get("TITAN_DUMP_FOLDER", "runs/titan-demo")
    return config


def llama3_debug_cpu() -> Trainer.Config:
    """Stock torchtitan llama3 debug model (CE only) on CPU."""
    return cpu_config(llama3_debugmodel())


def llama3_debug_nitp_cpu() -> NITPTrainer.Config:
    """The llama3 debug model with NITP (k = round(0.2 x 6) = 1, λ = 1) on CPU."""
    return nitp_trainer_config(llama3_debug_cpu(), nitp_weight=1.0)

