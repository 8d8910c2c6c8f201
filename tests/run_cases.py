"""Shared by the run-directory and checkpoint-integrity tests: a model small enough that a run of a
few steps takes about a second, and readers of a run's outputs."""

import json
from pathlib import Path

from engine.checkpoint import list_checkpoints
from engine.config import TrainConfig, make_config

SMALL = dict(data="synthetic", vocab_size=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
             seq_len=16, batch_size=4, micro_batch_size=2, warmup_steps=4, log_every=1, steps=2)


def small(out, **overrides) -> TrainConfig:
    return make_config("tiny", **{**SMALL, **overrides}, out=str(out))


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def steps_in(root) -> list[int]:
    """Steps of the complete-looking checkpoints in a checkpoints folder."""
    return [s for s, _ in list_checkpoints(Path(root))]
