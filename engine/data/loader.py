"""Token streams and the loaders that cut them into training and validation batches.

Every source becomes a `TokenStream`: documents concatenated, each followed by an end-of-document
(EOD) token, plus the index of where each document starts. Windows of seq_len + 1 tokens start
at multiples of seq_len, so inputs are window[:-1], labels are window[1:] and every token of the
stream is a label exactly once per epoch.

Document masking (doc_mask): the EOD token belongs to the document it ends, so predicting
EOD from a document's last token stays a training target (the model learns where documents end),
while the label at the EOD position -- the first token of the *next* document -- is ignore_index.
doc_ids number the documents inside each row from 0 (the model's attention turns them into a
block-diagonal causal mask); `doc_cu_seqlens` turns them into flash-attn's variable-length form.

The sources (engine.data.synthetic, engine.data.corpus) and build_data (engine.data.build) import
this module; it imports none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

IGNORE_INDEX = -100

# The validation split is fixed by this seed, not cfg.seed, so runs with different seeds are
# evaluated on the same documents and share one prepared cache.
SPLIT_SEED = 0x5EED


@dataclass(frozen=True)
class TokenStream:
    """Documents back to back, each ending with the EOD token.

    tokens: 1-D unsigned ints (in memory or a numpy memmap).
    doc_starts: int64, length n_docs + 1; document d is tokens[doc_starts[d]:doc_starts[d + 1]]
    (its EOD included) and doc_starts[-1] == len(tokens).
    """

    tokens: np.ndarray
    doc_starts: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_docs(self) -> int:
        return int(self.doc_starts.shape[0] - 1)


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id (< vocab_size) fits in it, else uint32."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def split_documents(n_docs: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Held-out validation documents: a fixed-seed random subset, at least one document when
    val_fraction > 0 and there are two or more. Returns sorted (train_ids, val_ids)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n_val = min(math.ceil(val_fraction * n_docs), n_docs - 1) if val_fraction > 0 else 0
    order = np.random.default_rng(SPLIT_SEED).permutation(n_docs)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def make_batch(stream: TokenStream, starts: np.ndarray, seq_len: int, doc_mask: bool,
               pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of seq_len inputs and shifted labels for windows starting at `starts`.

    Positions past the end of the stream (the tail of validation) are padded with pad_id and
    labelled ignore_index; with doc_mask their doc_id is a fresh one, so they join no document.
    """
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)
    n = stream.n_tokens
    inside = idx < n
    toks = np.where(inside, stream.tokens[np.minimum(idx, n - 1)].astype(np.int64), pad_id)
    labels = toks[:, 1:].copy()
    labels[~inside[:, 1:]] = IGNORE_INDEX
    batch = {"input_ids": torch.from_numpy(np.ascontiguousarray(toks[:, :-1]))}
    if doc_mask:
        doc = np.searchsorted(stream.doc_starts, idx, side="right") - 1
        labels[doc[:, 1:] != doc[:, :-1]] = IGNORE_INDEX
        batch["doc_ids"] = torch.from_numpy((doc[:, :-1] - doc[:, :1]).astype(np.int32))
    batch["labels"] = torch.from_numpy(labels)
    return batch


def doc_cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, T) document ids -> (cu_seqlens int32, max_seqlen) for flash-attn's variable-length
    path over the flattened (B*T) tokens; a row boundary always starts a new segment."""
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() != 2:
        raise TypeError("doc_ids must be a (B, T) tensor")
    b, t = doc_ids.shape
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.nonzero(new.reshape(-1)).squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([b * t])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


class PackedLoader:
    """Training windows in a seeded random order, epoch after epoch, sharded over ranks.

    The global order is the concatenation of one permutation of all windows per epoch (seeded
    by (seed, epoch)). Each step consumes world_size * micro_batch_size consecutive positions;
    rank r takes the r-th block of micro_batch_size. The position (`cursor`) is global, so a
    resumed run continues exactly, also with another world size. Within an epoch every window
    is read once, by one rank; a step that straddles two epochs takes the end of one
    permutation and the start of the next, so it may hold a window twice (build_data requires
    at least one step's worth of windows, so such a step is the only overlap).
    """

    def __init__(self, stream: TokenStream, seq_len: int, micro_batch_size: int, seed: int,
                 rank: int, world_size: int, doc_mask: bool, pad_id: int):
        self.stream, self.seq_len, self.micro_batch_size = stream, seq_len, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.doc_mask, self.pad_id = doc_mask, pad_id
        self.n_windows = (stream.n_tokens - 1) // seq_len
        self.cursor = 0
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        return self.cursor // self.n_windows

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._perms[epoch]

    def window_ids(self) -> np.ndarray:
        """Window indices of this rank's next batch (without advancing)."""
        pos = self.cursor + self.rank * self.micro_batch_size + np.arange(self.micro_batch_size)
        return np.array([self._perm(int(p // self.n_windows))[p % self.n_windows] for p in pos])

    def next_batch(self) -> dict[str, torch.Tensor]:
        starts = self.window_ids() * self.seq_len
        self.cursor += self.world_size * self.micro_batch_size
        return make_batch(self.stream, starts, self.seq_len, self.doc_mask, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "seed": self.seed, "n_windows": self.n_windows,
                "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "cursor" not in state:
            raise TypeError(f"state must be a dict from PackedLoader.state_dict(), got {state!r}")
        for key in ("seed", "n_windows", "seq_len"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]}, but this data has "
                                 f"{key}={getattr(self, key)}: the position would not resume exactly")
        if int(state["cursor"]) < 0:
            raise ValueError(f"loader state cursor must be >= 0, got {state['cursor']}")
        self.cursor = int(state["cursor"])


class ValidationSet:
    """Validation windows in stream order; the same batches on every call.

    Rank r takes the r-th micro-batch of each group of world_size; every rank yields the same
    number of batches (rows past the end are all ignore_index), so per-batch collectives match.
    """

    def __init__(self, stream: TokenStream, seq_len: int, micro_batch_size: int, rank: int,
                 world_size: int, doc_mask: bool, pad_id: int):
        self.stream, self.seq_len, self.micro_batch_size = stream, seq_len, micro_batch_size
        self.rank, self.world_size, self.doc_mask, self.pad_id = rank, world_size, doc_mask, pad_id
        self.n_windows = math.ceil((stream.n_tokens - 1) / seq_len)

    def num_batches(self, max_batches: int | None = None) -> int:
        n = math.ceil(self.n_windows / (self.world_size * self.micro_batch_size))
        return n if max_batches is None else min(n, max_batches)

    def batches(self, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
        group = self.world_size * self.micro_batch_size
        for b in range(self.num_batches(max_batches)):
            w = b * group + self.rank * self.micro_batch_size + np.arange(self.micro_batch_size)
            starts = np.where(w < self.n_windows, w * self.seq_len, self.stream.n_tokens)
            yield make_batch(self.stream, starts, self.seq_len, self.doc_mask, self.pad_id)

