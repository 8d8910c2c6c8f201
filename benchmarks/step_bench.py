"""Step level: one whole training step (forward, backward, optimizer), NTP against NITP.

The engine's own code path: `build_state` (FSDP2 over a world of one, AdamW, the fused loss) and `train_step`,
on the engine's synthetic data. Both objectives are built in this one process from the same seed and timed in
interleaved rounds on the same batches. Reported per config: tokens/s, the overhead of NITP in % beside the
full-count and paper-formula theoretical overheads (engine.flops), MFU (full-count FLOPs of the objective over the
device peak: on a CPU the fp32 rate of a large matmul measured in this process, on CUDA the datasheet bf16 peak
the engine knows), and the peak memory of one step (CPU: resident high-water mark, reset before the step;
CUDA: max_memory_allocated).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch

from benchmarks.harness import cuda_peak_delta, median, peak_rss_delta, time_interleaved

# "small" is the larger CPU-sized config: tiny's recipe at width 256 and depth 6.
STEP_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(),
    "small": dict(d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, ffn_hidden=768, nitp_layer=1),
}
# smoke: a model small enough that a step takes milliseconds (the test suite's 30-second budget)
SMOKE_OVERRIDES = dict(seq_len=32, batch_size=2, micro_batch_size=2, vocab_size=512, d_model=64, n_layers=2,
                       n_heads=2, n_kv_heads=1, ffn_hidden=128, nitp_layer=1)


def _build(name: str, objective: str, smoke: bool, out: str):
    from engine.config import make_config
    from engine.trainer import build_state

    overrides = {**STEP_CONFIGS[name], **(SMOKE_OVERRIDES if smoke else {})}
    # a run directory of its own: the engine claims (locks) --out, and two states share this process
    cfg = make_config("tiny", objective=objective, data="synthetic", out=out, **overrides)
    return build_state(cfg)


def _release(states: dict) -> None:
    """Free each state's run directory and leave the process group (the first state built owns it)."""
    from engine.parallel import close_distributed

    for state in reversed(list(states.values())):
        close = getattr(state, "close", None)  # engines that lock --out release it here
        if close is not None:
            close()
        else:
            close_distributed(state.dist)


def bench_config(name: str, *, reps: int, warmup: int, smoke: bool, peak_flops: float | None,
                 log: Callable[[str], None] = print) -> dict:
    """NTP and NITP steps of one config, interleaved; figures and ratios."""
    from engine.flops import full_count, paper_formula
    from engine.trainer import next_batches, train_step

    run_dirs = tempfile.TemporaryDirectory(prefix="step_bench_")
    states = {"ntp": _build(name, "ntp", smoke, os.path.join(run_dirs.name, "ntp"))}
    try:
        states["nitp"] = _build(name, "nitp", smoke, os.path.join(run_dirs.name, "nitp"))
        cfg, device = states["nitp"].cfg, states["nitp"].dist.device
        batches = [next_batches(states["ntp"]) for _ in range(warmup + reps)]
        cursor = {"ntp": 0, "nitp": 0}

        def step_fn(objective: str) -> Callable[[], None]:
            def step() -> None:
                train_step(states[objective], batches[cursor[objective] % len(batches)])
                cursor[objective] += 1
            return step

        fns = {objective: step_fn(objective) for objective in ("ntp", "nitp")}
        times = time_interleaved(fns, warmup=warmup, reps=reps, device=device)
        memory = {obj: (cuda_peak_delta(fn, device) if device.type == "cuda" else peak_rss_delta(fn))
                  for obj, fn in fns.items()}
        params = {obj: state.model.num_params() for obj, state in states.items()}
    finally:
        _release(states)
        run_dirs.cleanup()

    tokens = cfg.batch_size * cfg.seq_len
    full, paper = full_count(cfg), paper_formula(cfg)
    result: dict[str, Any] = {
        "config": name, "preset_overrides": {**STEP_CONFIGS[name], **(SMOKE_OVERRIDES if smoke else {})},
        "smoke": smoke, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size,
        "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
        "tokens_per_step": tokens, "n_params": params, "objectives": {},
        "theory": {"full_count_overhead": full.overhead, "paper_formula_overhead": paper.overhead,
                   "full_count_ntp_flops_per_token": full.ntp, "nitp_flops_per_token": full.nitp},
    }
    for objective, values in times.items():
        step_ms = median(values)
        flops = full.ntp + (full.nitp if objective == "nitp" else 0.0)
        tokens_per_s = tokens / (step_ms / 1e3)
        result["objectives"][objective] = {
            "step_ms_median": step_ms, "step_ms_all": [round(v, 3) for v in values], "tokens_per_s": tokens_per_s,
            "mfu": flops * tokens_per_s / peak_flops if peak_flops else None, **memory[objective]}
    ntp, nitp = result["objectives"]["ntp"], result["objectives"]["nitp"]
    memory_key = "peak_extra_bytes" if device.type == "cuda" else "peak_rss_extra_bytes"
    result["ratios"] = {
        "nitp_over_ntp_time": nitp["step_ms_median"] / ntp["step_ms_median"],
        "overhead_measured": nitp["step_ms_median"] / ntp["step_ms_median"] - 1.0,
        "overhead_full_count": full.overhead,
        "overhead_paper_formula": paper.overhead,
        "nitp_over_ntp_peak_memory": (nitp[memory_key] / ntp[memory_key]) if ntp[memory_key] > 0 else None,
        "mfu_ntp": ntp["mfu"],
    }
    log(f"  step {name:6s} d={cfg.d_model} L={cfg.n_layers} V={cfg.vocab_size} T={cfg.seq_len} B={cfg.batch_size}: "
        f"NTP {ntp['tokens_per_s']:9.0f} tok/s, NITP {nitp['tokens_per_s']:9.0f} tok/s, overhead "
        f"{100 * result['ratios']['overhead_measured']:+6.1f}% (full-count theory {100 * full.overhead:.1f}%)")
    return result


def run_step_bench(configs: list[str], *, reps: int = 5, warmup: int = 2, smoke: bool = False,
                   peak_flops: float | None = None, log: Callable[[str], None] = print) -> dict:
    """Each named config of STEP_CONFIGS; smoke shrinks model, sequences and batches to milliseconds a step."""
    unknown = sorted(set(configs) - set(STEP_CONFIGS))
    if unknown:
        raise ValueError(f"configs: unknown {unknown}; choose from {sorted(STEP_CONFIGS)}")
    if reps < 5:
        raise ValueError(f"reps must be >= 5, got {reps}")
    results = [bench_config(name, reps=reps, warmup=warmup, smoke=smoke, peak_flops=peak_flops, log=log)
               for name in configs]
    return {"configs": results, "reps": reps, "warmup": warmup,
            "mfu_peak_flops": peak_flops,
            "mfu_note": "MFU = full-count FLOPs/token x tokens/s / peak; on a CPU the peak is the fp32 rate of a "
                        "2048^3 matmul measured in this process (not a datasheet figure)"}
