"""The engine's tokenizer: a byte-level BPE trained offline with Hugging Face `tokenizers`, cached
on disk, or an existing tokenizer.json (--tokenizer PATH).

Byte-level means every UTF-8 string is encodable (no unknown token) and decoding is lossless.
The end-of-document token "<|endoftext|>" is the first special token (id 0); documents are
encoded without it and the data pipeline appends it after each one.

Bounded on any text: BPE training on one huge pre-token (a long line without whitespace) grows
much faster than linearly, and encoding a huge document builds one huge Encoding. So training
reads at most TOKENIZER_DOC_BYTES of each document, text is handed to `tokenizers` in pieces
(`split_text`) cut where byte-level pre-tokenisation cuts anyway (between a non-space and a
whitespace character), and a whitespace-free run longer than a piece is cut hard -- the only
place where the ids differ from encoding the whole text at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from engine.data.config import MIN_BPE_VOCAB, TOKENIZER_SAMPLE_BYTES, DataError
from engine.integrity import file_sha256

log = logging.getLogger(__name__)

EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens of common tokenizers, for --tokenizer PATH (GPT-2/Qwen, Llama 2, Llama 3, ...).
EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
# One document contributes at most this much to the training sample, so one huge document
# neither dominates the vocabulary nor the training time.
TOKENIZER_DOC_BYTES = 2**20
# Pieces handed to the BPE trainer: a whitespace-free run longer than this is cut (the trainer's
# cost grows much faster than linearly with the longest pre-token; 256 characters keep long
# identifiers and URLs whole).
TRAIN_PIECE_CHARS = 256
# Pieces handed to the encoder (cut at whitespace, so the ids are those of the whole text): one
# huge Encoding costs ~100 bytes per token; small pieces also spread over the encoder's threads.
ENCODE_PIECE_CHARS = 1000
ENCODE_BATCH_CHARS = 2**20  # characters per encode_batch call: bounds the Encodings alive
BPE_VERSION = "bytelevel-bpe-v2"
# Unicode White_Space: what `\s` matches in the byte-level pre-tokenizer's regex (Python's `\s`
# also matches \x1c-\x1f, which that regex treats as punctuation).
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@lru_cache(maxsize=8)
def _longest_piece(max_chars: int) -> re.Pattern[str]:
    """Matches the longest prefix of at most max_chars characters that ends with a non-space
    character followed by whitespace (one greedy repeat: linear backtracking)."""
    return re.compile(f"(?s).{{0,{max_chars - 1}}}[^{_WHITESPACE}](?=[{_WHITESPACE}])")


def split_text(text: str, max_chars: int) -> Iterator[str]:
    """`text` in pieces of at most max_chars characters, in order; their concatenation is `text`.

    Cuts fall between a non-space and a whitespace character, where the byte-level pre-tokenizer
    splits anyway, so encoding the pieces gives the ids of the whole text; a window of max_chars
    without such a place is cut at max_chars.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars!r}")
    start, n = 0, len(text)
    if n <= max_chars:
        yield text
        return
    pattern = _longest_piece(max_chars)
    while n - start > max_chars:
        found = pattern.match(text, start, start + max_chars + 1)
        cut = found.end() if found else start + max_chars
        yield text[start:cut]
        start = cut
    yield text[start:]


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


