"""The checkpointer: file IO only. It is handed a stateful object and never looks inside it.

The object (engine/trainer.TrainState) provides ``step``, ``state_dict()`` / ``load_state_dict()``
(JSON: state.json), ``tensor_state()`` (DCP Stateful objects: model and optimizer) and
``check_resumable(saved)`` (raises when this run may not continue that checkpoint).

Atomicity: everything is written into ``step_XXXXXXXX.tmp``; every rank hashes its own files,
rank 0 writes the COMPLETE marker with all sizes and SHA-256 sums and renames the folder (all
ranks must see one filesystem, as DCP's FileSystemWriter needs). A save that fails (disk full,
read-only) removes its ``.tmp`` folder, leaves the earlier checkpoints untouched and raises
CheckpointWriteError naming the folder, the cause, the bytes needed and the bytes free.

Loading: candidates are tried newest first; one that is incomplete, whose checksums differ, or
that DCP fails to read is skipped with a warning and the previous one is used. A checkpoint that
this run may not continue (engine/checkpoint/resume.py) or that asks to unpickle code stops the run.
After a resume, the checkpoints newer than the start belong to an abandoned timeline: they are
moved, never deleted, to ``checkpoints/superseded/<time>/``, so ``--resume auto`` stays on this
run's timeline. Only ``keep_last`` deletes checkpoints, and only this timeline's older ones.

``--async-ckpt``: dcp.async_save copies the state to CPU memory and writes it from a thread; the
hashing, marker and rename follow when the next save starts or the run ends.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.stateful import Stateful

from engine.checkpoint.layout import (MARKER, STATE_FILE, SUPERSEDED_SUBDIR, checkpoint_root, describe_files,
                                      list_checkpoints, read_json, resolve_checkpoint, rng_state,
                                      set_rng_state, step_dir, step_of, validate_checkpoint, write_json)
from engine.checkpoint.safe_io import (CheckpointError, SafeFileSystemReader, SafeLoadPlanner,
                                       UnsafeCheckpointError)


class Checkpointable(Protocol):
    step: int

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def tensor_state(self) -> dict[str, Stateful]: ...
    def check_resumable(self, saved: dict[str, Any], where: str) -> None: ...


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, read-only, ...); nothing partial is left."""


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()  # a DTensor's numel is the global one
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class Checkpointer:
    """Saves and restores a Checkpointable under ``<cfg.out>/checkpoints`` (cfg: TrainConfig, info: DistInfo)."""

    def __init__(self, cfg: Any, info: Any):
        self.cfg, self.info = cfg, info
        self.root = checkpoint_root(cfg.out)
        self.last_saved_step: int | None = None
        self._pending: tuple[Any, Path, Path, int, Checkpointable] | None = None  # async save in flight
        self._async_group = None

    # -- collectives: every rank must take the same branch

    def _multi(self) -> bool:
        return dist.is_initialized() and dist.get_world_size() > 1

    def _barrier(self) -> None:
        if self._multi():
            dist.barrier()

    def _gather(self, obj: Any) -> list[Any]:
        if not self._multi():
            return [obj]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def _first_error(self, error: str | None) -> str | None:
        return next((e for e in self._gather(error) if e), None)

    # -- save

    def save(self, state: Checkpointable) -> Path:
        """Write a checkpoint of ``state`` at ``state.step`` (all ranks call this)."""
        self.finalize()  # at most one asynchronous save in flight
        step = state.step
        tmp, final = self.root / f"step_{step:08d}.tmp", step_dir(self.root, step)
        error = None
        try:
            if self.info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                write_json(tmp / STATE_FILE, state.state_dict())
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._check(self._first_error(error), tmp, step, state)
        try:
            write_json(tmp / f"rng_rank_{self.info.rank}.json", rng_state())
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._check(self._first_error(error), tmp, step, state)
        try:
            if self.cfg.async_ckpt:
                future = dcp.async_save(state.tensor_state(), storage_writer=FileSystemWriter(tmp),
                                        process_group=self._gloo_group())
                self._pending = (future, tmp, final, step, state)
            else:
                dcp.save(state.tensor_state(), storage_writer=FileSystemWriter(tmp))
        except (Exception, CheckpointException) as exc:  # DCP fails on every rank alike
            self._check(_cause(exc), tmp, step, state)
        if not self.cfg.async_ckpt:
            self._commit(tmp, final, step, state)
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
            future, tmp, final, step, state = self._pending
            self._pending = None
            try:
                future.result()
            except (Exception, CheckpointException) as exc:
                self._check(_cause(exc), tmp, step, state)
            self._commit(tmp, final, step, state)

    def _my_files(self, tmp: Path) -> list[str]:
        """The files this rank wrote (DCP names its data files __<rank>_<n>.distcp)."""
        rank = self.info.rank
        mine = [p.name for p in tmp.glob(f"__{rank}_*.distcp")] + [f"rng_rank_{rank}.json"]
        return mine + ([".metadata", STATE_FILE] if self.info.is_main else [])

    def _commit(self, tmp: Path, final: Path, step: int, state: Checkpointable) -> None:
        self._barrier()  # every rank's files are written
        error, described = None, {}
        try:  # each rank hashes what it wrote, in parallel
            described = describe_files(tmp, self._my_files(tmp))
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        gathered = self._gather((error, described))
        self._check(next((e for e, _ in gathered if e), None), tmp, step, state)
        error = None
        if self.info.is_main:
            try:
                files = {k: v for _, d in gathered for k, v in d.items()}
                rest = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name not in files)
                files.update(describe_files(tmp, rest))  # anything DCP named otherwise
                write_json(tmp / MARKER, {"step": step, "files": dict(sorted(files.items()))})
                if final.exists():  # an abandoned timeline's checkpoint at this step: set it aside
                    self._set_aside([final])
                tmp.rename(final)
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
        self._check(self._first_error(error), tmp, step, state)
        if self.info.is_main:
            self._prune()
        self._barrier()

    def _check(self, error: str | None, tmp: Path, step: int, state: Checkpointable) -> None:
        """Every rank knows ``error`` (the first rank's); on one, clean up and raise CheckpointWriteError."""
        if error is None:
            return
        self._barrier()
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        needed = sum(_tensor_bytes(s.state_dict()) for s in state.tensor_state().values())
        try:
            free_bytes = shutil.disk_usage(self.root).free
            # torch's zip writer may report a full disk only as "unexpected pos ..."
            space = f"the file system has {_megabytes(free_bytes)} free" + (
                " (less than that: the disk is full)" if free_bytes < needed else "")
        except OSError:
            space = "the free space could not be read"
        previous = list_checkpoints(self.root)
        kept = f"the previous checkpoint (step {previous[-1][0]}) is intact" if previous else "no earlier checkpoint"
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {step} to {tmp} ({error}). It needs about "
            f"{_megabytes(needed)} (model and optimizer tensors) and {space}. The partial "
            f"files were removed; {kept}. Free some space (or use another --out) and continue with --resume auto")

    def _prune(self) -> None:
        if self.cfg.keep_last > 0:
            for _, path in list_checkpoints(self.root)[:-self.cfg.keep_last]:
                shutil.rmtree(path, ignore_errors=True)

    def _set_aside(self, paths: list[Path]) -> Path:
        """Move checkpoints of an abandoned timeline to checkpoints/superseded/<UTC time>/ (never delete)."""
        target = self.root / SUPERSEDED_SUBDIR / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        while target.exists():
            target = target.with_name(target.name + "+")
        target.mkdir(parents=True)
        for path in paths:
            path.rename(target / path.name)
        return target

    # -- start / resume

    def start(self, state: Checkpointable) -> Path | None:
        """Resume if cfg.resume asks to; then set aside the checkpoints newer than the start and
        remove interrupted saves (``.tmp`` folders, never complete) left by earlier runs."""
        used = self.resume(state) if self.cfg.resume else None
        if self.info.is_main and self.root.is_dir():
            for partial in self.root.glob("step_*.tmp"):
                shutil.rmtree(partial, ignore_errors=True)
            newer = [p for s, p in list_checkpoints(self.root) if s > state.step]
            if newer:
                target = self._set_aside(newer)
                warnings.warn(f"{len(newer)} checkpoint(s) newer than step {state.step} (where this run starts) "
                              f"were moved to {target}", stacklevel=2)
        self._barrier()
        return used

    def resume(self, state: Checkpointable) -> Path | None:
        """Restore ``state`` from cfg.resume; returns the checkpoint used (None: nothing to resume)."""
        spec = self.cfg.resume
        first = resolve_checkpoint(spec, self.cfg.out)
        if first is None:
            if self.info.is_main:
                print(f"--resume {spec}: no checkpoint in {self.root}; starting from scratch", flush=True)
            return None
        # "auto" or a run folder: fall back to older checkpoints; a checkpoint folder named itself: that one only.
        explicit = spec != "auto" and Path(spec).resolve() == first.resolve()
        candidates = [first] + ([] if explicit else [p for _, p in reversed(list_checkpoints(first.parent))
                                                     if step_of(p) < step_of(first)])
        share = (self.info.rank, self.info.world_size)  # ranks share the checksum reading
        skipped: list[str] = []
        for path in candidates:
            try:
                saved, error = validate_checkpoint(path, checksum_share=share), None
            except UnsafeCheckpointError:
                raise
            except CheckpointError as exc:
                saved, error = None, str(exc)
            error = self._first_error(error)
            if error:
                skipped.append(f"{path.name}: {error}")
                warnings.warn(f"skipping checkpoint {path}: {error}", stacklevel=2)
                continue
            state.check_resumable(saved, str(path))
            try:
                dcp.load(state.tensor_state(), storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
            except UnsafeCheckpointError:
                raise
            except (Exception, CheckpointException) as exc:  # DCP raises on every rank alike: all fall back
                skipped.append(f"{path.name}: loading failed ({type(exc).__name__}: {exc})")
                warnings.warn(f"skipping checkpoint {path}: {skipped[-1].split(': ', 1)[1]}", stacklevel=2)
                continue
            state.load_state_dict(saved)
            # Same world size: each rank its own RNG; otherwise rank r takes saved rank r mod saved world.
            saved_world = int(saved.get("world_size", 1))
            set_rng_state(read_json(path / f"rng_rank_{self.info.rank % saved_world}.json"))
            self.last_saved_step = state.step
            if self.info.is_main:
                print(f"resumed from {path} (step {state.step})", flush=True)
            return path
        where = first if explicit else first.parent
        raise CheckpointError(f"--resume {spec}: no loadable checkpoint in {where}: {'; '.join(skipped)}")


def _cause(exc: BaseException) -> str:
    """The underlying error of a DCP failure (CheckpointException wraps each rank's)."""
    if isinstance(exc, CheckpointException):
        failures = getattr(exc, "failures", {}) or {}
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                return f"{type(inner).__name__}: {inner}"
    return f"{type(exc).__name__}: {exc}"
