"""``make compare LONG=1`` (``python -m engine.compare --long``): NTP, NITP at several λ and cosine
regularisation, every arm over several seeds, so that seed noise can be told from an effect.

Each (arm, seed) is one training run of engine/train.py in its own process with one thread
(OMP_NUM_THREADS=1), ``jobs`` of them at a time: on a small CPU model one thread per run wastes
less than one run spreading over all cores. A run that already finished in --out is read, not
trained again, so an interrupted sweep continues with the same command (an unfinished run resumes
from its newest checkpoint). Runs with the same seed share the initialisation and the data order,
and every run is evaluated on the same validation documents, so each arm is compared with NTP
seed by seed (the paired difference) as well as by its mean ± standard deviation over seeds.

Writes to --out: one run directory per arm and seed (``<arm>/seed<N>``, logs in ``logs/``),
``summary.md`` (the tables: full validation CE, effective rank and average cosine of the last
hidden states and of hidden_states[k], train CE, NITP loss, the NITP loss's phases per seed),
``summary.json``, and one plot per λ (``compare_lambda_<λ>.png``: NTP, NITP at that λ and
cosreg, the mean over seeds with the min-max band).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from engine.compare_report import (COLORS, TAIL, Curve, final_values, fmt, machine, nitp_phases, plot, read_run,
                                   series)
from engine.config import make_config, with_micro_batch_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (key in final_values, column title, digits): the metrics compared across arms
METRICS = [("val_ce_full", "full val CE", 3), ("eff_rank_last", "eff. rank last", 1),
           ("avg_cos_last", "avg cos last", 3), ("eff_rank_target", "eff. rank h[k]", 1),
           ("avg_cos_target", "avg cos h[k]", 3), ("train_ce", "train CE", 3)]


@dataclass(frozen=True)
class Arm:
    """One objective at one weight: ``weight`` is passed as --nitp-weight (None: the preset's λ)."""

    objective: str
    weight: float | None = None

    @property
    def name(self) -> str:
        return f"nitp λ={self.weight:g}" if self.objective == "nitp" else self.objective

    @property
    def folder(self) -> str:
        return f"nitp-{self.weight:g}" if self.objective == "nitp" else self.objective


def make_arms(objectives: tuple[str, ...], lambdas: list[float], cosreg_weight: float | None) -> list[Arm]:
    arms: list[Arm] = []
    for objective in objectives:
        if objective == "nitp":
            arms += [Arm("nitp", lam) for lam in lambdas]
        else:
            arms.append(Arm(objective, cosreg_weight if objective == "cosreg" else None))
    return arms


def _command(settings: dict[str, Any], arm: Arm, seed: int, run_dir: str) -> list[str]:
    """engine/train.py with every setting as its --flag (the CLI validates them as for any run)."""
    flags = {**settings, "objective": arm.objective, "seed": seed, "out": run_dir, "resume": "auto"}
    if arm.weight is not None:
        flags["nitp_weight"] = arm.weight
    argv = [sys.executable, os.path.join(REPO, "engine", "train.py")]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def _finished(run_dir: str, steps: int) -> bool:
    try:
        _, records = read_run(run_dir)
    except (OSError, RuntimeError, ValueError):
        return False
    return records[-1]["step"] >= steps


def _train_one(settings: dict[str, Any], out: str, arm: Arm, seed: int) -> dict[str, Any]:
    run_dir = os.path.join(out, arm.folder, f"seed{seed}")
    reused = _finished(run_dir, settings["steps"])
    start = time.perf_counter()
    if not reused:
        log_path = os.path.join(out, "logs", f"{arm.folder}-seed{seed}.log")
        # One thread per run (see the module docstring); this tree's engine first on the path.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
        print(f"== {arm.name}, seed {seed}: {settings['steps']} steps -> {run_dir}", flush=True)
        with open(log_path, "w") as log:
            code = subprocess.run(_command(settings, arm, seed, run_dir), stdout=log, stderr=subprocess.STDOUT,
                                  env=env).returncode
        if code != 0:
            with open(log_path) as log:
                tail = "".join(log.readlines()[-5:]).strip()
            raise RuntimeError(f"{arm.name}, seed {seed} failed (exit code {code}); log {log_path}:\n{tail}")
        if not _finished(run_dir, settings["steps"]):  # a stop signal: the run saved a checkpoint and left
            raise RuntimeError(f"{arm.name}, seed {seed} stopped before step {settings['steps']} (log {log_path}); "
                               "run the same command again to continue it")
    config, records = read_run(run_dir)
    seconds = time.perf_counter() - start
    if not reused:
        print(f"   {arm.name}, seed {seed}: done in {seconds:.0f} s", flush=True)
    return {"config": config, "records": records, "seconds": None if reused else seconds}


def train_sweep(settings: dict[str, Any], out: str, arms: list[Arm], seeds: list[int],
                jobs: int) -> dict[tuple[str, int], dict[str, Any]]:
    """Every (arm, seed) run, ``jobs`` at a time; returns {(arm name, seed): {config, records, seconds}}."""
    from engine.data import build_data

    fields = {k: v for k, v in settings.items() if k != "preset"}
    cfg = make_config(settings["preset"], **fields)  # a bad setting is refused once, here, not by every run
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    build_data(with_micro_batch_size(cfg, 1))  # prepare the corpus once, before the runs race to build it
    tasks = [(arm, seed) for seed in seeds for arm in arms]  # seed-major: a finished seed is a complete pair
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {(arm.name, seed): pool.submit(_train_one, settings, out, arm, seed) for arm, seed in tasks}
        errors, results = [], {}
        for key, future in futures.items():
            try:
                results[key] = future.result()
            except RuntimeError as err:
                errors.append(str(err))
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(tasks)} runs failed:\n" + "\n".join(errors))
    return results


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize_sweep(results: dict[tuple[str, int], dict[str, Any]], arms: list[Arm], seeds: list[int],
                    wall_seconds: float, jobs: int) -> dict[str, Any]:
    """Per arm: the final values of every seed, their mean ± std, the paired difference to NTP, the phases."""
    table: dict[str, Any] = {}
    for arm in arms:
        per_seed = {seed: final_values(results[arm.name, seed]["records"], arm.objective) for seed in seeds}
        row: dict[str, Any] = {"objective": arm.objective, "weight": arm.weight, "seeds": per_seed,
                               "seconds": {s: results[arm.name, s]["seconds"] for s in seeds}}
        row["mean_std"] = {key: mean_std([v[key] for v in per_seed.values() if v[key] is not None])
                           for key in [m[0] for m in METRICS] + ["nitp_loss", "grad_norm_ratio"]}
        if "ntp" in [a.name for a in arms] and arm.name != "ntp":
            ntp = {s: final_values(results["ntp", s]["records"], "ntp") for s in seeds}
            row["diff_to_ntp"] = {}
            for key, _, _ in METRICS:
                diffs = [per_seed[s][key] - ntp[s][key] for s in seeds
                         if per_seed[s][key] is not None and ntp[s][key] is not None]
                row["diff_to_ntp"][key] = {"per_seed": diffs, "mean_std": mean_std(diffs)}
            rel = [100 * (per_seed[s]["val_ce_full"] / ntp[s]["val_ce_full"] - 1) for s in seeds
                   if per_seed[s]["val_ce_full"] is not None and ntp[s]["val_ce_full"] is not None]
            row["diff_to_ntp"]["val_ce_full_percent"] = {"per_seed": rel, "mean_std": mean_std(rel)}
        if arm.objective == "nitp":
            row["phases"] = {s: nitp_phases(*series(results[arm.name, s]["records"], "nitp_loss")) for s in seeds}
        table[arm.name] = row
    config = results[arms[0].name, seeds[0]]["config"]
    keys = ("preset", "data", "data_corpus_hash", "data_tokenizer_hash", "steps", "batch_size", "seq_len",
            "d_model", "n_layers", "vocab_size", "nitp_layer", "lr", "warmup_steps", "eval_every", "eval_batches",
            "geometry_tokens", "data_n_tokens_val")
    return {"arms": table, "seeds": seeds, "jobs": jobs, "wall_seconds": wall_seconds, "machine": machine(),
            "config": {k: config.get(k) for k in keys}}


