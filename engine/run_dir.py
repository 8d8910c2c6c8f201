"""The run directory (--out) has one owner, and an earlier run in it is never lost.

Rules, applied by rank 0 before any data or model work (``claim_run_dir``):

1. --out must be a writable folder (created if missing): a file, or a read-only place, is
   refused with one message naming --out.
2. Lock: rank 0 takes an exclusive advisory lock (``fcntl.flock``) on ``<out>/run.lock`` and
   writes its pid and host into it; the lock is held for the run's life and released by the
   operating system however the process ends (a kill included). A second run into the same
   --out, with or without --resume, is refused at once, naming the holder's pid.
3. Relaunch: if --out holds an earlier run (checkpoints, or metrics.jsonl records) and
   --resume is not given, the run is refused: pass ``--resume auto`` to continue it, a new
   --out, or ``--overwrite``, which MOVES the earlier run's files (checkpoints/, metrics.jsonl,
   config.json) to ``<out>/previous/<UTC time>/``. ``--resume auto`` into a folder whose run
   died before its first checkpoint starts from scratch and moves that run's log aside the
   same way. Nothing is deleted.

The lock is advisory: it guards against a second run of this engine, on a file system where
flock works across the processes involved (local disks; NFS v4 too; it does not guard runs on
different hosts of a file system without lock support).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "run.lock"
PREVIOUS_SUBDIR = "previous"
# What a run writes into --out; --overwrite moves these aside.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.json")


class RunDirError(ValueError):
    """--out cannot be used by this run (not a writable folder, in use, or holding an earlier run)."""


class RunDirBusyError(RunDirError):
    """Another live process holds --out's lock."""


class RunDirLock:
    """An exclusive flock on ``<out>/run.lock`` holding the owner's pid; ``release`` (or exit) frees it."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self._file = None

    def acquire(self) -> RunDirLock:
        try:
            f = open(self.path, "a+")  # noqa: SIM115 (held open for the run's life)
        except OSError as exc:
            raise RunDirError(f"--out {self.out}: cannot write there ({exc.strerror}); pass a writable folder") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its pid yet"
            f.close()
            raise RunDirBusyError(f"--out {self.out} is in use by another run (pid {holder}, lock {self.path}); "
                                  "wait for it to end, or pass another --out") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            f.close()
            raise RunDirError(f"--out {self.out}: cannot write there ({exc.strerror}); pass a writable folder") from None
        self._file = f
        return self

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def ensure_out_dir(out: str | os.PathLike) -> Path:
    """--out as an existing folder (created if missing); RunDirError naming --out otherwise."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"--out {out}: cannot create the folder ({exc.strerror}); pass a writable folder") from None
    return path


def earlier_run(out: Path) -> str | None:
    """A description of an earlier run's outputs in ``out``, or None if there are none."""
    ckpts = out / "checkpoints"
    steps = sorted(p.name for p in ckpts.glob("step_*")) if ckpts.is_dir() else []
    if steps:
        return f"checkpoints ({', '.join(steps[-3:])}{' ...' if len(steps) > 3 else ''})"
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return "a metrics.jsonl with records"
    return None


def move_aside(out: Path) -> Path:
    """Move an earlier run's outputs to ``<out>/previous/<UTC time>/``; returns that folder."""
    target = out / PREVIOUS_SUBDIR / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    while target.exists():
        target = target.with_name(target.name + "+")
    target.mkdir(parents=True)
    for name in RUN_OUTPUTS:
        if (out / name).exists():
            (out / name).rename(target / name)
    return target


def claim_run_dir(out: str | os.PathLike, resume: str | None, overwrite: bool) -> RunDirLock:
    """Rules 1-3 of the module docstring; returns the held lock (the caller releases it)."""
    path = ensure_out_dir(out)
    lock = RunDirLock(path).acquire()
    try:
        found = earlier_run(path)
        if found and resume == "auto" and not found.startswith("checkpoints"):
            # Nothing to resume, but the log of a run that died before its first checkpoint is kept.
            target = move_aside(path)
            print(f"--resume auto: no checkpoint in {out}; the earlier run's log was moved to {target}", flush=True)
        elif found and not resume:
            if not overwrite:
                raise RunDirError(
                    f"--out {out} already holds an earlier run ({found}); pass --resume auto to continue it, "
                    "another --out, or --overwrite to move it aside (into "
                    f"{path / PREVIOUS_SUBDIR}/); nothing was changed")
            target = move_aside(path)
            print(f"--overwrite: moved the earlier run in {out} to {target}", flush=True)
    except BaseException:
        lock.release()
        raise
    return lock


def claim_run_dir_on_rank0(out: str | os.PathLike, resume: str | None, overwrite: bool, rank: int,
                           world_size: int) -> RunDirLock | None:
    """``claim_run_dir`` on rank 0 (the lock's holder); every rank raises the same RunDirError if it fails.

    Other ranks write nothing into --out before this returns: they wait in the broadcast.
    """
    lock, error = None, None
    if rank == 0:
        try:
            lock = claim_run_dir(out, resume, overwrite)
        except RunDirError as exc:
            error = exc
    if world_size > 1:
        import torch.distributed as dist  # noqa: PLC0415 (a world of one needs no process group)

        box = [None if error is None else (isinstance(error, RunDirBusyError), str(error))]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            busy, message = box[0]
            error = (RunDirBusyError if busy else RunDirError)(message)
    if error is not None:
        raise error
    return lock
