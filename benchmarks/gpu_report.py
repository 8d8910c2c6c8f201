"""The GPU check's bookkeeping, without torch: settings, the job list, records and gpu_check.json.

gpu_check.py (the methods), gpu_phases.py (sweep and phases) and gpu_summary.py (goal and verdict) share it;
the summary imports nothing heavier, so it runs in a second even on a loaded machine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GOAL_METHODS = ("ours_nitp", "liger_flce", "liger_flce_fp32", "ours_ntp")
# the ones that compile on first use (CCE's helpers and torch.compile: tens of seconds each) last
OTHER_METHODS = ("unfused_nitp", "naive_ntp", "cce", "cce_kahan_full_c", "torch_compile_ce")
LOSS_TYPE_METHODS = ("ours_nitp_mse", "ours_nitp_smooth_l1", "ours_nitp_kl")
GPU_CHECK_METHODS = GOAL_METHODS + OTHER_METHODS + LOSS_TYPE_METHODS
RECORD_KEYS = ("method", "d", "V", "N", "dtype", "ms", "peak_mib", "grad_rel_err", "status")
FATAL_CUDA_TEXT = ("AcceleratorError", "illegal memory access", "device-side assert", "unspecified launch failure",
                   "misaligned address", "CUDA error", "CUBLAS_STATUS_EXECUTION_FAILED")


@dataclass(frozen=True)
class Settings:
    """Shapes and repetitions of one run (GPU, or the CPU dry run at tiny shapes)."""

    ds: tuple[int, ...]
    ns: tuple[int, ...]
    vocab: int
    seq_len: int
    dtype: str
    warmup: int
    reps: int
    error_shape: tuple[int, int]        # (d, N) where gradient errors and the other loss types are measured
    sweep_shape: tuple[int, int]        # (d, N) of the chunk-size sweep and the phase breakdown
    sweep_chunks: tuple[int, ...]
    phase_warmup: int
    phase_reps: int

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(d, n) for d in self.ds for n in self.ns]


GPU = Settings(ds=(1280, 2560), ns=(8192, 16384), vocab=152064, seq_len=4096, dtype="bf16", warmup=1, reps=5,
               error_shape=(1280, 8192), sweep_shape=(1280, 16384), sweep_chunks=(256, 512, 1024, 2048, 4096),
               phase_warmup=2, phase_reps=10)
# every call of our ops and Liger's runs through Triton's interpreter here: seconds each on a busy 2-core box
DRY_RUN = Settings(ds=(16, 32), ns=(8, 16), vocab=512, seq_len=4, dtype="bf16", warmup=0, reps=1,
                   error_shape=(16, 8), sweep_shape=(16, 16), sweep_chunks=(8,), phase_warmup=0, phase_reps=1)


def settings_for(dry_run: bool) -> Settings:
    return DRY_RUN if dry_run else GPU


def job_list(settings: Settings) -> list[tuple[str, int, int]]:
    """(method, d, N) in priority order: the goal's methods at every shape, the others, the other loss types."""
    jobs = [(m, d, n) for d, n in settings.shapes for m in GOAL_METHODS]
    jobs += [(m, d, n) for d, n in settings.shapes for m in OTHER_METHODS]
    jobs += [(m, *settings.error_shape) for m in LOSS_TYPE_METHODS]
    return jobs


def first_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text[:300]}"


def poisons_cuda(status: str) -> bool:
    """A recorded error after which this process's CUDA context is unusable (every later launch fails)."""
    return status.startswith("error") and any(text in status for text in FATAL_CUDA_TEXT)


class Report:
    """gpu_check.json: {"environment", "records", ...}; every save rewrites the whole file atomically."""

    def __init__(self, path: Path, data: dict) -> None:
        self.path, self.data = path, data

    @classmethod
    def load(cls, path: Path) -> "Report":
        return cls(path, json.loads(path.read_text()))

    @classmethod
    def fresh(cls, path: Path, env: dict) -> "Report":
        return cls(path, {"environment": env, "records": []})

    def put(self, record: dict) -> None:
        """Add `record`, replacing the one of the same (method, d, N)."""
        key = (record["method"], record["d"], record["N"])
        records = self.data["records"]
        for i, old in enumerate(records):
            if (old["method"], old["d"], old["N"]) == key:
                records[i] = record
                break
        else:
            records.append(record)
        self.save()

    def find(self, method: str, d: int, n: int) -> dict | None:
        return next((r for r in self.data["records"] if (r["method"], r["d"], r["N"]) == (method, d, n)), None)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def record(method: str, d: int, n: int, settings: Settings, status: str, ms: float | None = None,
           peak_mib: float | None = None, grad_rel_err: dict | None = None) -> dict:
    return {"method": method, "d": d, "V": settings.vocab, "N": n, "dtype": settings.dtype,
            "ms": None if ms is None else round(ms, 4), "peak_mib": None if peak_mib is None else round(peak_mib, 1),
            "grad_rel_err": grad_rel_err, "status": status}


def line_figures(rec: dict) -> str:
    if rec["status"] != "ok":
        return rec["status"][:160]
    peak = "-" if rec["peak_mib"] is None else f"{rec['peak_mib']:.0f} MiB"
    err = rec["grad_rel_err"]
    errs = "" if not err else "  grad err h {} W {}".format(*(
        "-" if err[k] is None else f"{err[k]:.2e}" for k in ("hidden", "lm_weight")))
    return f"{rec['ms']:10.3f} ms  peak {peak}{errs}"
