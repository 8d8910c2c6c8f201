"""The synthetic source: documents from a fixed random bigram chain (learnable structure, for tests)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from engine.data.config import MIN_SYNTHETIC_VOCAB, SYNTHETIC_TOKENS
from engine.data.loader import TokenStream, split_documents, token_dtype

SYNTHETIC_SEED = 1234


def synthetic_stream(vocab_size: int, n_tokens: int = SYNTHETIC_TOKENS,
                     seed: int = SYNTHETIC_SEED) -> TokenStream:
    """Documents from a fixed random bigram chain: every token has 4 successors with
    probabilities 0.55/0.25/0.15/0.05, so the best cross-entropy is about 1.1 nats against
    ln(vocab_size) at initialisation. EOD is token 0; documents are 16-256 tokens long."""
    if not isinstance(vocab_size, int) or vocab_size < MIN_SYNTHETIC_VOCAB:
        raise ValueError(f"vocab_size must be an int >= {MIN_SYNTHETIC_VOCAB} for synthetic data, "
                         f"got {vocab_size!r}")
    rng = np.random.default_rng(seed)
    succ = rng.integers(1, vocab_size, size=(vocab_size, 4))
    lengths = rng.integers(16, 257, size=n_tokens // 136 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths + 1), n_tokens) + 1]
    choice = rng.choice(4, size=(len(lengths), 257), p=[0.55, 0.25, 0.15, 0.05])
    chains = np.zeros((len(lengths), 257), dtype=np.int64)
    chains[:, 0] = rng.integers(1, vocab_size, size=len(lengths))
    for t in range(1, 257):  # sequential in t, vectorised over documents
        chains[:, t] = succ[chains[:, t - 1], choice[:, t]]
    chains[np.arange(len(lengths)), lengths] = 0  # EOD right after each document
    keep = np.arange(257)[None, :] <= lengths[:, None]
    doc_starts = np.concatenate([[0], np.cumsum(lengths + 1)]).astype(np.int64)
    return TokenStream(chains[keep].astype(token_dtype(vocab_size)), doc_starts)


def select_documents(stream: TokenStream, doc_ids: np.ndarray) -> TokenStream:
    """A new in-memory stream holding only the given documents, in the given order."""
    pieces = [stream.tokens[stream.doc_starts[d]:stream.doc_starts[d + 1]] for d in doc_ids]
    lengths = np.diff(stream.doc_starts)[doc_ids]
    tokens = np.concatenate(pieces) if pieces else stream.tokens[:0]
    return TokenStream(np.asarray(tokens), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def open_synthetic(vocab_size: int, n_tokens: int, val_fraction: float
                   ) -> tuple[TokenStream, TokenStream | None, int, int, dict[str, Any]]:
    """(train, val or None, vocab_size, eod_id, info) for the synthetic source, split like a corpus."""
    full = synthetic_stream(vocab_size, n_tokens)
    train_ids, val_ids = split_documents(full.n_docs, val_fraction)
    train, val = select_documents(full, train_ids), select_documents(full, val_ids)
    digest = hashlib.sha256(f"synthetic-v1:{vocab_size}:{n_tokens}:{SYNTHETIC_SEED}".encode())
    info = {"data_source": "synthetic", "data_corpus_hash": digest.hexdigest(), "data_n_files": 0,
            "data_n_docs_train": train.n_docs, "data_n_docs_val": val.n_docs,
            "data_n_tokens_train": train.n_tokens, "data_n_tokens_val": val.n_tokens,
            "data_tokenizer": None, "data_tokenizer_hash": None, "data_eod_id": 0}
    return train, (val if val.n_docs else None), vocab_size, 0, info
