"""``make compare``: NTP vs NITP vs cosine regularisation on the same tiny model, seed and data.

    python -m engine.compare            # tiny preset on the stdlib corpus (~15 min on 2 CPU cores)
    python -m engine.compare --quick    # a toy model on synthetic data, well under a minute
    python -m engine.compare --long     # the multi-seed λ sweep (engine/compare_sweep.py); hours

Trains one run per objective (same preset, seed, data order; only the objective differs) through
engine.trainer.run, with validation CE and the geometry probe (engine/geometry.py) on, then
writes to --out (default runs/compare/<UTC time>/, a fresh folder each time): one run directory per
objective, ``compare.png`` (every run on shared axes: train CE, validation CE, NITP loss, effective
rank and average cosine of the last hidden states, effective rank of the NITP target
hidden_states[k]), ``summary.md`` (final values, the validation CE over the whole validation split,
the NITP loss's shape against the paper's three phases, corpus hash, machine) and
``summary.json``. The full version also copies compare.png and summary.md to docs/compare/.

``--long`` trains NTP, NITP at every λ of --lambdas and cosreg for every seed of --seeds (4,000
steps by default), --jobs runs at a time with one thread each, and reports mean ± std over seeds
and the paired difference to NTP; see engine/compare_sweep.py. With --quick it runs the toy model.
"""

from __future__ import annotations

import os

# Before torch loads libgomp (see engine/train.py): spinning OpenMP threads collapse on shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from engine.compare_report import (COLORS, TAIL, Curve, final_values, fmt, machine, nitp_phases,  # noqa: E402
                                   plot, read_run, series, smooth)
from engine.config import make_config  # noqa: E402

__all__ = ["main", "nitp_phases", "smooth", "summarize", "markdown"]

OBJECTIVES = ("ntp", "nitp", "cosreg")
FULL = dict(preset="tiny", data="stdlib", steps=240, log_every=5, eval_every=40, eval_batches=8,
            geometry_every=10, geometry_tokens=1024)
QUICK = dict(preset="tiny", data="synthetic", vocab_size=64, d_model=32, n_layers=2, n_heads=2,
             n_kv_heads=1, ffn_hidden=64, seq_len=32, batch_size=4, micro_batch_size=4, steps=30,
             warmup_steps=5, log_every=2, eval_every=10, geometry_every=5, geometry_tokens=128,
             backend="torch", device="cpu")
# --long: 16x the tokens of FULL, the last evaluation over the whole validation split (val_ce_full)
# (a checkpoint every 1000 steps: an interrupted sweep, run again, loses at most that much of a run)
LONG = dict(preset="tiny", data="stdlib", steps=4000, log_every=20, eval_every=500, eval_batches=4,
            geometry_every=100, geometry_tokens=1024, ckpt_every=1000, keep_last=1)
LONG_LAMBDAS = (0.1, 0.3, 1.0)
LONG_SEEDS = (0, 1, 2)
LONG_JOBS = 2
CONFIG_KEYS = ("preset", "data", "data_corpus_hash", "data_tokenizer_hash", "seed", "steps", "batch_size",
               "seq_len", "d_model", "n_layers", "vocab_size", "nitp_layer", "nitp_weight", "lr", "warmup_steps",
               "geometry_tokens")


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


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Final values per objective plus the NITP loss's phases (what summary.json holds)."""
    rows = {objective: {**final_values(res["records"], objective), "seconds": res["seconds"]}
            for objective, res in results.items()}
    phases = nitp_phases(*series(results["nitp"]["records"], "nitp_loss")) if "nitp" in results else None
    config = next(iter(results.values()))["config"]
    return {"runs": rows, "nitp_phases": phases, "config": {k: config.get(k) for k in CONFIG_KEYS},
            "machine": machine()}


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
        "| objective | train CE | val CE (whole split) | eff. rank last (peak) | avg cos last | eff. rank h[k] "
        "| avg cos h[k] | NITP loss | CE/NITP grad norm | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for objective, r in summary["runs"].items():
        lines.append(
            f"| {objective} | {fmt(r['train_ce'])} | {fmt(r['val_ce_full'])} | {fmt(r['eff_rank_last'], 1)} "
            f"({fmt(r['eff_rank_last_peak'], 1)}) | {fmt(r['avg_cos_last'])} | {fmt(r['eff_rank_target'], 1)} | "
            f"{fmt(r['avg_cos_target'])} | {fmt(r['nitp_loss'])} | {fmt(r['grad_norm_ratio'], 2)} | "
            f"{fmt(r['seconds'], 0)} |")
    if phases and phases.get("hump") is not None:
        verdict = "a hump appears" if phases["hump"] else "no hump (> 3% rise after the early minimum) appears"
        lines += ["", f"NITP loss against the paper's three phases (quick drop, hump, slow decline), smoothed over "
                      f"5 logged steps: "
                      f"{fmt(phases['initial'])} at the first step, down to {fmt(phases['drop_min'])} at step "
                      f"{phases['drop_step']}, then up to {fmt(phases['hump_max'])} at step {phases['hump_step']}, "
                      f"{fmt(phases['final'])} at the end: {verdict}."]
    return "\n".join(lines) + "\n"


