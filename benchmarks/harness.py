"""Measurement: interleaved timing, bytes saved for backward, peak resident memory, CUDA peak allocation.

Timing runs every method once per repetition, in an order rotated from one repetition to the next, so that
whatever the machine does meanwhile (other processes, frequency changes) falls on all methods alike; the
figure is the median over the repetitions, after warm-up runs that are not timed.
"""
from __future__ import annotations

import ctypes
import gc
import resource
import statistics
import sys
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], None], device: torch.device) -> float:
    """Wall time of fn() in ms (CUDA: between events, after a synchronisation)."""
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _sync(device)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(stop))
    began = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - began)


def time_interleaved(fns: dict[str, Callable[[], None]], *, warmup: int, reps: int,
                     device: torch.device, before_each: Callable[[], None] | None = None,
                     on_error: Callable[[str, BaseException], None] | None = None) -> dict[str, list[float]]:
    """Times of each fn over `reps` rotated rounds after `warmup` rounds: {name: [ms, ...]}.

    A fn that raises (in warm-up or later) is dropped from the rounds and reported through on_error;
    without on_error the exception propagates.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    live = dict(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}

    def call(name: str) -> float | None:
        try:
            if before_each is not None:
                before_each()
            return time_once(live[name], device)
        except Exception as err:  # a failing contender must not cost the others their figures
            if on_error is None:
                raise
            on_error(name, err)
            del live[name]
            times.pop(name, None)
            return None

    for _ in range(warmup):
        for name in list(live):
            call(name)
    for rep in range(reps):
        names = list(live)
        shift = rep % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            elapsed = call(name)
            if elapsed is not None:
                times[name].append(elapsed)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def saved_tensor_bytes(fn: Callable[[], torch.Tensor],
                       exclude: list[torch.Tensor] = ()) -> tuple[int, int, torch.Tensor]:
    """(bytes of all storages saved for backward, bytes of those that are not storages of `exclude`, fn()).

    Counted by storage, so views of one buffer count once; `exclude` are the inputs, which exist anyway.
    """
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    inputs = {t.untyped_storage().data_ptr() for t in exclude}
    new = sum(nbytes for ptr, nbytes in storages.items() if ptr not in inputs)
    return sum(storages.values()), new, out


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark (Linux clear_refs 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def release_free_memory() -> None:
    """Hand memory freed by Python and malloc back to the OS (glibc malloc_trim), so that a following peak
    measurement sees every page fn() touches rather than pages kept resident from earlier work."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure is then a lower bound
        pass


def peak_rss_delta(fn: Callable[[], None]) -> dict:
    """Peak resident memory of fn() above the resident memory just before it.

    Freed memory is returned to the OS first (release_free_memory). Linux: the high-water mark VmHWM is then
    reset, so earlier peaks (imports, a compiler) do not hide it. Elsewhere: getrusage's ru_maxrss after minus
    before (a lower bound when an earlier peak was higher).
    """
    release_free_memory()
    if reset_peak_rss():
        before = _status_kib("VmRSS")
        fn()
        return {"peak_rss_extra_bytes": 1024 * (_status_kib("VmHWM") - before), "rss_source": "VmHWM after clear_refs"}
    scale = 1 if sys.platform == "darwin" else 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_extra_bytes": scale * (after - before), "rss_source": "ru_maxrss after - before"}


def cuda_peak_delta(fn: Callable[[], None], device: torch.device) -> dict:
    """max_memory_allocated during fn() above what was allocated before it (inputs excluded)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"max_memory_allocated_bytes": int(peak), "peak_extra_bytes": int(peak - base)}
