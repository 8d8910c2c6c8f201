"""The paper's table: theoretical NITP overhead of every Table 4 preset, both FLOPs counts.

Computed by engine.flops: the paper's Appendix G formula (attention term from the config, no attention scores,
no router) and the full count (every matmul, attention scores 12·L·h·q·T at the preset's T = 8192 not halved
for causality, router, dense first layer). Nothing here is measured; it is the yardstick for what is.
"""
from __future__ import annotations

from engine.config import PRESETS, make_config
from engine.flops import full_count, paper_formula

# The paper's own figures for the one model it states them for (DESIGN.md Appendix B).
PAPER_QUOTED = {"moe-9b-a1b": {"flops_overhead": 0.023, "wall_clock_overhead": 0.018}}


def paper_presets() -> list[str]:
    """Table 4's presets (every preset but the tiny CPU ones), in the engine's order."""
    return [name for name in PRESETS if not name.startswith("tiny")]


def paper_table() -> list[dict]:
    """One row per preset: d, layers, V, both counts of NTP and NITP FLOPs per token and their ratios."""
    rows = []
    for name in paper_presets():
        cfg = make_config(name)
        paper, full = paper_formula(cfg), full_count(cfg)
        rows.append({
            "preset": name, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size,
            "seq_len": cfg.seq_len, "moe": cfg.is_moe,
            "paper_formula": {"ntp_flops_per_token": paper.ntp, "nitp_flops_per_token": paper.nitp,
                              "overhead": paper.overhead},
            "full_count": {"ntp_flops_per_token": full.ntp, "nitp_flops_per_token": full.nitp,
                           "overhead": full.overhead},
            "paper_quoted": PAPER_QUOTED.get(name),
        })
    return rows
