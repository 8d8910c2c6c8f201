"""Real corpora: find the documents, tokenize them once into memory-mapped files, reopen them.

Sources (cfg.data):
  "stdlib"           the .py files of the running Python's standard library (one file = one
                     document; site-packages/dist-packages and the data folders of test
                     directories excluded).
  a file/directory   .txt (one file = one document), .jsonl and .parquet (one record = one
                     document, text in cfg.text_field), read with Hugging Face `datasets`.
  a dataset name     "owner/name" or "owner/name:config", split "train", via `datasets`
                     (needs a network or a warm Hugging Face cache).

Preparation is cached under cfg.data_cache_dir, keyed by the corpus hash (sha256 over the sorted
relative paths and contents of the files) and the settings: train.bin / val.bin hold the token ids
(uint16 or uint32), train_docs.npy / val_docs.npy the document start offsets, meta.json the
counts. The folder is built under a temporary name and renamed, so it is complete or absent.

Bad data is skipped and counted, never fatal: empty files, files that are not UTF-8 (.txt, .py,
.jsonl), files `datasets` cannot read, and empty, non-text or non-UTF-8 records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.data.loader import DataError, TokenStream, split_documents, token_dtype
from engine.data.tokenizer import TOKENIZER_SAMPLE_BYTES, cached_bpe, file_sha256, load_tokenizer

log = logging.getLogger(__name__)

PREP_VERSION = "prep-v1"
FORMATS = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}
ENCODE_CHUNK_DOCS = 512  # documents per encode_batch call: bounds the Encoding objects alive


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's .py files, sorted; site-packages and test data folders excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    keep = []
    for folder, subdirs, names in os.walk(root):
        parts = Path(folder).relative_to(root).parts
        in_tests = any(p in ("test", "tests", "idle_test") for p in parts)
        # pruned in place so os.walk never descends into installed packages (often most of the
        # tree); test folders hold deliberately broken or foreign-encoded data files
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages",
                                                            "__pycache__")
                            and not (in_tests and (d.endswith("data") or d == "encoded_modules")))
        keep += [Path(folder) / n for n in names if n.endswith(".py")]
    return root, sorted(keep)


def local_files(data: str) -> tuple[Path, list[Path]]:
    """The supported files at a path (recursively for a directory; hidden entries skipped)."""
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix not in FORMATS:
            raise DataError(f"--data {data}: unsupported file type {path.suffix!r}; "
                            f"use one of {', '.join(FORMATS)}")
        return path.parent, [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in FORMATS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"--data {data}: no {'/'.join(FORMATS)} files in this directory")
    return path, files


def corpus_hash(root: Path, files: list[Path]) -> str:
    """sha256 over the sorted relative paths and the contents of the files."""
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(bytes.fromhex(file_sha256(path)))
    return h.hexdigest()


def looks_like_path(data: str) -> bool:
    return data.startswith(("/", ".", "~")) or Path(data).suffix in FORMATS or data.count("/") > 1


class DocumentCollector:
    """Accumulates document texts and counts what was skipped, and why."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.skipped = {"empty_files": [], "non_utf8_files": [], "unreadable_files": []}
        self.counts = {"empty_docs": 0, "non_text_docs": 0, "non_utf8_docs": 0}

    def add(self, value: Any) -> None:
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                self.counts["non_utf8_docs"] += 1
                return
        if value is None or (isinstance(value, str) and not value.strip()):
            self.counts["empty_docs"] += 1
        elif not isinstance(value, str):
            self.counts["non_text_docs"] += 1
        else:
            self.texts.append(value)

    def check_file(self, path: Path, root: Path, text_format: bool) -> bool:
        """False (and counted) for an empty file or a text file that is not UTF-8."""
        rel = str(path.relative_to(root))
        if path.stat().st_size == 0:
            self.skipped["empty_files"].append(rel)
            return False
        if text_format:
            try:
                path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                self.skipped["non_utf8_files"].append(rel)
                return False
        return True

    def summary(self) -> dict[str, int]:
        out = {f"data_skipped_{k}": len(v) for k, v in self.skipped.items()}
        out.update({f"data_skipped_{k}": v for k, v in self.counts.items()})
        for kind, names in self.skipped.items():
            if names:
                log.warning("skipped %d %s: %s%s", len(names), kind.replace("_", " "),
                            ", ".join(names[:5]), " ..." if len(names) > 5 else "")
        for kind, n in self.counts.items():
            if n:
                log.warning("skipped %d %s", n, kind.replace("_", " "))
        return out


