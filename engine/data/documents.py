"""Finding and reading the documents of a real corpus; bad data is skipped and counted, never fatal.

  "stdlib"           the .py files of the running Python's standard library (one file = one
                     document; site-packages/dist-packages and the data folders of test
                     directories excluded).
  a file/directory   .txt (one file = one document), .jsonl and .parquet (one record = one
                     document, text in --text-field).
  a dataset name     "owner/name" or "owner/name:config", split "train", via Hugging Face
                     `datasets` (needs a network or a warm Hugging Face cache).

Skipped, and counted per file in the log and in config.json's "data_skipped_*" keys: empty files,
.txt/.py files that are not UTF-8, files that cannot be read at all (a broken parquet file); and,
one record at a time, .jsonl lines that are not UTF-8 or not a JSON object, records without the
text field, and empty or non-text values. One bad record never costs the good ones around it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from engine.data.config import DataConfig, DataError
from engine.integrity import file_sha256

log = logging.getLogger(__name__)

FORMATS = (".txt", ".jsonl", ".parquet")
SKIPPED_FILE_KINDS = ("empty_files", "non_utf8_files", "unreadable_files")
SKIPPED_RECORD_KINDS = ("empty_docs", "non_text_docs", "non_utf8_docs", "malformed_records",
                        "records_without_field")
PARQUET_BATCH_ROWS = 1024  # rows per pyarrow batch: bounds the memory of one read


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
    """Accumulates document texts and counts what was skipped, per file and why."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.skipped_files: dict[str, list[str]] = {kind: [] for kind in SKIPPED_FILE_KINDS}
        self.skipped_records: dict[str, Counter[str]] = {}  # file -> kind -> count
        self.records: Counter[str] = Counter()              # file -> records seen

    def skip_record(self, kind: str, where: str) -> None:
        self.records[where] += 1
        self.skipped_records.setdefault(where, Counter())[kind] += 1

    def add(self, value: Any, where: str) -> None:
        """One record's text (str or UTF-8 bytes); anything else is counted and skipped."""
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                self.skip_record("non_utf8_docs", where)
                return
        if value is None or (isinstance(value, str) and not value.strip()):
            self.skip_record("empty_docs", where)
        elif not isinstance(value, str):
            self.skip_record("non_text_docs", where)
        else:
            self.records[where] += 1
            self.texts.append(value)

    def read_text_file(self, path: Path, rel: str) -> None:
        """A whole .txt/.py file as one document (skipped when empty or not UTF-8)."""
        raw = path.read_bytes()
        if not raw:
            self.skipped_files["empty_files"].append(rel)
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.skipped_files["non_utf8_files"].append(rel)
            return
        # universal newlines, as reading the file in text mode would give
        self.add(text.replace("\r\n", "\n").replace("\r", "\n"), rel)

    def read_jsonl(self, path: Path, rel: str, field: str, fields_seen: set[str]) -> int:
        """One document per line; a bad line is counted and skipped, the others are kept.
        Returns how many records had the field; the fields of those without it go to fields_seen."""
        with_field = 0
        if path.stat().st_size == 0:
            self.skipped_files["empty_files"].append(rel)
            return 0
        with open(path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    self.skip_record("non_utf8_docs", rel)
                    continue
                except ValueError:
                    self.skip_record("malformed_records", rel)
                    continue
                if not isinstance(record, dict):
                    self.skip_record("malformed_records", rel)
                elif field not in record:
                    fields_seen.update(record)
                    self.skip_record("records_without_field", rel)
                else:
                    with_field += 1
                    self.add(record[field], rel)
        return with_field

    def read_parquet(self, path: Path, rel: str, field: str) -> None:
        """One document per row of column `field`; an unreadable file is counted and skipped."""
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
            columns = table.schema_arrow.names
        except Exception:  # noqa: BLE001 -- pyarrow raises several types for a broken file
            self.skipped_files["unreadable_files"].append(rel)
            return
        if field not in columns:
            raise DataError(f"--text-field {field!r} is not a column of {rel}; columns: "
                            f"{', '.join(columns)}")
        try:
            for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
                for value in batch.column(0).to_pylist():
                    self.add(value, rel)
        except Exception:  # noqa: BLE001 -- a corrupt row group: what was read before is kept
            self.skipped_files["unreadable_files"].append(rel)

    def summary(self) -> dict[str, Any]:
        """The "data_skipped_*" counts (also logged, one warning per file with skipped records)."""
        out: dict[str, Any] = {f"data_skipped_{k}": len(v) for k, v in self.skipped_files.items()}
        totals: Counter[str] = sum(self.skipped_records.values(), Counter())
        out.update({f"data_skipped_{k}": totals[k] for k in SKIPPED_RECORD_KINDS})
        for kind, names in self.skipped_files.items():
            if names:
                log.warning("skipped %d %s: %s%s", len(names), kind.replace("_", " "),
                            ", ".join(names[:5]), " ..." if len(names) > 5 else "")
        for where, counts in self.skipped_records.items():
            reasons = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in sorted(counts.items()))
            log.warning("%s: skipped %d of %d records (%s)", where, sum(counts.values()),
                        self.records[where], reasons)
        return out


def _quiet_datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def load_hf_dataset(cfg: DataConfig) -> tuple[Any, str]:
    """(dataset, hash) for a Hugging Face dataset name ("owner/name" or "owner/name:config")."""
    datasets = _quiet_datasets()
    name, _, config = cfg.data.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train",
                                   cache_dir=str(Path(cfg.data_cache_dir) / "hf"))
    except Exception as err:  # noqa: BLE001 -- network, hub and format errors alike
        raise DataError(f"--data {cfg.data}: no such file or directory, and it could not be loaded "
                        f"as a Hugging Face dataset: {type(err).__name__}: {err}") from None
    fingerprint = getattr(ds, "_fingerprint", None) or repr(ds)
    return ds, hashlib.sha256(f"hf:{cfg.data}:{fingerprint}".encode()).hexdigest()


def collect_documents(cfg: DataConfig, root: Path | None, files: list[Path],
                      hf_dataset: Iterable[Any] | None) -> DocumentCollector:
    """Every usable document of the source, in a fixed order (files sorted, records in order)."""
    docs = DocumentCollector()
    if hf_dataset is not None:
        if cfg.text_field not in hf_dataset.column_names:
            raise DataError(f"--text-field {cfg.text_field!r} is not a column of {cfg.data}; "
                            f"columns: {', '.join(hf_dataset.column_names)}")
        for value in hf_dataset[cfg.text_field]:
            docs.add(value, cfg.data)
        return docs
    assert root is not None
    fields_seen: set[str] = set()
    with_field = 0
    for path in files:
        rel = str(path.relative_to(root))
        if path.suffix == ".jsonl":
            with_field += docs.read_jsonl(path, rel, cfg.text_field, fields_seen)
        elif path.suffix == ".parquet":
            docs.read_parquet(path, rel, cfg.text_field)
        else:
            docs.read_text_file(path, rel)
    if fields_seen and not with_field:
        raise DataError(f"--text-field {cfg.text_field!r} is not a column of the json data in "
                        f"{root}; columns: {', '.join(sorted(fields_seen))}")
    return docs