def _utf8_prefix(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding fits in max_bytes."""
    head = text[:max_bytes]  # a character is at least one byte: never more than needed
    return head.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def training_sample(texts: Sequence[str], budget_bytes: int = TOKENIZER_SAMPLE_BYTES, seed: int = 0,
                    doc_bytes: int = TOKENIZER_DOC_BYTES) -> tuple[list[str], int]:
    """Documents in a seeded random order, each cut to its first doc_bytes of UTF-8, until
    budget_bytes are collected (the last one may be cut shorter). Returns (sample, bytes in it)."""
    sample, used = [], 0
    for i in np.random.default_rng(seed).permutation(len(texts)):
        if used >= budget_bytes:
            break
        text = _utf8_prefix(texts[i], min(doc_bytes, budget_bytes - used))
        sample.append(text)
        used += len(text.encode("utf-8"))
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
    pieces = (piece for text in texts for piece in split_text(text, TRAIN_PIECE_CHARS))
    tokenizer.train_from_iterator(pieces, trainer)
    return tokenizer


def _mark_last(items: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """(item, is it the last one) for each item."""
    iterator = iter(items)
    previous = next(iterator)
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True


def encode_documents(tokenizer: Any, texts: Iterable[str]) -> Iterator[tuple[np.ndarray, bool]]:
    """The ids of the texts (no special tokens), in order, as (ids, ends a document) parts: a
    document comes as one part or several consecutive ones, the last with True. Memory stays
    bounded by ENCODE_BATCH_CHARS whatever the documents' sizes (see `split_text`)."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    pieces: list[str] = []
    ends: list[bool] = []  # whether each pending piece is the last of its document
    n_chars = 0

    def flush() -> Iterator[tuple[np.ndarray, bool]]:
        encodings = encode(pieces, add_special_tokens=False)
        first = 0
        for k, end in enumerate(ends):
            if end or k == len(ends) - 1:
                parts = [np.asarray(enc.ids, dtype=np.int64) for enc in encodings[first:k + 1]]
                yield np.concatenate(parts), end
                first = k + 1

    for text in texts:
        for piece, last in _mark_last(split_text(text, ENCODE_PIECE_CHARS)):
            pieces.append(piece)
            ends.append(last)
            n_chars += len(piece)
            if n_chars >= ENCODE_BATCH_CHARS:
                yield from flush()
                pieces, ends, n_chars = [], [], 0
    if pieces:
        yield from flush()


def _read_cached_bpe(folder: Path) -> tuple[Any, dict[str, Any]] | str:
    """(tokenizer, meta) from a tokenizer cache folder, or what is wrong with it."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if (path.stat().st_size != meta["data_tokenizer_bytes"]
                or file_sha256(path) != meta["data_tokenizer_hash"]):
            return "tokenizer.json does not match the size and sha256 recorded in meta.json"
        return Tokenizer.from_file(str(path)), meta
    except Exception as err:  # noqa: BLE001 -- garbage JSON, missing keys; tokenizers raises bare Exception
        return f"{type(err).__name__}: {err}"


def cached_bpe(cache_dir: str | os.PathLike, corpus_hash: str, vocab_size: int, val_fraction: float,
               train_texts: Callable[[], Sequence[str]],
               budget_bytes: int = TOKENIZER_SAMPLE_BYTES) -> tuple[Any, Path, dict[str, Any]]:
    """The BPE for this corpus and these settings, trained once and then read from cache_dir.

    train_texts is called only on a cache miss. Returns (tokenizer, path, info).
    """
    from tokenizers import __version__ as tokenizers_version

    if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size must be an int >= {MIN_BPE_VOCAB} for a byte-level BPE, "
                         f"got {vocab_size!r}")
    key = hashlib.sha256(json.dumps([BPE_VERSION, tokenizers_version, corpus_hash, vocab_size,
                                     val_fraction, budget_bytes]).encode()).hexdigest()[:20]
    folder = Path(cache_dir) / "tokenizers" / key
    path, meta_path = folder / "tokenizer.json", folder / "meta.json"
    if folder.exists():
        cached = _read_cached_bpe(folder)
        if not isinstance(cached, str):
            log.info("tokenizer cache hit: %s", path)
            return cached[0], path, {**cached[1], "data_tokenizer_cache_hit": True}
        log.warning("the cached tokenizer in %s is damaged (%s): training it again", folder, cached)
    start = time.perf_counter()
    sample, used = training_sample(train_texts(), budget_bytes)
    if not sample:
        raise DataError("no training documents to train the tokenizer on")
    tokenizer = train_bpe(sample, vocab_size)
    meta: dict[str, Any] = {"data_tokenizer_sample_bytes": used, "data_tokenizer_sample_docs": len(sample),
                            "data_tokenizer_train_seconds": round(time.perf_counter() - start, 2)}
    log.info("trained a %d-token byte-level BPE on %.1f MB (%d documents) in %.1f s -> %s",
             tokenizer.get_vocab_size(), used / 1e6, len(sample),
             meta["data_tokenizer_train_seconds"], path)
    folder.mkdir(parents=True, exist_ok=True)
    # Written under temporary names and renamed, so a crash or a concurrent run never leaves
    # half a file that a later run would take for a cache hit; meta.json (with the checksum of
    # tokenizer.json) last, so a folder without it is never trusted.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    os.close(fd)
    tokenizer.save(tmp)
    meta.update(data_tokenizer_bytes=os.path.getsize(tmp), data_tokenizer_hash=file_sha256(tmp))
    os.replace(tmp, path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, meta_path)
    return tokenizer, path, {**meta, "data_tokenizer_cache_hit": False}
