"""Real corpora: tokenize the documents once into memory-mapped files, check and reopen them.

Which documents a source holds, and what is skipped: engine.data.documents.

Preparation is cached under --data-cache-dir, keyed by the corpus hash (sha256 over the sorted
relative paths and contents of the files) and the settings: train.bin / val.bin hold the token ids
(uint16 or uint32), train_docs.npy / val_docs.npy the document start offsets, meta.json the
counts, and checksums.json the size and sha256 of each of those files and of the tokenizer.json
the tokens were made with. The folder is built under a temporary name and renamed, so it is
complete or absent; a cached folder whose files do not match checksums.json (truncated, overwritten,
an unreadable meta.json, a changed tokenizer) is set aside with a warning and prepared again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.data.config import DataConfig, DataError
from engine.data.documents import (collect_documents, corpus_hash, load_hf_dataset, local_files,
                                   looks_like_path, stdlib_files)
from engine.data.loader import TokenStream, split_documents, token_dtype
from engine.data.tokenizer import cached_bpe, encode_documents, load_tokenizer
from engine.integrity import file_sha256

log = logging.getLogger(__name__)

PREP_VERSION = "prep-v2"
CHECKSUMS = "checksums.json"
CACHED_FILES = ("train.bin", "val.bin", "train_docs.npy", "val_docs.npy", "meta.json")


def resolve_source(cfg: DataConfig) -> tuple[str, Path | None, list[Path], Any, str]:
    """(source kind, root, files, HF dataset or None, corpus hash) for cfg.data."""
    data = cfg.data
    if data == "stdlib":
        root, files = stdlib_files()
        source = "stdlib"
    elif Path(data).expanduser().exists():
        root, files = local_files(data)
        source = "local"
    elif looks_like_path(data):
        raise DataError(f"--data {data}: no such file or directory")
    else:
        dataset, digest = load_hf_dataset(cfg)
        return "hf", None, [], dataset, digest
    if cfg.max_files is not None:
        files = files[: cfg.max_files]
    return source, root, files, None, corpus_hash(root, files)


def _write_stream(path: Path, texts: list[str], tokenizer: Any, eod_id: int, dtype: type) -> int:
    """Encode `texts` (EOD after each) into the raw token file `path` and the document start
    offsets into <split>_docs.npy beside it. Returns the token count."""
    starts, total = [0], 0
    eod = np.asarray([eod_id], dtype=dtype)
    with open(path, "wb") as f:
        for ids, ends_document in encode_documents(tokenizer, texts):
            ids.astype(dtype).tofile(f)
            total += len(ids)
            if ends_document:
                eod.tofile(f)
                total += 1
                starts.append(total)
    np.save(path.parent / f"{path.stem}_docs.npy", np.asarray(starts, dtype=np.int64))
    return total


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_checksums(folder: Path, cache_root: Path, tokenizer_path: Path) -> None:
    """checksums.json: size and sha256 of every cached file and of the tokenizer used (its path
    relative to the cache root when it lies inside, so a moved or copied cache stays whole)."""
    tokenizer = tokenizer_path.resolve()
    try:
        where = {"cache_path": str(tokenizer.relative_to(cache_root.resolve()))}
    except ValueError:
        where = {"path": str(tokenizer)}
    record = {"files": {name: _file_record(folder / name) for name in CACHED_FILES},
              "tokenizer": {**where, **_file_record(tokenizer)}}
    (folder / CHECKSUMS).write_text(json.dumps(record, indent=1))


def verify_prepared(folder: Path, cache_root: Path) -> tuple[dict[str, Any] | None, str]:
    """(meta, "") when every file matches checksums.json, else (None, what is wrong).
    Sizes are compared first, so a truncated or extended file costs no hashing."""
    try:
        record = json.loads((folder / CHECKSUMS).read_text())
        tok = record["tokenizer"]
        tok_path = cache_root / tok["cache_path"] if "cache_path" in tok else Path(tok["path"])
        expected = [(folder / name, want) for name, want in record["files"].items()]
        expected.append((tok_path, tok))
        for path, want in expected:
            if path.stat().st_size != want["bytes"]:
                return None, f"{path.name} has {path.stat().st_size} bytes, expected {want['bytes']}"
        for path, want in expected:
            if file_sha256(path) != want["sha256"]:
                return None, f"{path.name} does not match its recorded sha256"
        if set(record["files"]) != set(CACHED_FILES):
            return None, f"{CHECKSUMS} does not list {', '.join(CACHED_FILES)}"
        meta = json.loads((folder / "meta.json").read_text())
        if not isinstance(meta, dict):
            return None, "meta.json is not a JSON object"
        if meta.get("data_tokenizer_trained"):
            meta["data_tokenizer"] = str(tok_path)  # where it is now
        return meta, ""
    except (OSError, ValueError, KeyError, TypeError) as err:  # missing or garbage files
        return None, f"{type(err).__name__}: {err}"


def set_aside(folder: Path) -> None:
    """Move a damaged cache folder out of the way (renamed first, so a concurrent reader never
    sees it half deleted) and delete it."""
    trash = Path(tempfile.mkdtemp(prefix=".damaged-", dir=folder.parent))
    os.replace(folder, trash / folder.name)
    shutil.rmtree(trash, ignore_errors=True)


def prepare(cfg: DataConfig) -> tuple[Path, dict[str, Any]]:
    """Prepare cfg.data once (cached, checked on every reuse) and return (prepared folder, info)."""
    start = time.perf_counter()
    source, root, files, hf_ds, digest = resolve_source(cfg)
    tok_path = cfg.tokenizer
    if tok_path and not Path(tok_path).is_file():
        raise DataError(f"--tokenizer {tok_path}: no such file")
    tok_hash = file_sha256(tok_path) if tok_path else None
    budget = cfg.tokenizer_sample_bytes
    settings = [PREP_VERSION, digest, cfg.val_fraction, cfg.text_field, tok_hash,
                None if tok_path else [cfg.vocab_size, budget]]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:20]
    cache_root = Path(cfg.data_cache_dir)
    folder = cache_root / "prepared" / key
    if folder.exists():
        meta, problem = verify_prepared(folder, cache_root)
        if meta is not None:
            log.info("prepared data cache hit: %s", folder)
            return folder, {**meta, "data_prep_cache_hit": True, "data_tokenizer_cache_hit": True}
        log.warning("the prepared data in %s is damaged (%s): preparing it again", folder, problem)
        set_aside(folder)

    log.info("preparing --data %s (%d files) into %s", cfg.data, len(files), folder)
    docs = collect_documents(cfg, root, files, hf_ds)
    info: dict[str, Any] = {"data_source": source, "data_path": str(root) if root else cfg.data,
                            "data_corpus_hash": digest, "data_n_files": len(files),
                            "data_max_files": cfg.max_files, **docs.summary()}
    if source != "stdlib":
        info["data_text_field"] = cfg.text_field
    if not docs.texts:
        raise DataError(f"--data {cfg.data}: no usable documents ({json.dumps(docs.summary())})")
    train_ids, val_ids = split_documents(len(docs.texts), cfg.val_fraction)
    if tok_path:
        tokenizer, eod_id = load_tokenizer(tok_path)
        used_tokenizer = Path(tok_path)
        info.update(data_tokenizer=str(tok_path), data_tokenizer_trained=False)
    else:
        tokenizer, used_tokenizer, tok_info = cached_bpe(
            cfg.data_cache_dir, digest, cfg.vocab_size, cfg.val_fraction,
            lambda: [docs.texts[i] for i in train_ids], budget)
        eod_id = tokenizer.token_to_id("<|endoftext|>")
        info.update(tok_info, data_tokenizer=str(used_tokenizer), data_tokenizer_trained=True)
        tok_hash = file_sha256(used_tokenizer)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    info.update(data_tokenizer_hash=tok_hash, data_vocab_size=vocab_size, data_eod_id=eod_id)

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    dtype = token_dtype(vocab_size)
    enc_start = time.perf_counter()
    for split, ids in (("train", train_ids), ("val", val_ids)):
        info[f"data_n_docs_{split}"] = len(ids)
        info[f"data_n_tokens_{split}"] = _write_stream(tmp / f"{split}.bin",
                                                       [docs.texts[i] for i in ids], tokenizer,
                                                       eod_id, dtype)
    info["data_token_dtype"] = np.dtype(dtype).name
    info["data_tokenize_seconds"] = round(time.perf_counter() - enc_start, 2)
    info["data_prep_seconds"] = round(time.perf_counter() - start, 2)
    (tmp / "meta.json").write_text(json.dumps(info, indent=1))
    write_checksums(tmp, cache_root, used_tokenizer)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same preparation first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %d + %d documents, %d + %d tokens (train + val) in %.1f s (tokenizing %.1f s)",
             info["data_n_docs_train"], info["data_n_docs_val"], info["data_n_tokens_train"],
             info["data_n_tokens_val"], info["data_prep_seconds"], info["data_tokenize_seconds"])
    return folder, {**info, "data_prep_cache_hit": False}


def open_stream(folder: Path, split: str, dtype: str) -> TokenStream:
    """Memory-map a prepared split (read-only)."""
    starts = np.load(folder / f"{split}_docs.npy")
    path = folder / f"{split}.bin"
    tokens = (np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size
              else np.zeros(0, dtype=dtype))  # mmap refuses empty files
    return TokenStream(tokens, starts)


def open_prepared(cfg: DataConfig, rank: int, world_size: int
                  ) -> tuple[TokenStream, TokenStream | None, int, int, dict[str, Any]]:
    """Rank 0 prepares (or finds the cache), the others wait; every rank opens the files."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        message: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                message = [prepare(cfg)]
            except BaseException as err:
                dist.broadcast_object_list([f"rank 0 could not prepare the data: {err}"], src=0)
                raise
        dist.broadcast_object_list(message, src=0)
        if isinstance(message[0], str):
            raise DataError(message[0])
        folder, info = message[0]
    else:
        folder, info = prepare(cfg)
    train = open_stream(folder, "train", info["data_token_dtype"])
    val = open_stream(folder, "val", info["data_token_dtype"])
    return train, (val if val.n_docs else None), info["data_vocab_size"], info["data_eod_id"], info
