"""Run outputs: DIR/config.json at start, one JSON object per log step in DIR/metrics.jsonl,
a progress bar on a terminal (tqdm; none when stderr is not a TTY, then one line per log step),
peak memory and MFU."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import warnings
from typing import Any

import torch

# Dense bf16 peak per device, TFLOP/s (vendor datasheets), for MFU when --peak-tflops is not given.
_PEAK_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "H800": 989.5, "A100": 312.0, "A800": 312.0,
                     "L40S": 362.0, "B200": 2250.0}


def peak_flops_per_device(peak_tflops: float | None, device: torch.device) -> float | None:
    """FLOP/s one device can do at best: the config's value, a known GPU's, else None (MFU null)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max_memory_allocated; CPU: the process's peak resident set size (Linux: KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class RunLogger:
    """Writes the run directory on rank 0 only; other ranks get a silent logger."""

    def __init__(self, out_dir: str, total_steps: int, enabled: bool = True, start_step: int = 0):
        self.out_dir, self.enabled = out_dir, enabled
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.config_path = os.path.join(out_dir, "config.json")
        self.bar = None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            if start_step == 0:
                open(self.metrics_path, "w").close()  # a fresh run starts a fresh file
            if sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)

    def write_config(self, config: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.config_path, "w") as f:
                json.dump(config, f, indent=2, sort_keys=True, default=str)
                f.write("\n")

    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics record and show it (bar postfix on a TTY, else one line)."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        summary = f"loss {record['loss']:.4f} ce {record['ce_loss']:.4f} nitp {record['nitp_loss']:.4f}"
        if self.bar is not None:
            self.bar.set_postfix_str(summary + f" tok/s {record['tokens_per_s']:.0f}", refresh=False)
        else:
            val = f" val_ce {record['val_ce']:.4f}" if "val_ce" in record else ""
            if "eff_rank_last" in record:  # geometry steps (engine/geometry.py)
                val += f" | erank {record['eff_rank_last']:.1f} cos {record['avg_cos_last']:.3f}"
            print(f"step {record['step']:>6} | {summary}{val} | lr {record['lr']:.2e} | "
                  f"tok/s {record['tokens_per_s']:.0f}", flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def truncate_metrics(metrics_path: str | os.PathLike, step: int) -> None:
    """Keep the metrics.jsonl records up to ``step`` (a killed run may have logged past its checkpoint).

    A line that is not JSON (a torn last line after a kill or a full disk) is dropped with a
    warning instead of stopping the resume.
    """
    if not os.path.isfile(metrics_path):
        return
    with open(metrics_path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    keep, torn = [], []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn.append(number)
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    if torn:
        warnings.warn(f"{metrics_path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn))} of "
                      f"{len(lines)}; a torn write from a killed run or a full disk)", stacklevel=2)
    tmp = f"{metrics_path}.tmp"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in keep))
    os.replace(tmp, metrics_path)
