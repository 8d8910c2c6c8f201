"""What ``make compare`` (engine/compare.py) and its long multi-seed sweep (engine/compare_sweep.py)
share: reading a run directory, the final value of a logged metric, the NITP loss's three phases,
and the six-panel plot (one curve per arm; with several seeds the mean and a min-max band)."""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass
from typing import Any

COLORS = {"ntp": "#1f5fa8", "nitp": "#c0392b", "cosreg": "#2e8b57"}  # the paper's blue/red, + green
TAIL = 5  # final train CE / NITP loss: mean of the last TAIL logged values (one step is noisy)
PANELS = [("ce_loss", "train CE (nats)"), ("val_ce", "validation CE (nats)"),
          ("nitp_loss", "NITP loss (1 - cos)"), ("eff_rank_last", "effective rank, last hidden"),
          ("avg_cos_last", "avg cosine, last hidden"), ("eff_rank_target", "effective rank, hidden_states[k]")]


def read_run(run_dir: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config.json, metrics.jsonl records) of one run directory."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise RuntimeError(f"{run_dir}/metrics.jsonl holds no records")
    return config, records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry a finite value for key."""
    pts = [(r["step"], float(r[key])) for r in records
           if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def last(records: list[dict[str, Any]], key: str, tail: int = 1) -> float | None:
    _, values = series(records, key)
    return sum(values[-tail:]) / len(values[-tail:]) if values else None


def final_values(records: list[dict[str, Any]], objective: str) -> dict[str, Any]:
    """A run's final metrics: validation CE (the whole split when the run logged val_ce_full, else the
    last subset evaluation), geometry, and train CE / NITP loss as the mean of the last TAIL logs."""
    return {"train_ce": last(records, "ce_loss", TAIL), "val_ce": last(records, "val_ce"),
            "val_ce_full": last(records, "val_ce_full"),
            "eff_rank_last": last(records, "eff_rank_last"), "avg_cos_last": last(records, "avg_cos_last"),
            "eff_rank_target": last(records, "eff_rank_target"), "avg_cos_target": last(records, "avg_cos_target"),
            "nitp_loss": last(records, "nitp_loss", TAIL) if objective == "nitp" else None,
            "grad_norm_ratio": last(records, "grad_norm_ratio"),
            "eff_rank_last_peak": max(series(records, "eff_rank_last")[1], default=None),
            "steps": records[-1]["step"]}


def machine() -> str:
    """The machine in words, for the summaries."""
    return (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
            f"{platform.system()} {platform.release()}").replace("  ", " ")


def smooth(values: list[float], window: int = 5) -> list[float]:
    """Centred moving average (shorter at the ends), so single noisy steps make no phase."""
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def nitp_phases(steps: list[int], values: list[float]) -> dict[str, Any]:
    """The NITP loss against the paper's three phases (App. F): a quick drop, a hump, a slow decline.

    On the smoothed curve (5 logged points): drop = its minimum over the first half of the run;
    hump = its maximum after that minimum; the hump counts when it rises more than 3% above the
    minimum and the loss then falls again.
    """
    if len(values) < 3:
        return {"hump": None}
    sm = smooth(values)
    half = max(1, len(sm) // 2)
    i_min = min(range(half), key=sm.__getitem__)
    i_max = max(range(i_min, len(sm)), key=sm.__getitem__)
    hump = sm[i_max] > 1.03 * sm[i_min] and sm[-1] < sm[i_max]
    return {"initial": values[0], "drop_min": sm[i_min], "drop_step": steps[i_min],
            "hump_max": sm[i_max], "hump_step": steps[i_max], "final": sm[-1], "hump": hump}


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


@dataclass
class Curve:
    """One arm on the plot: its label, objective (only NITP runs log the NITP loss), colour, and the
    metrics.jsonl records of each of its seeds."""

    label: str
    objective: str
    color: str | None
    runs: list[list[dict[str, Any]]]


def _mean_and_band(runs: list[list[dict[str, Any]]], key: str) -> tuple[list[int], list[float], list[float],
                                                                        list[float]]:
    """Steps logged by every seed, and the mean, minimum and maximum over the seeds at each."""
    per_seed = [dict(zip(*series(records, key))) for records in runs]
    steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    values = [[s[step] for s in per_seed] for step in steps]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot(curves: list[Curve], path: str, title: str, warmup: int | None = None) -> None:
    """Six panels, every arm on shared axes (the mean over its seeds, the min-max band shaded when it has
    more than one), written headless (Agg) as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), dpi=80)
    for ax, (key, label) in zip(axes.flat, PANELS):
        for curve in curves:
            if key == "nitp_loss" and curve.objective != "nitp":
                continue  # only NITP runs train (and log) that loss
            steps, mean, low, high = _mean_and_band(curve.runs, key)
            if not steps:
                continue
            ax.plot(steps, mean, color=curve.color, label=curve.label,
                    marker="o" if key == "val_ce" else None, markersize=3, linewidth=1.4)
            if len(curve.runs) > 1:
                ax.fill_between(steps, low, high, color=curve.color, alpha=0.15, linewidth=0)
        if warmup:
            ax.axvline(warmup, color="0.6", linestyle=":", linewidth=1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
