"""``make compare``: NTP vs NITP vs cosine regularisation on the same tiny model, seed and data.

    python -m engine.compare            # tiny preset on the stdlib corpus (~15 min on 2 CPU cores)
    python -m engine.compare --quick    # a toy model on synthetic data, well under a minute

Trains one run per objective (same preset, seed, data order; only the objective differs) through
engine.trainer.run, with validation CE and the geometry probe (engine/geometry.py) on, then
writes to --out (default runs/compare/<UTC time>/, a fresh folder each time): one run directory per objective, ``compare.png`` (every
run on shared axes: train CE, validation CE, NITP loss, effective rank and average cosine of the
last hidden states, effective rank of the NITP target hidden_states[k]), ``summary.md`` (final
values, the NITP loss's shape against the paper's three phases, corpus hash, machine) and
``summary.json``. The full version also copies compare.png and summary.md to docs/compare/.
"""

from __future__ import annotations

import os

# Before torch loads libgomp (see engine/train.py): spinning OpenMP threads collapse on shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from engine.config import make_config  # noqa: E402

OBJECTIVES = ("ntp", "nitp", "cosreg")
COLORS = {"ntp": "#1f5fa8", "nitp": "#c0392b", "cosreg": "#2e8b57"}  # the paper's blue/red, + green
FULL = dict(preset="tiny", data="stdlib", steps=240, log_every=5, eval_every=40, eval_batches=8,
            geometry_every=10, geometry_tokens=1024)
QUICK = dict(preset="tiny", data="synthetic", vocab_size=64, d_model=32, n_layers=2, n_heads=2,
             n_kv_heads=1, ffn_hidden=64, seq_len=32, batch_size=4, micro_batch_size=4, steps=30,
             warmup_steps=5, log_every=2, eval_every=10, geometry_every=5, geometry_tokens=128,
             backend="torch", device="cpu")
TAIL = 5  # final train CE / NITP loss: mean of the last TAIL logged values (one step is noisy)


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


