"""The GPU check's main part (run by benchmarks/gpu_check.sh): our ops against the competitors, one JSON.

    python -m benchmarks.gpu_check --out FILE [--dry-run] [--budget-s S] [--resume]

Every method of GPU_CHECK_METHODS at every shape (d in {1280, 2560}, V=152064, N in {8192, 16384}, bf16), forward
+ backward: median time over `reps` runs after `warmup` (CUDA events), peak memory (CUDA max_memory_allocated
during one forward + backward above what was allocated before it: the inputs are not counted, the gradients
produced are), and at error_shape the relative error of d hidden and d lm_weight against an fp32 reference
(grad_reference.py). Jobs run in priority order: the goal's methods at every shape first.
Every job's record is written before it starts (status "error: did not finish ...") and rewritten when it ends,
so a run cut by a time limit or a crash keeps what it measured and shows what it was doing. After an error that
poisons the CUDA context (illegal address, device-side assert) the process exits with status 3 and gpu_check.sh
starts it again with --resume, which skips the jobs already recorded.
gpu_report.py holds the settings and the JSON; gpu_phases.py adds the chunk-size sweep and the phase breakdown;
gpu_summary.py the goal and the verdict.

--dry-run: the same code at tiny shapes (CPU: Triton's interpreter, TRITON_INTERPRET=1), for `make test`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from benchmarks.grad_reference import ReferenceGradients
from benchmarks.gpu_report import (Report, Settings, first_line, job_list, line_figures, poisons_cuda, record,
                                   settings_for)
from benchmarks.harness import cuda_peak_delta, median, time_interleaved
from benchmarks.machine import environment
from benchmarks.methods import MethodSkipped, OpInputs, build_method, make_inputs

MiB = 2 ** 20
EXIT_CUDA_POISONED = 3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_device(dry_run: bool) -> torch.device:
    """CUDA when present; a CPU only for a dry run, and then only under Triton's interpreter."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not dry_run:
        raise SystemExit("gpu_check: no CUDA device here; run `bash benchmarks/gpu_check.sh --dry-run` on a CPU")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("gpu_check --dry-run on a CPU needs TRITON_INTERPRET=1 (gpu_check.sh sets it): our ops "
                         "and Liger's kernels run through Triton's interpreter")
    return torch.device("cpu")


def method_options(device: torch.device) -> dict:
    """build_method's keywords here: our triton backend (compiled on CUDA, the interpreter on a CPU); one
    torch.compile for every shape (dynamic), without code generation on a CPU (inductor's C++ build takes
    ~50 s on 2 cores); no CCE on a CPU."""
    on_cuda = device.type == "cuda"
    return {"backend": "triton", "triton_interpreter": not on_cuda, "compile_dynamic": True,
            "compile_backend": "inductor" if on_cuda else "aot_eager", "cce_cpu_impl": None}


def nitp_loss_type(method: str) -> str | None:
    """The NITP loss a method includes (for its reference gradient), None for CE-only methods."""
    if method in ("ours_nitp", "unfused_nitp"):
        return "cosine"
    if method.startswith("ours_nitp_"):
        return method[len("ours_nitp_"):]
    return None


def check_environment(device: torch.device, settings: Settings, dry_run: bool) -> dict:
    """The machine and software (gpu, driver, torch, triton, python, commit, ...) and this run's settings."""
    env = environment(device)
    env["commit"] = env.pop("git_commit")
    if device.type != "cuda":
        env.update(gpu=f"none (dry run on {env['cpu_model']})", driver=None)
    env["dry_run"] = dry_run
    env["settings"] = asdict(settings)
    env["method_options"] = method_options(device)
    env["peak_mib"] = ("CUDA max_memory_allocated during one forward + backward, above what was allocated before "
                       "it (inputs not counted, gradients produced counted); null on a CPU")
    env["grad_rel_err"] = (f"at d, N = {settings.error_shape}: max|g - ref| / max|ref| of d hidden and d lm_weight "
                           "against an fp32 PyTorch reference on the same bf16 values (benchmarks/grad_reference.py)")
    return env


