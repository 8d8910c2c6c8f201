"""Output: tables on the terminal, the JSON file and a PNG chart of measured vs theoretical.

Files go to OUT/bench-YYYYmmdd-HHMMSS.{json,png}, copied to OUT/latest.{json,png}. Small on purpose (KBs).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from benchmarks.methods import METHODS

MiB = 2 ** 20


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def op_table(op: dict) -> str:
    """Per shape: one row per method (time, vs ours, memory), then the NITP-overhead ratios."""
    lines = ["== op level: forward + backward (median ms; memory in MiB) =="]
    for shape in op["shapes"]:
        recs, r = shape["methods"], shape["ratios"]
        memory = "cuda peak" if any("peak_extra_bytes" in m for m in recs.values()) else "peak RSS"
        lines.append(f"N={shape['n']} d={shape['d']} V={shape['vocab']} ({shape['dtype']})")
        lines.append(f"    {'method':24s} {'ms':>10s} {'x b':>7s} {'saved':>9s} {memory:>9s}")
        base = recs.get("ours_ntp", {}).get("time_ms_median")
        for name in METHODS:
            rec = recs.get(name)
            if rec is None:
                continue
            label = f"{rec['letter']} {name}"
            if "time_ms_median" not in rec:
                why = rec.get("skipped") or rec.get("error", "")
                lines.append(f"    {label:24s} {'skipped' if 'skipped' in rec else 'error'}: {why[:90]}")
                continue
            peak = rec.get("peak_extra_bytes", rec.get("peak_rss_extra_bytes"))
            peak_mib = _fmt(peak / MiB if peak is not None else None, "9.1f")
            lines.append(f"    {label:24s} {rec['time_ms_median']:10.1f} "
                         f"{_fmt(rec['time_ms_median'] / base if base else None, '7.2f'):>7s} "
                         f"{rec['saved_new_bytes'] / MiB:9.1f} {peak_mib:>9s}")
        lines.append(f"    NITP overhead g/b: time {_fmt(r['nitp_over_ntp_time'], '.3f')} (per round "
                     f"{_fmt(r.get('nitp_over_ntp_time_paired'), '.3f')}) vs FLOPs ratio "
                     f"1+12d/V = {r['flops_ratio']:.3f}; saved bytes {_fmt(r['nitp_over_ntp_saved_bytes'], '.3f')}; "
                     f"peak {_fmt(r['nitp_over_ntp_peak_memory'], '.3f')}")
        lines.append(f"    g vs fastest NTP-only ({r['best_ntp_method']}): "
                     f"{_fmt(r['nitp_over_best_ntp_time'], '.3f')}; "
                     f"vs fastest other library/peer ({r['best_other_ntp_method']}): "
                     f"{_fmt(r['nitp_over_best_other_ntp_time'], '.3f')}; vs fastest NTP keeping less than "
                     f"the logits for backward ({r['best_low_memory_ntp_method']}): "
                     f"{_fmt(r['nitp_over_best_low_memory_ntp_time'], '.3f')}")
        bad = [group for group, check in shape["loss_check"].items() if not check["agree"]]
        if bad:
            lines.append(f"    WARNING: losses disagree within {bad} (see loss_check in the JSON)")
    return "\n".join(lines)


def step_table(step: dict) -> str:
    lines = ["== step level: forward + backward + AdamW, engine build_state/train_step, NTP vs NITP ==",
             f"    {'config':8s} {'d':>5s} {'L':>3s} {'tok/step':>8s} {'NTP tok/s':>10s} {'NITP tok/s':>10s} "
             f"{'overhead':>9s} {'full-count':>10s} {'paper':>7s} {'MFU NTP':>8s} {'mem x':>6s}"]
    for c in step["configs"]:
        o, r = c["objectives"], c["ratios"]
        lines.append(f"    {c['config']:8s} {c['d_model']:5d} {c['n_layers']:3d} {c['tokens_per_step']:8d} "
                     f"{o['ntp']['tokens_per_s']:10.0f} {o['nitp']['tokens_per_s']:10.0f} "
                     f"{100 * r['overhead_measured']:+8.1f}% {100 * r['overhead_full_count']:9.1f}% "
                     f"{100 * r['overhead_paper_formula']:6.1f}% {_fmt(r['mfu_ntp'], '8.1%'):>8s} "
                     f"{_fmt(r['nitp_over_ntp_peak_memory'], '6.2f'):>6s}")
    peak = step["mfu_peak_flops"]
    lines.append(f"    ({step['mfu_note']}; peak {_fmt(peak and peak / 1e9, '.1f')} GFLOP/s; "
                 "mem x = NITP/NTP peak memory of one step)")
    return "\n".join(lines)


def paper_table_text(rows: list[dict]) -> str:
    lines = ["== the paper's presets (Table 4): theoretical NITP training-FLOPs overhead ==",
             f"    {'preset':16s} {'d':>5s} {'L':>3s} {'paper formula':>13s} {'full count':>10s}  paper quotes"]
    for row in rows:
        quoted = row["paper_quoted"]
        quote = (f"{100 * quoted['flops_overhead']:.1f}% FLOPs, {100 * quoted['wall_clock_overhead']:.1f}% wall clock"
                 if quoted else "")
        lines.append(f"    {row['preset']:16s} {row['d_model']:5d} {row['n_layers']:3d} "
                     f"{100 * row['paper_formula']['overhead']:12.2f}% "
                     f"{100 * row['full_count']['overhead']:9.2f}%  {quote}")
    lines.append("    (full count: every matmul incl. attention scores at T=8192, not halved for causality; router)")
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    """Bars: measured NITP overhead beside the theoretical one, per op shape and step config; paper presets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, measured, theory = [], [], []
    for shape in (result.get("op") or {}).get("shapes", []):
        ratio = shape["ratios"]["nitp_over_ntp_time"]
        labels.append(f"op N={shape['n']}\nd={shape['d']} V={shape['vocab'] // 1000}k")
        measured.append(100 * (ratio - 1) if ratio else float("nan"))
        theory.append(100 * (shape["flops_ratio"] - 1))
    for c in (result.get("step") or {}).get("configs", []):
        labels.append(f"step {c['config']}\nd={c['d_model']} L={c['n_layers']}")
        measured.append(100 * c["ratios"]["overhead_measured"])
        theory.append(100 * c["ratios"]["overhead_full_count"])
    rows = result.get("paper_table") or []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [max(len(labels), 1), 3]})
    ax = axes[0]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], measured, width=0.4, label="measured (time)")
    ax.bar([x + 0.2 for x in xs], theory, width=0.4, label="theoretical (op: 1+12d/V; step: full-count FLOPs)")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("NITP overhead over NTP (%)")
    env = result["environment"]
    ax.set_title(f"measured on {env.get('gpu') or env['cpu_model']} ({env['cpu_cores']} cores, "
                 f"{env['torch_threads']} torch threads), {env['date_utc'][:10]}", fontsize=9)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    ax = axes[1]
    names = [row["preset"] for row in rows]
    ys = range(len(names))
    ax.barh([y - 0.2 for y in ys], [100 * row["paper_formula"]["overhead"] for row in rows], height=0.4,
            label="paper formula")
    ax.barh([y + 0.2 for y in ys], [100 * row["full_count"]["overhead"] for row in rows], height=0.4,
            label="full count")
    ax.set_yticks(list(ys), names, fontsize=7)
    ax.set_xlabel("theoretical overhead (%)")
    ax.set_title("paper presets (Table 4)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    tmp.replace(path)


def write_outputs(result: dict, out_dir: Path, stamp: str) -> dict[str, Path]:
    """bench-<stamp>.json/.png and latest.json/.png under out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"bench-{stamp}.json", "png": out_dir / f"bench-{stamp}.png"}
    tmp = paths["json"].with_name(paths["json"].name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(paths["json"])
    chart(result, paths["png"])
    for kind in ("json", "png"):
        latest = out_dir / f"latest.{kind}"
        shutil.copyfile(paths[kind], latest)
        paths[f"latest_{kind}"] = latest
    return paths