def _pm(pair: tuple[float | None, float | None], digits: int, sign: bool = False) -> str:
    mean, std = pair
    if mean is None:
        return "–"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_sweep(summary: dict[str, Any], plots: list[tuple[str, str]]) -> str:
    c, arms, seeds = summary["config"], summary["arms"], summary["seeds"]
    lines = [
        "# NTP vs NITP (λ sweep) vs cosine regularisation over seeds (`make compare LONG=1`)", "",
        f"Preset `{c['preset']}` (d_model {c['d_model']}, {c['n_layers']} layers, vocabulary {c['vocab_size']}), "
        f"data `{c['data']}`, {c['steps']} steps of {c['batch_size']}x{c['seq_len']} tokens "
        f"({c['steps'] * c['batch_size'] * c['seq_len'] / 1e6:.2f}M tokens), seeds {', '.join(map(str, seeds))}; "
        f"NITP target layer k = {c['nitp_layer']}, lr {c['lr']}, warmup {c['warmup_steps']} steps.", "",
        f"Full val CE: the last evaluation over the whole validation split ({c['data_n_tokens_val']} tokens); "
        f"geometry on a fixed sample of {c['geometry_tokens']} held-out tokens at the last step; train CE and "
        f"NITP loss: mean of the last {TAIL} logged steps. Mean ± sample standard deviation over the seeds; "
        "Δ: the arm minus NTP of the same seed (same initialisation and data order), then mean ± std.", "",
        f"Corpus hash `{c['data_corpus_hash']}`, tokenizer hash `{c['data_tokenizer_hash']}`. "
        f"Machine: {summary['machine']}; {summary['jobs']} runs at a time, one thread each; "
        f"wall time {summary['wall_seconds'] / 60:.1f} min.", "",
        "| arm | " + " | ".join(title for _, title, _ in METRICS) + " | NITP loss | CE/NITP grad norm |",
        "|---" * (len(METRICS) + 3) + "|"]
    for name, row in arms.items():
        cells = [_pm(row["mean_std"][key], digits) for key, _, digits in METRICS]
        cells += [_pm(row["mean_std"]["nitp_loss"], 3), _pm(row["mean_std"]["grad_norm_ratio"], 2)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    paired = {n: r["diff_to_ntp"] for n, r in arms.items() if "diff_to_ntp" in r}
    if paired:
        lines += ["", "Paired difference to NTP (per seed, then mean ± std):", "",
                  "| arm | Δ full val CE | Δ full val CE (%) per seed | "
                  + " | ".join(f"Δ {title}" for _, title, _ in METRICS[1:]) + " |",
                  "|---" * (len(METRICS) + 2) + "|"]
        for name, diff in paired.items():
            per_seed = ", ".join(f"{v:+.1f}" for v in diff["val_ce_full_percent"]["per_seed"])
            cells = [_pm(diff["val_ce_full"]["mean_std"], 3, sign=True),
                     f"{_pm(diff['val_ce_full_percent']['mean_std'], 1, sign=True)} ({per_seed})"]
            cells += [_pm(diff[key]["mean_std"], digits, sign=True) for key, _, digits in METRICS[1:]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Every run:", "", "| arm | seed | " + " | ".join(t for _, t, _ in METRICS) + " | time (s) |",
              "|---" * (len(METRICS) + 3) + "|"]
    for name, row in arms.items():
        for seed, values in row["seeds"].items():
            cells = [fmt(values[key], digits) for key, _, digits in METRICS]
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + f" | {fmt(row['seconds'][seed], 0)} |")
    lines += _phase_lines(arms)
    for name, png in plots:
        lines += ["", f"![{name}]({png})"]
    return "\n".join(lines) + "\n"


