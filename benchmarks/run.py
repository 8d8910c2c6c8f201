"""`make bench`: what NITP costs over NTP, op level and step level, and the paper presets' theoretical overhead.

    python -m benchmarks.run                 # the full grid (CPU: N 2048/8192, d 512/1024, V 32000/152064)
    python -m benchmarks.run --quick         # one op shape and the two step configs: a few minutes on 2 cores
    python -m benchmarks.run --only paper    # just the theoretical table
    python -m benchmarks.run --n 2048 --d 512 1024 --vocab 32000   # a grid of your own

Cost on a 2-core CPU (AMD EPYC, shared with other jobs): --quick under 3 min; the full CPU grid is ~1.7e13 FLOPs
per method and repetition (hours: pick a sub-grid with --n/--d/--vocab). A cold torch.compile cache adds ~30 s
per compiled method (CCE's CPU path, the compiled chunked CE) the first time.

Every timed figure is the median of >= 5 interleaved repetitions after warm-up, all methods side by side in
this one process on the same inputs. Writes OUT/bench-<UTC stamp>.json and .png plus OUT/latest.json/.png.
--smoke (for the test suite) shrinks everything to seconds; its figures mean nothing, its plumbing is checked.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import sys
import time
from pathlib import Path

import torch

from benchmarks.machine import environment, measured_peak_flops
from benchmarks.methods import METHODS
from benchmarks.op_bench import grid_for, run_op_bench
from benchmarks.paper_table import paper_table
from benchmarks.report import op_table, paper_table_text, step_table, write_outputs
from benchmarks.step_bench import STEP_CONFIGS, run_step_bench

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
PARTS = ("op", "step", "paper")


def _oversubscribed() -> bool:
    """Other processes already keep every core busy (1-minute load average >= cores; CPU runs only)."""
    if torch.cuda.is_available() or not hasattr(os, "getloadavg"):
        return False
    return os.getloadavg()[0] >= (os.cpu_count() or 1)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _spent(mark: tuple[float, float, float]) -> dict:
    """Wall and CPU seconds (this process + finished subprocesses) since mark."""
    return {"wall_s": time.perf_counter() - mark[0],
            "cpu_s": time.process_time() - mark[1] + _children_cpu() - mark[2]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="NITP overhead benchmark (make bench)")
    parser.add_argument("--quick", action="store_true", help="a subset that runs in a few minutes on 2 CPU cores")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # test suite: seconds, no meaning
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--only", choices=PARTS, nargs="+", default=list(PARTS), help="which parts to run")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--n", type=int, nargs="+", help="op grid: token counts N (overrides the preset grid)")
    parser.add_argument("--d", type=int, nargs="+", help="op grid: widths d")
    parser.add_argument("--vocab", type=int, nargs="+", help="op grid: vocabulary sizes V")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="op methods (default: all a-g)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per figure (>= 5; median reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice, or 1 when the load average already "
                             "fills every core: OpenMP threads competing with other processes slow small ops "
                             "down by an order of magnitude)")
    parser.add_argument("--step-configs", nargs="+", choices=sorted(STEP_CONFIGS), default=None,
                        help="step-level configs (default: tiny small)")
    args = parser.parse_args(argv)
    if args.quick and args.smoke:
        parser.error("--quick and --smoke exclude each other")
    if args.reps < 5:
        parser.error(f"--reps must be >= 5 (the median of at least 5 repetitions), got {args.reps}")
    for name in ("n", "d", "vocab"):
        if any(v < 1 for v in getattr(args, name) or []):
            parser.error(f"--{name} values must be positive")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available here")
    return args


def _op_part(args: argparse.Namespace, device: torch.device, mode: str, log) -> dict:
    grid = grid_for(device, mode)
    grid.reps = args.reps
    for name, attr in (("n", "ns"), ("d", "ds"), ("vocab", "vocabs")):
        if getattr(args, name):
            setattr(grid, attr, getattr(args, name))
    if args.methods:
        grid.methods = list(args.methods)
    return run_op_bench(grid, device, log=log)


def _step_part(args: argparse.Namespace, device: torch.device, mode: str, log) -> dict:
    if device.type == "cuda":
        from engine.metrics import peak_flops_per_device

        peak = peak_flops_per_device(None, device)
    else:
        peak = measured_peak_flops(device, size=512 if args.smoke else 2048)
    configs = args.step_configs or (["tiny"] if args.smoke else ["tiny", "small"])
    return run_step_bench(configs, reps=args.reps, warmup=1 if args.smoke else 2, smoke=args.smoke,
                          peak_flops=peak, log=log)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is None and _oversubscribed():
        args.threads = 1
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: running with 1 torch thread "
              "(--threads N to choose)", flush=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # the fresh processes of the RSS probe follow (rss_probe)
    began_wall, began_cpu = time.perf_counter(), time.process_time()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    result: dict = {"mode": mode, "environment": environment(device), "op": None, "step": None, "paper_table": None}
    print(f"make bench ({mode}) on {result['environment'].get('gpu') or result['environment']['cpu_model']}, "
          f"{result['environment']['cpu_cores']} cores, torch {torch.__version__}, "
          f"load {result['environment']['load_average_1m_at_start']}", flush=True)
    log = lambda line: print(line, flush=True)  # noqa: E731 (progress lines as figures come in)

    if "paper" in args.only:
        result["paper_table"] = paper_table()
    parts: dict[str, dict] = {}
    for part in ("op", "step"):
        if part not in args.only:
            continue
        mark = (time.perf_counter(), time.process_time(), _children_cpu())
        try:
            result[part] = (_op_part if part == "op" else _step_part)(args, device, mode, log)
        except Exception as err:  # one broken part must not lose the others' figures
            result[part] = None
            result.setdefault("errors", {})[part] = f"{type(err).__name__}: {err}"
            log(f"{part} level failed: {type(err).__name__}: {err}")
        parts[part] = _spent(mark)

    result["cost"] = {"wall_s": time.perf_counter() - began_wall, "cpu_s_this_process": time.process_time() - began_cpu,
                      "cpu_s_children": _children_cpu(), "parts": parts,
                      "load_average_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    print()
    for part, text in (("op", op_table), ("step", step_table), ("paper_table", paper_table_text)):
        if result[part]:
            print(text(result[part]), end="\n\n")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    paths = write_outputs(result, args.out, stamp)
    cost = result["cost"]
    print(f"wall {cost['wall_s']:.0f} s, CPU {cost['cpu_s_this_process'] + cost['cpu_s_children']:.0f} s "
          f"(this process + subprocesses); wrote {paths['json']} and {paths['png']} (also latest.json/.png)")
    return 1 if result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
