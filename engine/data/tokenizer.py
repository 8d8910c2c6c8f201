"""The engine's tokenizer: a byte-level BPE trained offline with Hugging Face `tokenizers`, cached
on disk, or an existing tokenizer.json (--tokenizer PATH).

Byte-level means every UTF-8 string is encodable (no unknown token) and decoding is lossless.
The end-of-document token "<|endoftext|>" is the first special token (id 0); documents are
encoded without it and the data pipeline appends it after each one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from engine.data.loader import DataError

log = logging.getLogger(__name__)

EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens of common tokenizers, for --tokenizer PATH (GPT-2/Qwen, Llama 2, Llama 3, ...).
EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
# Training reads at most this much text (a seeded random sample of the training documents):
# 8 MiB trains an 8192-token BPE in a few seconds on 2 cores and covers code and prose well.
TOKENIZER_SAMPLE_BYTES = 8 * 2**20
BPE_VERSION = "bytelevel-bpe-v1"
MIN_BPE_VOCAB = 257  # 256 byte symbols + EOD


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def eod_id_of(tokenizer: Any, path: str) -> int:
    """The id of the tokenizer's end-of-document token; ValueError if it has none we know."""
    for name in EOD_CANDIDATES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"--tokenizer {path}: no end-of-document token found; expected one of "
                     f"{', '.join(EOD_CANDIDATES)}")


def load_tokenizer(path: str | os.PathLike) -> tuple[Any, int]:
    """Load an existing tokenizer.json; returns (tokenizer, eod_id)."""
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise DataError(f"--tokenizer {path}: no such file")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"--tokenizer {path}: not a tokenizers tokenizer.json ({err})") from None
    return tokenizer, eod_id_of(tokenizer, str(path))


def training_sample(texts: Sequence[str], budget_bytes: int = TOKENIZER_SAMPLE_BYTES,
                    seed: int = 0) -> tuple[list[str], int]:
    """Documents in a seeded random order until budget_bytes of UTF-8 are collected
    (the last one may be cut). Returns (sample, bytes in it)."""
    sample, used = [], 0
    for i in np.random.default_rng(seed).permutation(len(texts)):
        if used >= budget_bytes:
            break
        text = texts[i]
        size = len(text.encode("utf-8"))
        if used + size > budget_bytes:
            text = text.encode("utf-8")[: budget_bytes - used].decode("utf-8", errors="ignore")
            size = len(text.encode("utf-8"))
        sample.append(text)
        used += size
    return sample, used


def train_bpe(texts: Sequence[str], vocab_size: int) -> Any:
    """Train a byte-level BPE with EOD as special token 0 (vocab_size counts it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size must be an int >= {MIN_BPE_VOCAB} for a byte-level BPE "
                         f"(256 bytes + end-of-document), got {vocab_size!r}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer


def cached_bpe(cache_dir: str | os.PathLike, corpus_hash: str, vocab_size: int, val_fraction: float,
               train_texts: Callable[[], Sequence[str]],
               budget_bytes: int = TOKENIZER_SAMPLE_BYTES) -> tuple[Any, Path, dict[str, Any]]:
    """The BPE for this corpus and these settings, trained once and then read from cache_dir.

    train_texts is called only on a cache miss. Returns (tokenizer, path, info).
    """
    from tokenizers import Tokenizer, __version__ as tokenizers_version

    if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size must be an int >= {MIN_BPE_VOCAB} for a byte-level BPE, "
                         f"got {vocab_size!r}")
    key = hashlib.sha256(json.dumps([BPE_VERSION, tokenizers_version, corpus_hash, vocab_size,
                                     val_fraction, budget_bytes]).encode()).hexdigest()[:20]
    folder = Path(cache_dir) / "tokenizers" / key
    path, meta_path = folder / "tokenizer.json", folder / "meta.json"
    if path.is_file() and meta_path.is_file():
        log.info("tokenizer cache hit: %s", path)
        meta = json.loads(meta_path.read_text())
        return Tokenizer.from_file(str(path)), path, {**meta, "data_tokenizer_cache_hit": True}
    start = time.perf_counter()
    sample, used = training_sample(train_texts(), budget_bytes)
    if not sample:
        raise DataError("no training documents to train the tokenizer on")
    tokenizer = train_bpe(sample, vocab_size)
    meta = {"data_tokenizer_sample_bytes": used, "data_tokenizer_sample_docs": len(sample),
            "data_tokenizer_train_seconds": round(time.perf_counter() - start, 2)}
    log.info("trained a %d-token byte-level BPE on %.1f MB (%d documents) in %.1f s -> %s",
             tokenizer.get_vocab_size(), used / 1e6, len(sample),
             meta["data_tokenizer_train_seconds"], path)
    folder.mkdir(parents=True, exist_ok=True)
    # Written under temporary names and renamed, so a crash or a concurrent run never leaves
    # half a file that a later run would take for a cache hit.
    for target, write in ((path, lambda p: tokenizer.save(p)),
                          (meta_path, lambda p: Path(p).write_text(json.dumps(meta)))):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        os.close(fd)
        write(tmp)
        os.replace(tmp, target)
    return tokenizer, path, {**meta, "data_tokenizer_cache_hit": False}