def _phase_lines(arms: dict[str, Any]) -> list[str]:
    """The NITP loss of every NITP run against the paper's three phases (quick drop, hump, slow decline)."""
    lines = []
    for name, row in arms.items():
        phases = {s: p for s, p in row.get("phases", {}).items() if p.get("hump") is not None}
        if not phases:
            continue
        humps = sum(bool(p["hump"]) for p in phases.values())
        lines += ["", f"NITP loss of {name}, smoothed over 5 logged steps: a hump (> 3% rise after the early "
                      f"minimum, then a decline) in {humps} of {len(phases)} seeds.", "",
                  "| seed | first step | early minimum (step) | later maximum (step) | final | hump |",
                  "|---|---|---|---|---|---|"]
        for seed, p in phases.items():
            lines.append(f"| {seed} | {fmt(p['initial'])} | {fmt(p['drop_min'])} ({p['drop_step']}) | "
                         f"{fmt(p['hump_max'])} ({p['hump_step']}) | {fmt(p['final'])} | "
                         f"{'yes' if p['hump'] else 'no'} |")
    return lines


def plot_per_lambda(results: dict[tuple[str, int], dict[str, Any]], arms: list[Arm], seeds: list[int],
                    out: str, title: str, warmup: int | None) -> list[tuple[str, str]]:
    """One PNG per λ: NTP, NITP at that λ and cosreg (those of them in the sweep); [(λ's arm, file)]."""
    def curve(arm: Arm) -> Curve:
        return Curve(arm.name, arm.objective, COLORS.get(arm.objective),
                     [results[arm.name, s]["records"] for s in seeds])

    others = [a for a in arms if a.objective != "nitp"]
    groups = [(a.name, f"compare_lambda_{a.weight:g}.png", [a, *others]) for a in arms if a.objective == "nitp"]
    if not groups:
        groups = [("all", "compare.png", others)]
    for name, png, group in groups:
        plot([curve(a) for a in group], os.path.join(out, png),
             f"{title}: {' vs '.join(a.name for a in group)} ({len(seeds)} seeds: mean, min-max band)", warmup)
    return [(name, png) for name, png, _ in groups]


def run_sweep(settings: dict[str, Any], out: str, objectives: tuple[str, ...], lambdas: list[float],
              seeds: list[int], jobs: int, cosreg_weight: float | None) -> dict[str, Any]:
    """Train, summarise and plot the sweep into ``out``; the summary lists its files under "files"."""
    import json

    arms = make_arms(objectives, lambdas, cosreg_weight)
    start = time.perf_counter()
    results = train_sweep(settings, out, arms, seeds, jobs)
    summary = summarize_sweep(results, arms, seeds, time.perf_counter() - start, jobs)
    c = summary["config"]
    plots = plot_per_lambda(results, arms, seeds, out, f"preset {c['preset']}, data {c['data']}",
                            c["warmup_steps"])
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown_sweep(summary, plots))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    summary["files"] = ["summary.md", "summary.json", *[png for _, png in plots]]
    return summary
