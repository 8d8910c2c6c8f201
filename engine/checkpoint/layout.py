"""A checkpoint folder on disk: its names, its COMPLETE marker with a checksum of every file,
validation, discovery, and the per-rank RNG states (JSON).

Layout of one checkpoint (``<out>/checkpoints/step_00000020/``)::

    .metadata, __<rank>_0.distcp   DCP: model and optimizer (FSDP2 DTensors, resharded on load)
    state.json                     the TrainState's state_dict(): step, config, loader, counters
    rng_rank_<r>.json              each rank's RNG states (torch CPU/CUDA, python, numpy)
    COMPLETE                       {"step", "files": {name: {"size", "sha256"}}}, written last

A folder is valid when its marker can be read, every file it lists has the recorded size and
SHA-256, state.json agrees on the step and ``.metadata`` passes the restricted unpickler.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.checkpoint.safe_io import CheckpointError, UnsafeCheckpointError, read_metadata_safely
from engine.integrity import file_sha256

CKPT_SUBDIR = "checkpoints"
SUPERSEDED_SUBDIR = "superseded"  # checkpoints of an abandoned timeline, under checkpoints/
MARKER = "COMPLETE"
STATE_FILE = "state.json"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_root(out: str | os.PathLike) -> Path:
    return Path(out) / CKPT_SUBDIR


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def step_of(path: Path) -> int:
    """The step in a ``step_XXXXXXXX`` (or ``step_XXXXXXXX.tmp``) folder name."""
    return int(path.name[5:13])


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def write_json(path: Path, obj: Any) -> None:
    """Write and fsync (a checkpoint's files must be on disk before its marker is)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


def describe_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {"size", "sha256"}} of the given files of ``folder`` (what the marker records)."""
    return {n: {"size": (folder / n).stat().st_size, "sha256": file_sha256(folder / n)} for n in names}


def _check_file(path: Path, entry: Any, verify_checksum: bool) -> None:
    # Markers written before checksums were recorded hold the size alone.
    size, digest = (entry, None) if isinstance(entry, int) else (entry["size"], entry.get("sha256"))
    actual = path.stat().st_size
    if actual != size:
        raise CheckpointError(f"{path}: {actual} bytes, the marker says {size}")
    if verify_checksum and digest is not None and file_sha256(path) != digest:
        raise CheckpointError(f"{path}: SHA-256 differs from the one recorded when it was written "
                              "(the file was modified or corrupted on disk)")


def validate_checkpoint(path: str | os.PathLike, checksum_share: tuple[int, int] | None = (0, 1)
                        ) -> dict[str, Any]:
    """Check a checkpoint folder is complete and intact; return its state.json content.

    checksum_share=(i, n): verify the SHA-256 of every n-th file starting at i (in name order),
    so n ranks can share the re-reading; None: sizes only. Raises CheckpointError naming what is
    wrong (UnsafeCheckpointError for a refused pickle).
    """
    path = Path(path)
    try:
        marker = read_json(path / MARKER)
        files = marker["files"]
        for k, name in enumerate(sorted(files)):
            verify = checksum_share is not None and k % checksum_share[1] == checksum_share[0]
            _check_file(path / name, files[name], verify)
        state = read_json(path / STATE_FILE)
        if state["step"] != marker["step"]:
            raise CheckpointError(f"{path}: state.json step {state['step']} != marker step {marker['step']}")
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: incomplete or corrupt checkpoint ({type(exc).__name__}: {exc})") from None
    read_metadata_safely(path / ".metadata")
    return state


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished-looking checkpoint folders (not ``.tmp``), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_valid(root: Path, warn: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``root`` that validates; invalid ones are skipped with a warning."""
    import warnings

    for _, path in reversed(list_checkpoints(root)):
        try:
            return path, validate_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            if warn:
                warnings.warn(f"skipping checkpoint {path}: {exc}", stacklevel=2)
    return None


def resolve_checkpoint(spec: str, out: str) -> Path | None:
    """``--resume`` value -> a checkpoint folder (not yet validated): "auto" = the newest one in
    out (None if there is none); a checkpoint folder itself; or a run / checkpoints folder."""
    if spec == "auto":
        found = list_checkpoints(checkpoint_root(out))
        return found[-1][1] if found else None
    path = Path(spec)
    if (path / MARKER).exists():
        return path
    for root in (path / CKPT_SUBDIR, path):
        found = list_checkpoints(root)
        if found:
            return found[-1][1]
    raise CheckpointError(f"--resume {spec}: no complete checkpoint found there")


# ----------------------------------------------------------------------------- RNG state as JSON

def rng_state() -> dict[str, Any]:
    """This process's RNG states in JSON-able form."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"torch_cpu": torch.get_rng_state().numpy().tobytes().hex(),
           "python": [version, list(internal), gauss],
           "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray.fromhex(state["torch_cpu"]), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = state.get("torch_cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray.fromhex(s), dtype=torch.uint8) for s in cuda])
