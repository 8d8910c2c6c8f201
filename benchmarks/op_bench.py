"""Op level: forward + backward of methods a-g, side by side, over a grid of N, d, V.

Per shape, in one process on the same inputs: a first call of each method under saved-tensor hooks (the bytes it
keeps for backward, counted by storage; also its warm-up and its loss value, checked against the others); more
warm-up; then `reps` interleaved rounds (harness.time_interleaved), median reported. Peak memory: on CUDA
max_memory_allocated above the inputs; on a CPU the peak resident memory of one call in a fresh process
(rss_probe). Ratios: NITP overhead g/b beside the FLOPs ratio 1 + 12·d/V, and g against the fastest NTP-only
method that ran (the goal: NITP on our op costs no more than NTP on theirs).
"""
from __future__ import annotations

import gc
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from benchmarks.harness import cuda_peak_delta, median, saved_tensor_bytes, time_interleaved
from benchmarks.methods import (LETTERS, MATERIALISING_METHODS, METHODS, NITP_METHODS, NTP_METHODS,
                                MethodSkipped, build_method, flops_ratio, make_inputs)
from benchmarks.rss_probe import measure_in_subprocess

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class OpGrid:
    """What the op benchmark sweeps and how often it repeats."""

    ns: list[int]
    ds: list[int]
    vocabs: list[int]
    seq_len: int = 1024
    warmup: int = 1
    reps: int = 5
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    rss: bool = True                  # CPU: peak RSS of a fresh process per method
    dtype: str = "fp32"
    memory_fraction: float = 0.4      # skip a materialising method whose logits would pass this share of memory

    def __post_init__(self) -> None:
        if self.reps < 5:
            raise ValueError(f"reps must be >= 5 (the minimum for a median), got {self.reps}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {self.warmup}")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; choose from {METHODS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def grid_for(device: torch.device, mode: str) -> OpGrid:
    """The grids: 'full' (CPU: N 2048/8192, d 512/1024, V 32000/152064; CUDA: its own), 'quick', 'smoke'."""
    if mode not in ("full", "quick", "smoke"):
        raise ValueError(f"mode must be full, quick or smoke, got {mode!r}")
    if device.type == "cuda":
        grids = {"full": OpGrid([8192, 16384, 32768], [1280, 2560], [152064], seq_len=4096, dtype="bf16"),
                 "quick": OpGrid([8192], [1280], [152064], seq_len=4096, dtype="bf16"),
                 "smoke": OpGrid([1024], [256], [32000], seq_len=512, dtype="bf16")}
        return grids[mode]
    if mode == "full":
        return OpGrid([2048, 8192], [512, 1024], [32000, 152064])
    if mode == "quick":  # one shape, N a quarter of the full grid's smallest, same d/V (FLOPs ratio 1.192)
        return OpGrid([512], [512], [32000], seq_len=512)
    # smoke: seconds, no compiler (compiled methods cost ~30 s of compilation from a cold cache)
    return OpGrid([256], [64], [1000], seq_len=128, rss=False,
                  methods=["naive_ntp", "ours_ntp", "liger_flce", "naive_nitp", "ours_nitp"])


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return 1024 * int(line.split()[1])
    except OSError:
        pass
    return 1 << 62


def _too_big(name: str, n: int, d: int, vocab: int, grid: OpGrid, device: torch.device) -> str | None:
    """Why a materialising method would not fit (logits, their softmax and gradient: 3·N·V fp32), or None."""
    if name not in MATERIALISING_METHODS:
        return None
    need = 3 * n * vocab * 4 + (3 * n * 4 * d * 4 if name == "naive_nitp" else 0)
    budget = grid.memory_fraction * _available_bytes(device)
    if need > budget:
        return (f"would materialise ~{need / 2**30:.1f} GiB (N x V logits, softmax, gradient), over "
                f"{grid.memory_fraction:.0%} of the {budget / grid.memory_fraction / 2**30:.1f} GiB available")
    return None


def bench_shape(n: int, d: int, vocab: int, grid: OpGrid, device: torch.device,
                log: Callable[[str], None] = print) -> dict:
    """Every method of grid.methods at one (N, d, V): times, memory, losses, ratios."""
    x = make_inputs(n, d, vocab, seq_len=grid.seq_len, device=str(device), dtype=DTYPES[grid.dtype])
    records: dict[str, dict] = {name: {"letter": LETTERS[name]} for name in grid.methods}
    fns: dict[str, Callable[[], None]] = {}
    for name in grid.methods:
        reason = _too_big(name, n, d, vocab, grid, device)
        try:
            if reason:
                raise MethodSkipped(reason)
            loss_fn = build_method(name, x)
        except MethodSkipped as err:
            records[name]["skipped"] = str(err)
            continue
        # first call: bytes saved for backward, loss value, warm-up (and compilation) in one
        x.clear_grads()
        try:
            total, new, loss = saved_tensor_bytes(loss_fn, exclude=x.leaves())
            loss.backward()
        except Exception as err:  # record the contender's failure and go on with the others
            records[name]["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
            x.clear_grads()
            continue
        records[name].update(loss=float(loss.detach()), saved_bytes=total, saved_new_bytes=new)
        fns[name] = (lambda f: lambda: f().backward())(loss_fn)
        del loss

    def failed(name: str, err: BaseException) -> None:
        records[name]["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"

    times = time_interleaved(fns, warmup=grid.warmup - 1, reps=grid.reps, device=device,
                             before_each=x.clear_grads, on_error=failed)
    for name, values in times.items():
        records[name].update(time_ms_median=median(values), time_ms_all=[round(v, 3) for v in values])
    x.clear_grads()
    for name in times:
        if device.type == "cuda":
            records[name].update(cuda_peak_delta(fns[name], device))
            x.clear_grads()
    del fns, times
    gc.collect()
    if device.type != "cuda" and grid.rss:
        for name, record in records.items():
            if "time_ms_median" in record:
                record.update(measure_in_subprocess(name, n, d, vocab, grid.seq_len))
    result = {"n": n, "d": d, "vocab": vocab, "seq_len": x.seq_len, "dtype": grid.dtype,
              "flops_ratio": flops_ratio(d, vocab), "methods": records}
    result["ratios"] = shape_ratios(result)
    result["loss_check"] = loss_check(records, rtol=1e-4 if grid.dtype == "fp32" else 1e-2)
    for name, record in records.items():
        log(_line(n, d, vocab, name, record))
    return result


def _line(n: int, d: int, vocab: int, name: str, record: dict) -> str:
    head = f"  N={n} d={d} V={vocab} {record['letter']} {name:20s}"
    if "time_ms_median" not in record:
        status = f"skipped: {record['skipped']}" if "skipped" in record else f"error: {record.get('error', '')}"
        return f"{head} {status[:110]}"
    peak = record.get("peak_extra_bytes", record.get("peak_rss_extra_bytes"))
    shown = f"  peak {peak / 2**20:8.1f} MiB" if isinstance(peak, (int, float)) else ""
    return f"{head} {record['time_ms_median']:10.1f} ms  saved {record['saved_new_bytes'] / 2**20:8.1f} MiB{shown}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a / b):
        return None
    return a / b


def shape_ratios(shape: dict) -> dict:
    """NITP overhead g/b (time and memory) beside the FLOPs ratio; g against the fastest NTP-only method."""
    rec = shape["methods"]

    def get(name: str, key: str) -> float | None:
        value = rec.get(name, {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None

    memory_key = "peak_extra_bytes" if any("peak_extra_bytes" in r for r in rec.values()) else "peak_rss_extra_bytes"
    ntp_ran = {name: get(name, "time_ms_median") for name in NTP_METHODS if get(name, "time_ms_median")}
    best = min(ntp_ran, key=ntp_ran.get) if ntp_ran else None
    others = {k: v for k, v in ntp_ran.items() if k != "ours_ntp"}
    best_other = min(others, key=others.get) if others else None
    # measured, not assumed: a method that keeps fewer bytes for backward than the N x V fp32 logits
    logits_bytes = 4 * shape["n"] * shape["vocab"]
    low_memory = {k: v for k, v in ntp_ran.items() if (get(k, "saved_new_bytes") or 0) < logits_bytes}
    best_low = min(low_memory, key=low_memory.get) if low_memory else None
    g_all, b_all = rec.get("ours_nitp", {}).get("time_ms_all"), rec.get("ours_ntp", {}).get("time_ms_all")
    paired = median([g / b for g, b in zip(g_all, b_all)]) if g_all and b_all else None
    return {
        "flops_ratio": shape["flops_ratio"],
        "nitp_over_ntp_time": _ratio(get("ours_nitp", "time_ms_median"), get("ours_ntp", "time_ms_median")),
        # median over rounds of g/b within the same round: less exposed to load that drifts between rounds
        "nitp_over_ntp_time_paired": paired,
        "nitp_over_ntp_saved_bytes": _ratio(get("ours_nitp", "saved_new_bytes"), get("ours_ntp", "saved_new_bytes")),
        "nitp_over_ntp_peak_memory": _ratio(get("ours_nitp", memory_key), get("ours_ntp", memory_key)),
        "best_ntp_method": best,
        "nitp_over_best_ntp_time": _ratio(get("ours_nitp", "time_ms_median"), ntp_ran.get(best) if best else None),
        "best_other_ntp_method": best_other,
        "nitp_over_best_other_ntp_time": _ratio(get("ours_nitp", "time_ms_median"),
                                                others.get(best_other) if best_other else None),
        "best_low_memory_ntp_method": best_low,
        "nitp_over_best_low_memory_ntp_time": _ratio(get("ours_nitp", "time_ms_median"),
                                                     low_memory.get(best_low) if best_low else None),
        "naive_nitp_over_nitp_time": _ratio(get("naive_nitp", "time_ms_median"), get("ours_nitp", "time_ms_median")),
        "naive_ntp_over_flce_time": _ratio(get("naive_ntp", "time_ms_median"), get("ours_ntp", "time_ms_median")),
    }


def loss_check(records: dict, rtol: float) -> dict:
    """The NTP methods' losses agree with each other, and so do the NITP methods' (independent implementations)."""
    out = {}
    for group, names in (("ntp", NTP_METHODS), ("nitp", NITP_METHODS)):
        losses = [records[n]["loss"] for n in names if n in records and "loss" in records[n]]
        if len(losses) >= 2:
            spread = (max(losses) - min(losses)) / max(abs(min(losses)), 1e-12)
            out[group] = {"max_relative_spread": spread, "agree": spread <= rtol}
    return out


def run_op_bench(grid: OpGrid, device: torch.device, log: Callable[[str], None] = print) -> dict:
    """Every shape of the grid, small to large; returns {"grid": ..., "shapes": [...]}."""
    shapes = []
    for vocab in grid.vocabs:
        for d in grid.ds:
            for n in grid.ns:
                shapes.append(bench_shape(n, d, vocab, grid, device, log))
    return {"grid": asdict(grid), "shapes": shapes}
