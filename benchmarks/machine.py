"""Where the figures came from: machine, versions, commit, date; and the device's measured matmul peak."""
from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD (+dirty when the code folders differ from it); where the tree is a copy without .git (a GPU machine
    that got only the files), the GIT_COMMIT environment variable, marked as given rather than read."""
    given = os.environ.get("GIT_COMMIT")
    fallback = f"{given} (from GIT_COMMIT)" if given else None
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "nitp_kernels", "engine", "benchmarks"],
                               capture_output=True, text=True, cwd=REPO, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return fallback
    if done.returncode != 0:
        return fallback
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def nvidia_driver() -> str | None:
    """The NVIDIA driver version (nvidia-smi, else /proc/driver/nvidia/version), or None."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            words = f.readline().split()
    except OSError:
        return None
    numbers = [w for w in words if w[:1].isdigit() and "." in w]
    return numbers[0] if numbers else None


def _package(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Everything needed to judge a figure: machine, load, software versions, commit and date (UTC)."""
    env = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    for package in ("triton", "liger-kernel", "cut-cross-entropy", "matplotlib"):
        env[package] = _package(package)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                   driver=nvidia_driver())
    return env


def measured_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048,
                        reps: int = 5) -> float:
    """FLOP/s of a large square matmul here, the best of `reps` (the MFU denominator on a CPU, where no
    datasheet peak is at hand; the machine's real fp32 GEMM rate, not a vendor's theoretical one)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    from benchmarks.harness import time_once

    time_once(lambda: a @ b, device)
    best_ms = min(time_once(lambda: a @ b, device) for _ in range(reps))
    return 2.0 * size ** 3 / (best_ms / 1e3)