def _quiet_datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def _load_column(fmt: str, files: list[Path], root: Path, text_field: str, cache: Path,
                 docs: DocumentCollector) -> None:
    """Read `files` of one format with `datasets` and add their text column to `docs`.

    All files in one call; if that fails (a malformed file, mismatched schemas), file by file,
    counting the ones that cannot be read.
    """
    datasets = _quiet_datasets()
    extra = {"sample_by": "document"} if fmt == "text" else {}
    field = "text" if fmt == "text" else text_field

    def load(group: list[Path]) -> Any:
        # rebuilt, never reused: datasets' own cache is keyed by file size and mtime, not
        # content, and we only get here when the content hash found no prepared data
        return datasets.load_dataset(fmt, data_files=[str(p) for p in group], split="train",
                                     cache_dir=str(cache), download_mode="force_redownload",
                                     **extra)

    try:
        parts = [load(files)]
    except Exception as err:  # noqa: BLE001 -- datasets/pyarrow raise many types; retried per file
        log.warning("datasets could not read the %s files together (%s); reading one by one", fmt, err)
        parts = []
        for path in files:
            try:
                parts.append(load([path]))
            except Exception:  # noqa: BLE001
                docs.skipped["unreadable_files"].append(str(path.relative_to(root)))
    for part in parts:
        if field not in part.column_names:
            raise DataError(f"--text-field {field!r} is not a column of the {fmt} data in "
                            f"{root}; columns: {', '.join(part.column_names)}")
        for value in part[field]:
            docs.add(value)


def collect_documents(cfg: Any, source: str, root: Path | None, files: list[Path],
                      hf_dataset: Any) -> DocumentCollector:
    docs = DocumentCollector()
    if source == "hf":
        text_field = cfg_text_field(cfg)
        if text_field not in hf_dataset.column_names:
            raise DataError(f"--text-field {text_field!r} is not a column of {cfg.data}; "
                            f"columns: {', '.join(hf_dataset.column_names)}")
        for value in hf_dataset[text_field]:
            docs.add(value)
        return docs
    assert root is not None
    ok = [p for p in files if docs.check_file(p, root, text_format=p.suffix != ".parquet")]
    if source == "stdlib":
        for path in ok:
            docs.add(path.read_text(encoding="utf-8"))
        return docs
    cache = Path(cfg_cache_dir(cfg)) / "hf"
    for suffix, fmt in FORMATS.items():
        group = [p for p in ok if p.suffix == suffix]
        if group:
            _load_column(fmt, group, root, cfg_text_field(cfg), cache, docs)
    return docs


def cfg_text_field(cfg: Any) -> str:
    return str(getattr(cfg, "text_field", "text") or "text")


def cfg_cache_dir(cfg: Any) -> str:
    return str(getattr(cfg, "data_cache_dir", ".cache/nitp-data") or ".cache/nitp-data")


def resolve_source(cfg: Any) -> tuple[str, Path | None, list[Path], Any, str]:
    """(source kind, root, files, HF dataset or None, corpus hash) for cfg.data."""
    data = cfg.data
    max_files = getattr(cfg, "data_max_files", None)
    if data == "stdlib":
        root, files = stdlib_files()
        source = "stdlib"
    elif Path(data).expanduser().exists():
        root, files = local_files(data)
        source = "local"
    elif looks_like_path(data):
        raise DataError(f"--data {data}: no such file or directory")
    else:
        return _resolve_hf(cfg)
    if max_files is not None:
        files = files[: int(max_files)]
    return source, root, files, None, corpus_hash(root, files)


