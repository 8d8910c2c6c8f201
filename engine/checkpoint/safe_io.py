"""Reading checkpoints without unpickling anything but DCP's own metadata classes.

DCP's ``.metadata`` (a pickle) goes through a restricted unpickler that admits DCP's metadata
classes only; DCP's non-tensor items (the optimizer's hyper-parameters) go through
``torch.load(weights_only=True)``; tensors through DCP's ``weights_only`` reader; everything
else in a checkpoint is JSON.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, corrupt, incompatible, unsafe or unwritable)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks to unpickle something other than DCP's metadata classes."""


_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    (_DCP_METADATA, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                 "ChunkStorageMetadata", "TensorProperties", "StorageMeta",
                                 "MetadataIndex", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "Path")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler admitting DCP's metadata classes, torch dtypes and a few plain builtins only."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"refusing to unpickle {module}.{name} from a checkpoint's .metadata: only DCP's own "
            "metadata classes are allowed (the file may have been tampered with)")


def read_metadata_safely(path: str | os.PathLike) -> Metadata:
    """Read a DCP ``.metadata`` file with the restricted unpickler (UnsafeCheckpointError if refused)."""
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except UnsafeCheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable DCP metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: expected DCP Metadata, found {type(metadata).__name__}")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's filesystem reader with ``.metadata`` read by the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata_safely(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor items are read with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
