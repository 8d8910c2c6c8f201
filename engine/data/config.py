"""The data pipeline's own settings (a typed slice of the run's TrainConfig) and its error type.

This is the leaf of engine.data: every other module of the package may import it, it imports none
of them (engine.config only inside ``from_train_config``, which engine.config never calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import TrainConfig

SYNTHETIC_TOKENS = 1 << 20
# Training reads at most this much text (a seeded random sample of the training documents):
# 8 MiB trains an 8192-token BPE in a few seconds on 2 cores and covers code and prose well.
TOKENIZER_SAMPLE_BYTES = 8 * 2**20
MIN_BPE_VOCAB = 257       # a byte-level BPE: 256 byte symbols + end-of-document
MIN_SYNTHETIC_VOCAB = 8   # the synthetic bigram source: EOD + 7 tokens with 4 successors each


class DataError(ValueError):
    """A problem with the user's data (missing path, corpus too small, no validation split, ...).

    A ValueError like every other bad-input error of the engine; the command line turns it into
    one line on stderr and exit status 1.
    """


@dataclass(frozen=True)
class DataConfig:
    """What engine.data reads from a run's configuration (the flag names are TrainConfig's)."""

    data: str = "stdlib"
    vocab_size: int = 8192              # of the tokenizer trained on the corpus (or synthetic ids)
    seq_len: int = 256
    micro_batch_size: int = 4
    seed: int = 0
    text_field: str = "text"
    tokenizer: str | None = None        # an existing tokenizer.json instead of a trained BPE
    doc_mask: bool = False
    val_fraction: float = 0.01
    data_cache_dir: str = ".cache/nitp-data"
    need_validation: bool = False       # --eval-every > 0: a run without a validation split is refused
    # not flags: knobs for tests and tools
    max_files: int | None = None        # use only the first N files of a local corpus
    synthetic_tokens: int = SYNTHETIC_TOKENS
    tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES

    @classmethod
    def from_train_config(cls, cfg: TrainConfig) -> DataConfig:
        return cls(data=cfg.data, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                   micro_batch_size=cfg.micro_batch_size, seed=cfg.seed, text_field=cfg.text_field,
                   tokenizer=cfg.tokenizer, doc_mask=cfg.doc_mask, val_fraction=cfg.val_fraction,
                   data_cache_dir=cfg.data_cache_dir, need_validation=cfg.eval_every > 0)