def _resolve_hf(cfg: Any) -> tuple[str, None, list[Path], Any, str]:
    datasets = _quiet_datasets()
    name, _, config = cfg.data.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train",
                                   cache_dir=str(Path(cfg_cache_dir(cfg)) / "hf"))
    except Exception as err:  # noqa: BLE001 -- network, hub and format errors alike
        raise DataError(f"--data {cfg.data}: no such file or directory, and it could not be loaded "
                        f"as a Hugging Face dataset: {type(err).__name__}: {err}") from None
    fingerprint = getattr(ds, "_fingerprint", None) or repr(ds)
    digest = hashlib.sha256(f"hf:{cfg.data}:{fingerprint}".encode()).hexdigest()
    return "hf", None, [], ds, digest


def _write_stream(path: Path, texts: list[str], tokenizer: Any, eod_id: int, dtype: type) -> int:
    """Encode `texts` (EOD after each) into the raw token file `path` and the document start
    offsets into path.with_suffix('.npy') -> ...docs.npy. Returns the token count."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    starts, total = [0], 0
    with open(path, "wb") as f:
        for i in range(0, len(texts), ENCODE_CHUNK_DOCS):
            for enc in encode(texts[i:i + ENCODE_CHUNK_DOCS], add_special_tokens=False):
                ids = np.asarray(enc.ids + [eod_id], dtype=dtype)
                ids.tofile(f)
                total += len(ids)
                starts.append(total)
    np.save(path.parent / f"{path.stem}_docs.npy", np.asarray(starts, dtype=np.int64))
    return total


def prepare(cfg: Any) -> tuple[Path, dict[str, Any]]:
    """Prepare cfg.data once (cached) and return (prepared folder, info)."""
    start = time.perf_counter()
    source, root, files, hf_ds, digest = resolve_source(cfg)
    val_fraction = float(getattr(cfg, "val_fraction", 0.01))
    tok_path = getattr(cfg, "tokenizer", None)
    if tok_path and not Path(tok_path).is_file():
        raise DataError(f"--tokenizer {tok_path}: no such file")
    tok_hash = file_sha256(tok_path) if tok_path else None
    budget = int(getattr(cfg, "tokenizer_sample_bytes", TOKENIZER_SAMPLE_BYTES))
    settings = [PREP_VERSION, digest, val_fraction, cfg_text_field(cfg), tok_hash,
                None if tok_path else [cfg.vocab_size, budget]]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:20]
    folder = Path(cfg_cache_dir(cfg)) / "prepared" / key
    if (folder / "meta.json").is_file():
        log.info("prepared data cache hit: %s", folder)
        meta = json.loads((folder / "meta.json").read_text())
        return folder, {**meta, "data_prep_cache_hit": True, "data_tokenizer_cache_hit": True}

    log.info("preparing --data %s (%d files) into %s", cfg.data, len(files), folder)
    docs = collect_documents(cfg, source, root, files, hf_ds)
    info: dict[str, Any] = {"data_source": source, "data_path": str(root) if root else cfg.data,
                            "data_corpus_hash": digest, "data_n_files": len(files),
                            "data_max_files": getattr(cfg, "data_max_files", None),
                            **docs.summary()}
    if source != "stdlib":
        info["data_text_field"] = cfg_text_field(cfg)
    if not docs.texts:
        raise DataError(f"--data {cfg.data}: no usable documents ({json.dumps(docs.summary())})")
    train_ids, val_ids = split_documents(len(docs.texts), val_fraction)
    if tok_path:
        tokenizer, eod_id = load_tokenizer(tok_path)
        info.update(data_tokenizer=str(tok_path), data_tokenizer_trained=False)
    else:
        tokenizer, path, tok_info = cached_bpe(
            cfg_cache_dir(cfg), digest, cfg.vocab_size, val_fraction,
            lambda: [docs.texts[i] for i in train_ids], budget)
        eod_id = tokenizer.token_to_id("<|endoftext|>")
        info.update(tok_info, data_tokenizer=str(path), data_tokenizer_trained=True)
        tok_hash = file_sha256(path)
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


def open_prepared(cfg: Any, rank: int, world_size: int
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
