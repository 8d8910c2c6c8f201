"""Checkpoints: sharded save/load with torch.distributed.checkpoint (DCP), exact resume, faults.

Layout of one checkpoint (``<out>/checkpoints/step_00000020/``)::

    .metadata, __<rank>_0.distcp   DCP: model and optimizer (FSDP2 DTensors, resharded on load)
    state.json                     step, config, data-loader position, LR schedule, bad-step counts
    rng_rank_<r>.json              each rank's RNG states (torch CPU/CUDA, python, numpy)
    COMPLETE                       marker: {"step", "files": {name: size}}, written last

Atomicity: everything is written into ``step_XXXXXXXX.tmp``; after a barrier rank 0 writes the
marker and renames the folder (all ranks must see one filesystem, as DCP's FileSystemWriter
needs). A folder without a valid marker, with a missing or truncated file, or whose state cannot
be read is skipped with a warning and the previous checkpoint is used. A run sets aside the
checkpoints newer than its start (``superseded_step_*``), so ``--resume auto`` stays on its timeline.
The marker records sizes, not checksums (hashing every shard would re-read the whole checkpoint):
a same-size corruption is caught only when DCP fails to load it, and then the previous one is used.
``--async-ckpt``: dcp.async_save copies the state to CPU memory and writes it from a thread; the
marker and rename follow when the next save starts or the run ends.

Safety: nothing in a checkpoint is unpickled freely. DCP's ``.metadata`` (a pickle) goes through a
restricted unpickler that admits DCP's own metadata classes only; DCP's non-tensor items (the
optimizer's hyper-parameters) through ``torch.load(weights_only=True)``; tensors through DCP's
``weights_only`` reader; everything else is JSON.

Stop signals and fault-injection hooks: engine/faults.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

CKPT_SUBDIR = "checkpoints"
MARKER = "COMPLETE"
STATE_FILE = "state.json"
_NAME = re.compile(r"^step_(\d{8})$")
# Fields that change parameter shapes or which parameters exist: a checkpoint must agree on them.
MODEL_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "n_experts",
                "moe_top_k", "n_shared_experts", "moe_ffn_hidden", "shared_ffn_hidden", "n_dense_layers",
                "nitp_projector_mult")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, corrupt, incompatible or unsafe)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks to unpickle something other than DCP's metadata classes."""


# ----------------------------------------------------------------------------- safe reading

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
            from torch.distributed.checkpoint.metadata import StorageMeta
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


# ----------------------------------------------------------------------------- layout

def checkpoint_root(out: str) -> Path:
    return Path(out) / CKPT_SUBDIR


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def validate_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint folder is complete and readable; return its state.json content.

    Raises CheckpointError naming what is wrong (UnsafeCheckpointError for a refused pickle).
    """
    path = Path(path)
    try:
        marker = _read_json(path / MARKER)
        files = marker["files"]
        for name, size in files.items():
            actual = (path / name).stat().st_size
            if actual != size:
                raise CheckpointError(f"{path / name}: {actual} bytes, the marker says {size}")
        state = _read_json(path / STATE_FILE)
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
    """``--resume`` value -> a checkpoint folder: "auto" = newest valid in out (None if there is
    none); a checkpoint folder itself; or a run / checkpoints folder (its newest valid one)."""
    if spec == "auto":
        found = latest_valid(checkpoint_root(out))
        return found[0] if found else None
    path = Path(spec)
    if (path / MARKER).exists():
        validate_checkpoint(path)
        return path
    for root in (path / CKPT_SUBDIR, path):
        found = latest_valid(root)
        if found:
            return found[0]
    raise CheckpointError(f"--resume {spec}: no complete checkpoint found there")


def check_compatible(saved: dict[str, Any], cfg: Any, where: str) -> None:
    """Refuse a checkpoint whose model differs from cfg's, naming every mismatched field."""
    wanted_projector = cfg.objective == "nitp" and cfg.nitp_projector
    saved_projector = saved.get("objective") == "nitp" and saved.get("nitp_projector", True)
    diffs = [f"{f}: checkpoint {saved.get(f)!r} vs run {getattr(cfg, f)!r}"
             for f in MODEL_FIELDS if saved.get(f) != getattr(cfg, f)]
    if wanted_projector != saved_projector:
        diffs.append(f"NITP projector (objective/nitp_projector): checkpoint {saved_projector} vs "
                     f"run {wanted_projector}")
    if diffs:
        raise CheckpointError(f"checkpoint {where} does not fit this run's model: " + "; ".join(diffs))


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


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- save / load