def train_all(settings: dict[str, Any], out: str, objectives: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """One training run per objective; returns {objective: {config, records, seconds}}."""
    from engine.trainer import run  # torch loads here, after OMP_WAIT_POLICY is set

    settings = dict(settings)
    preset = settings.pop("preset")
    results = {}
    for objective in objectives:
        run_dir = os.path.join(out, objective)
        cfg = make_config(preset, **settings, objective=objective, out=run_dir)
        print(f"== {objective}: {cfg.steps} steps of the {preset} preset on {cfg.data} -> {run_dir}",
              flush=True)
        start = time.perf_counter()
        run(cfg)
        config, records = read_run(run_dir)
        results[objective] = {"config": config, "records": records, "seconds": time.perf_counter() - start}
    return results


def plot(results: dict[str, dict[str, Any]], path: str, title: str) -> None:
    """Six panels, every run on shared axes, written headless (Agg) as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ce_loss", "train CE (nats)"), ("val_ce", "validation CE (nats)"),
              ("nitp_loss", "NITP loss (1 - cos)"), ("eff_rank_last", "effective rank, last hidden"),
              ("avg_cos_last", "avg cosine, last hidden"),
              ("eff_rank_target", "effective rank, hidden_states[k]")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), dpi=80)
    for ax, (key, label) in zip(axes.flat, panels):
        for objective, res in results.items():
            if key == "nitp_loss" and objective != "nitp":
                continue  # only the NITP run trains (and logs) that loss
            steps, values = series(res["records"], key)
            if steps:
                ax.plot(steps, values, color=COLORS.get(objective), label=objective,
                        marker="o" if key == "val_ce" else None, markersize=3, linewidth=1.4)
        warmup = next(iter(results.values()))["config"].get("warmup_steps")
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


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Final values per objective plus the NITP loss's phases (what summary.json holds)."""
    rows = {}
    for objective, res in results.items():
        rec = res["records"]
        rows[objective] = {
            "train_ce": last(rec, "ce_loss", TAIL), "val_ce": last(rec, "val_ce"),
            "eff_rank_last": last(rec, "eff_rank_last"), "avg_cos_last": last(rec, "avg_cos_last"),
            "eff_rank_target": last(rec, "eff_rank_target"), "avg_cos_target": last(rec, "avg_cos_target"),
            "nitp_loss": last(rec, "nitp_loss", TAIL) if objective == "nitp" else None,
            "grad_norm_ratio": last(rec, "grad_norm_ratio"),
            "eff_rank_last_peak": max(series(rec, "eff_rank_last")[1], default=None),
            "steps": rec[-1]["step"], "seconds": res["seconds"]}
    phases = nitp_phases(*series(results["nitp"]["records"], "nitp_loss")) if "nitp" in results else None
    config = next(iter(results.values()))["config"]
    keys = ("preset", "data", "data_corpus_hash", "data_tokenizer_hash", "seed", "steps", "batch_size",
            "seq_len", "d_model", "n_layers", "vocab_size", "nitp_layer", "nitp_weight", "lr", "warmup_steps",
            "geometry_tokens")
    return {"runs": rows, "nitp_phases": phases, "config": {k: config.get(k) for k in keys},
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
                       f"{platform.system()} {platform.release()}".replace("  ", " ")}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(summary: dict[str, Any], png_name: str) -> str:
    c, phases = summary["config"], summary["nitp_phases"]
    lines = [
        "# NTP vs NITP vs cosine regularisation (`make compare`)", "",
        f"Preset `{c['preset']}` (d_model {c['d_model']}, {c['n_layers']} layers, vocabulary {c['vocab_size']}), "
        f"data `{c['data']}`, {c['steps']} steps of {c['batch_size']}x{c['seq_len']} tokens, seed {c['seed']}; "
        f"NITP target layer k = {c['nitp_layer']}, λ = {c['nitp_weight']} (also the cosreg weight), "
        f"lr {c['lr']}, warmup {c['warmup_steps']} steps (dotted line).", "",
        f"Corpus hash `{c['data_corpus_hash']}`, tokenizer hash `{c['data_tokenizer_hash']}`. "
        f"Machine: {summary['machine']}.", "",
        f"![comparison]({png_name})", "",
        f"Final values (train CE and NITP loss: mean of the last {TAIL} logged steps; geometry on a fixed sample "
        f"of {c['geometry_tokens']} held-out tokens):", "",
        "| objective | train CE | val CE | eff. rank last (peak) | avg cos last | eff. rank h[k] | avg cos h[k] "
        "| NITP loss | CE/NITP grad norm | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for objective, r in summary["runs"].items():
        lines.append(
            f"| {objective} | {_fmt(r['train_ce'])} | {_fmt(r['val_ce'])} | {_fmt(r['eff_rank_last'], 1)} "
            f"({_fmt(r['eff_rank_last_peak'], 1)}) | {_fmt(r['avg_cos_last'])} | {_fmt(r['eff_rank_target'], 1)} | "
            f"{_fmt(r['avg_cos_target'])} | {_fmt(r['nitp_loss'])} | {_fmt(r['grad_norm_ratio'], 2)} | "
            f"{_fmt(r['seconds'], 0)} |")
    if phases and phases.get("hump") is not None:
        verdict = "a hump appears" if phases["hump"] else "no hump (> 3% rise after the early minimum) appears"
        lines += ["", f"NITP loss against the paper's three phases (quick drop, hump, slow decline), smoothed over "
                      f"5 logged steps: "
                      f"{_fmt(phases['initial'])} at the first step, down to {_fmt(phases['drop_min'])} at step "
                      f"{phases['drop_step']}, then up to {_fmt(phases['hump_max'])} at step {phases['hump_step']}, "
                      f"{_fmt(phases['final'])} at the end: {verdict}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy model on synthetic data (< 1 minute)")
    # A fresh folder by default: the comparison times every run from scratch, and a run directory refuses a
    # second run into it without --resume (engine/run_dir.py).
    parser.add_argument("--out", default=None,
                        help="output directory (default runs/compare/<UTC time>, a fresh one each time)")
    parser.add_argument("--docs", default=None,
                        help="also copy compare.png and summary.md here (default: docs/compare unless --quick)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated subset")
    args = parser.parse_args(argv)
    objectives = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        parser.error(f"--objectives takes a comma-separated subset of {','.join(OBJECTIVES)}, "
                     f"got {args.objectives!r}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be positive, got {args.steps}")
    settings = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        settings["steps"] = args.steps
    docs = args.docs if args.docs is not None else (None if args.quick else os.path.join("docs", "compare"))

    if args.out is None:
        args.out = os.path.join("runs", "compare", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(args.out, exist_ok=True)
    results = train_all(settings, args.out, objectives)
    summary = summarize(results)
    png = os.path.join(args.out, "compare.png")
    c = summary["config"]
    plot(results, png, f"{' vs '.join(objectives)}: preset {c['preset']}, data {c['data']}, seed {c['seed']}")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(markdown(summary, "compare.png"))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if docs:
        os.makedirs(docs, exist_ok=True)
        for name in ("compare.png", "summary.md"):
            shutil.copyfile(os.path.join(args.out, name), os.path.join(docs, name))
    print(f"plots:   {png}\nsummary: {os.path.join(args.out, 'summary.md')}", flush=True)
    if docs:
        print(f"copied to {docs}/", flush=True)
    return summary


if __name__ == "__main__":
    main()
