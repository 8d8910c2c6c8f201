"""The engine's data pipeline: build_data opens a source and returns this rank's loaders.

    config      DataConfig (the data settings of a run) and DataError (leaf)
    loader      token streams, packed windows, the resumable training loader, validation batches
    synthetic   the synthetic source (tests and quick runs)
    corpus      real corpora (stdlib, local files, Hugging Face datasets), tokenized once and cached
    tokenizer   the byte-level BPE (trained and cached) or an existing tokenizer.json
    build       build_data, which picks the source and builds the loaders

engine.data.corpus and engine.data.tokenizer are not imported here: they need `tokenizers` and
`datasets`, which a run on synthetic data never loads.
"""

from engine.data.build import DataBundle, build_data
from engine.data.config import DataConfig, DataError
from engine.data.loader import (IGNORE_INDEX, PackedLoader, TokenStream, ValidationSet,
                                doc_cu_seqlens, make_batch, split_documents, token_dtype)
from engine.data.synthetic import select_documents, synthetic_stream

__all__ = ["IGNORE_INDEX", "DataBundle", "DataConfig", "DataError", "PackedLoader", "TokenStream",
           "ValidationSet", "build_data", "doc_cu_seqlens", "make_batch", "select_documents", "split_documents",
           "synthetic_stream", "token_dtype"]
