"""File checksums shared by the prepared-data cache (engine/data) and the checkpoints (engine/checkpoint)."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (hashlib.file_digest needs Python 3.11; we support 3.10)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