def run_single_seed(settings: dict[str, Any], out: str, objectives: tuple[str, ...]) -> dict[str, Any]:
    """The default comparison: one run per objective, one after the other, in this process."""
    results = train_all(settings, out, objectives)
    summary = summarize(results)
    c = summary["config"]
    curves = [Curve(o, o, COLORS.get(o), [res["records"]]) for o, res in results.items()]
    plot(curves, os.path.join(out, "compare.png"),
         f"{' vs '.join(objectives)}: preset {c['preset']}, data {c['data']}, seed {c['seed']}",
         warmup=c["warmup_steps"])
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(summary, "compare.png"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _parse_list(parser: argparse.ArgumentParser, flag: str, text: str | None, kind: type) -> list | None:
    """A comma-separated list of numbers, or a one-line error naming the flag and the value."""
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or len(set(values)) != len(values):
        parser.error(f"{flag} takes a comma-separated list of distinct {kind.__name__} values, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy model on synthetic data (< 1 minute)")
    parser.add_argument("--long", action="store_true",
                        help=f"the multi-seed sweep: {LONG['steps']} steps, NTP, NITP at each λ of --lambdas and "
                             "cosreg, each for every seed of --seeds, --jobs runs at a time (with --quick: the "
                             "toy model)")
    # A fresh folder by default: the comparison times every run from scratch, and a run directory refuses a
    # second run into it without --resume (engine/run_dir.py).
    parser.add_argument("--out", default=None,
                        help="output directory (default runs/compare/<UTC time>, a fresh one each time)")
    parser.add_argument("--docs", default=None,
                        help="also copy the plots and summary.md here (default: docs/compare, with --long "
                             "docs/compare/long; none with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated subset")
    parser.add_argument("--lambdas", default=None,
                        help=f"--long: NITP weights λ, one arm each (default {','.join(map(str, LONG_LAMBDAS))})")
    parser.add_argument("--seeds", default=None,
                        help=f"--long: seeds, every arm runs each (default {','.join(map(str, LONG_SEEDS))})")
    parser.add_argument("--jobs", type=int, default=None,
                        help=f"--long: runs at a time, one thread each (default {LONG_JOBS})")
    parser.add_argument("--cosreg-weight", type=float, default=None,
                        help="--long: the cosine-regulariser's weight (default the preset's λ)")
    args = parser.parse_args(argv)
    objectives = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        parser.error(f"--objectives takes a comma-separated subset of {','.join(OBJECTIVES)}, "
                     f"got {args.objectives!r}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be positive, got {args.steps}")
    lambdas = _parse_list(parser, "--lambdas", args.lambdas, float)
    seeds = _parse_list(parser, "--seeds", args.seeds, int)
    sweep_only = {"--lambdas": lambdas, "--seeds": seeds, "--jobs": args.jobs, "--cosreg-weight": args.cosreg_weight}
    given = [flag for flag, value in sweep_only.items() if value is not None]
    if given and not args.long:
        parser.error(f"{', '.join(given)} only apply with --long (the multi-seed sweep)")
    if lambdas and (min(lambdas) <= 0 or not all(map(math.isfinite, lambdas))):
        parser.error(f"--lambdas must be finite numbers > 0, got {args.lambdas!r}")
    if seeds and min(seeds) < 0:
        parser.error(f"--seeds must be integers >= 0, got {args.seeds!r}")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.cosreg_weight is not None and not (math.isfinite(args.cosreg_weight) and args.cosreg_weight >= 0):
        parser.error(f"--cosreg-weight must be a finite number >= 0, got {args.cosreg_weight}")

    if args.long:
        settings = dict(QUICK if args.quick else LONG)
    else:
        settings = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        settings["steps"] = args.steps
    default_docs = None if args.quick else os.path.join("docs", "compare", *(["long"] if args.long else []))
    docs = args.docs if args.docs is not None else default_docs
    if args.out is None:
        args.out = os.path.join("runs", "compare", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(args.out, exist_ok=True)
    if args.long:
        from engine.compare_sweep import run_sweep

        summary = run_sweep(settings, args.out, objectives, lambdas or list(LONG_LAMBDAS), seeds or list(LONG_SEEDS),
                            args.jobs or LONG_JOBS, args.cosreg_weight)
    else:
        summary = run_single_seed(settings, args.out, objectives)
    written = summary["files"] if args.long else ["compare.png", "summary.md"]
    if docs:
        os.makedirs(docs, exist_ok=True)
        for name in written:
            shutil.copyfile(os.path.join(args.out, name), os.path.join(docs, name))
    print(f"summary: {os.path.join(args.out, 'summary.md')}\nplots:   "
          + ", ".join(os.path.join(args.out, n) for n in written if n.endswith(".png")), flush=True)
    if docs:
        print(f"copied to {docs}/", flush=True)
    return summary


if __name__ == "__main__":
    main()