def measure(method: str, x: OpInputs, d: int, n: int, settings: Settings, device: torch.device,
            reference: ReferenceGradients | None) -> dict:
    """One method at one shape: its record (never raises for the method's own failures)."""
    x.clear_grads()
    try:
        loss_fn = build_method(method, x, **method_options(device))
    except MethodSkipped as err:
        return record(method, d, n, settings, f"unavailable: {err}")
    except Exception as err:  # a competitor whose API differs from what build_method expects
        return record(method, d, n, settings, f"error: {first_line(err)}")

    def step() -> None:
        loss_fn().backward()

    try:
        times = time_interleaved({method: step}, warmup=settings.warmup, reps=settings.reps, device=device,
                                 before_each=x.clear_grads)[method]
        peak_mib = None
        if device.type == "cuda":
            x.clear_grads()
            peak_mib = cuda_peak_delta(step, device)["peak_extra_bytes"] / MiB
        # compared: the gradients the last run left in x's leaves
        errors = None if reference is None else reference.errors(nitp_loss_type(method))
        return record(method, d, n, settings, "ok", median(times), peak_mib, errors)
    except torch.cuda.OutOfMemoryError:
        return record(method, d, n, settings, "oom")
    except Exception as err:  # recorded; the caller decides whether the process can go on
        return record(method, d, n, settings, f"error: {first_line(err)}")
    finally:
        x.clear_grads()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_methods(settings: Settings, report: Report, device: torch.device, budget_s: float, resume: bool,
                log: Callable[[str], None] = print) -> int:
    """Every job not yet recorded; 0, or EXIT_CUDA_POISONED after an error that leaves CUDA unusable."""
    began = time.monotonic()
    done = {(r["method"], r["d"], r["N"]) for r in report.data["records"]} if resume else set()
    shape, x, reference = None, None, None
    for method, d, n in job_list(settings):
        if (method, d, n) in done:
            continue
        if time.monotonic() - began > budget_s:
            report.put(record(method, d, n, settings,
                              f"unavailable: not measured: this part's time budget of {budget_s:.0f} s was spent"))
            continue
        report.put(record(method, d, n, settings, "error: did not finish (cut by the time limit, or the process "
                                                  "died; see gpu_check.log)"))
        if shape != (d, n):
            x = reference = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            x = make_inputs(n, d, settings.vocab, seq_len=settings.seq_len, device=str(device),
                            dtype=DTYPES[settings.dtype])
            shape = (d, n)
            if shape == settings.error_shape:
                reference = ReferenceGradients(x)
        started = time.monotonic()
        rec = measure(method, x, d, n, settings, device, reference)
        report.put(rec)
        log(f"{method:20s} d={d:5d} N={n:6d}  {line_figures(rec)}  ({time.monotonic() - started:.1f} s)")
        if device.type == "cuda" and poisons_cuda(rec["status"]):
            log("gpu_check: the CUDA context is unusable after this error; exiting so that a fresh process resumes")
            return EXIT_CUDA_POISONED
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GPU check: our ops against the competitors")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file (gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes; on a CPU through Triton's interpreter")
    parser.add_argument("--budget-s", type=float, default=140.0, help="start no job after this many seconds")
    parser.add_argument("--resume", action="store_true", help="keep the records in --out, skip their jobs")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_for(args.dry_run)
    device = check_device(args.dry_run)
    if args.resume and args.out.exists():
        report = Report.load(args.out)
    else:
        report = Report.fresh(args.out, check_environment(device, settings, args.dry_run))
        report.save()
    env = report.data["environment"]
    print(f"gpu_check methods on {env['gpu']} (driver {env.get('driver')}), torch {env['torch']}, triton "
          f"{env.get('triton')}, python {env['python']}, commit {env['commit']}", flush=True)
    return run_methods(settings, report, device, args.budget_s, args.resume, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    sys.exit(main())