class Checkpointer:
    """Saves and restores a TrainState (engine/trainer.py) under ``<cfg.out>/checkpoints``."""

    def __init__(self, cfg: Any, info: Any):
        self.cfg, self.info = cfg, info
        self.root = checkpoint_root(cfg.out)
        self.last_saved_step: int | None = None
        self._pending: tuple[Any, Path, Path, int] | None = None  # async save in flight
        self._async_group = None

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def save(self, state: Any) -> Path:
        """Write a checkpoint of ``state`` at ``state.step`` (all ranks call this)."""
        self.finalize()  # at most one asynchronous save in flight
        step, is_main = state.step, self.info.is_main
        tmp, final = self.root / f"step_{step:08d}.tmp", step_dir(self.root, step)
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _write_json(tmp / STATE_FILE, {
                "step": step, "config": self.cfg.to_dict(), "data_info": state.data.info,
                "world_size": self.info.world_size, "loader": state.data.train.state_dict(),
                "scheduler": state.scheduler.state_dict(), "bad_steps": state.bad_steps,
                "consecutive_bad_steps": state.consecutive_bad_steps})
        self._barrier()
        _write_json(tmp / f"rng_rank_{self.info.rank}.json", rng_state())
        model_sd, optim_sd = get_state_dict(state.model, state.optimizer)
        to_save = {"model": model_sd, "optim": optim_sd}
        if self.cfg.async_ckpt:
            future = dcp.async_save(to_save, storage_writer=FileSystemWriter(tmp),
                                    process_group=self._gloo_group())
            self._pending = (future, tmp, final, step)
        else:
            dcp.save(to_save, storage_writer=FileSystemWriter(tmp))
            self._commit(tmp, final, step)
        self.last_saved_step = step
        return final

    def _gloo_group(self):
        # async_save runs its collectives on a CPU group; the default one is gloo on CPU already.
        if dist.get_backend() == "gloo":
            return None
        if self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def finalize(self) -> None:
        """Wait for an asynchronous save in flight and commit it."""
        if self._pending is not None:
            future, tmp, final, step = self._pending
            self._pending = None
            future.result()
            self._commit(tmp, final, step)

    def _commit(self, tmp: Path, final: Path, step: int) -> None:
        self._barrier()  # every rank's files are written
        if self.info.is_main:
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            _write_json(tmp / MARKER, {"step": step, "files": files})
            old = final.with_name(final.name + ".old")
            if final.exists():  # an earlier run's checkpoint at this step: replace it
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            self._prune(step)
        self._barrier()

    def _prune(self, newest: int) -> None:
        for stale in self.root.glob("step_*.tmp"):  # crashed saves of earlier steps
            if int(stale.name[5:13]) < newest:
                shutil.rmtree(stale, ignore_errors=True)
        if self.cfg.keep_last > 0:
            for _, path in list_checkpoints(self.root)[:-self.cfg.keep_last]:
                shutil.rmtree(path, ignore_errors=True)

    def start(self, state: Any) -> Path | None:
        """Resume if cfg.resume asks to, then retire this run's checkpoints newer than the start.

        Newer ones belong to a timeline this run abandons (a fresh run in an old --out, an explicit
        --resume of an older step, or corrupt saves that were skipped): they are renamed
        ``superseded_step_*`` (replacing an earlier such set), so a later ``--resume auto`` cannot
        jump to them.
        """
        used = self.resume(state) if self.cfg.resume else None
        if self.info.is_main:
            # One generation of superseded checkpoints is kept, so repeated fresh runs in one --out
            # do not pile them up.
            newer = [p for s, p in list_checkpoints(self.root) if s > state.step]
            if newer:
                for old in self.root.glob("superseded_*"):
                    shutil.rmtree(old, ignore_errors=True)
            newer += [p for p in self.root.glob("step_*.tmp") if _step_of(p) > state.step]
            for path in newer:
                target = path.with_name("superseded_" + path.name)
                shutil.rmtree(target, ignore_errors=True)
                path.rename(target)
            if newer:
                warnings.warn(f"{len(newer)} checkpoint(s) in {self.root} newer than step {state.step} were "
                              f"renamed superseded_step_* (this run starts at step {state.step})", stacklevel=2)
        self._barrier()
        return used

    def resume(self, state: Any) -> Path | None:
        """Restore ``state`` from cfg.resume; returns the checkpoint used (None: nothing to resume).

        Candidates are tried newest first; one that fails to load (a corrupt file) is skipped
        with a warning. An incompatible or unsafe checkpoint stops the run with CheckpointError.
        """
        spec = self.cfg.resume
        first = resolve_checkpoint(spec, self.cfg.out)
        if first is None:
            if self.info.is_main:
                print(f"--resume {spec}: no checkpoint in {self.root}; starting from scratch", flush=True)
            return None
        candidates = [first] + [p for _, p in reversed(list_checkpoints(first.parent))
                                if _step_of(p) < _step_of(first)]
        for path in candidates:
            try:
                saved = validate_checkpoint(path)
            except UnsafeCheckpointError:
                raise
            except CheckpointError as exc:
                warnings.warn(f"skipping checkpoint {path}: {exc}", stacklevel=2)
                continue
            check_compatible(saved["config"], self.cfg, str(path))
            try:
                self._load(state, path, saved)
            except UnsafeCheckpointError:
                raise
            except (Exception, CheckpointException) as exc:  # DCP raises on every rank alike: all fall back
                warnings.warn(f"skipping checkpoint {path}: loading failed ({type(exc).__name__}: {exc})",
                              stacklevel=2)
                continue
            if self.info.is_main:
                print(f"resumed from {path} (step {state.step})", flush=True)
            return path
        raise CheckpointError(f"--resume {spec}: no loadable checkpoint in {first.parent}")

    def _load(self, state: Any, path: Path, saved: dict[str, Any]) -> None:
        model_sd, optim_sd = get_state_dict(state.model, state.optimizer)
        to_load = {"model": model_sd, "optim": optim_sd}
        dcp.load(to_load, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
        set_state_dict(state.model, state.optimizer, model_state_dict=to_load["model"],
                       optim_state_dict=to_load["optim"])
        state.data.train.load_state_dict(saved["loader"])
        known = state.scheduler.state_dict().keys()  # JSON from disk sets known attributes only
        state.scheduler.load_state_dict({k: v for k, v in saved["scheduler"].items() if k in known})
        state.step = int(saved["step"])
        state.bad_steps = int(saved.get("bad_steps", 0))
        state.consecutive_bad_steps = int(saved.get("consecutive_bad_steps", 0))
        # Same world size: each rank its own RNG; otherwise rank r takes saved rank r mod saved world.
        rng_file = path / f"rng_rank_{self.info.rank % int(saved['world_size'])}.json"
        set_rng_state(_read_json(rng_file))
        self.last_saved_step = state.step


def _step_of(path: Path) -> int:
    return int(path.name[5:13])


def truncate_metrics(metrics_path: str | os.PathLike, step: int) -> None:
    """Drop metrics.jsonl records after ``step`` (a killed run may have logged past its checkpoint)."""
    path = Path(metrics_path)
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip()
            and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))
