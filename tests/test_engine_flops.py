"""Training FLOPs per token against the paper's Appendix G numbers and a hand count."""

import pytest
from helpers import run_python, succeeded

from engine.config import make_config
from engine.flops import full_count, paper_formula, training_flops_per_token


def test_paper_formula_reproduces_appendix_g_for_moe_9b():
    counts = paper_formula(make_config("moe-9b-a1b"))
    # The paper's own numbers (Appendix G.3): 1.18e8 NITP, 3.89e9 + 1.17e9 = 5.06e9 NTP, 2.3 %.
    assert counts.nitp == pytest.approx(1.18e8, rel=5e-3)
    assert counts.ntp == pytest.approx(5.06e9, rel=5e-3)
    d, de, k, L, V = 1280, 640, 9, 24, 152064
    assert counts.ntp == L * (18 * d * d + 18 * k * d * de) + 6 * V * d
    assert counts.nitp == 72 * d * d + 18 * d
    assert f"{100 * counts.overhead:.2f}".startswith("2.3")


def test_paper_formula_dense_attention_term_from_config():
    c = make_config("dense-0.5b")  # 14 q / 2 kv heads of 64: attention = d·896 + 2·d·128 + 896·d
    d = 896
    attn = d * 896 + 2 * d * 128 + 896 * d
    assert paper_formula(c).ntp == 24 * (6 * attn + 18 * d * 4864) + 6 * 152064 * d


def test_full_count_adds_scores_router_and_dense_first_layer():
    c = make_config("moe-9b-a1b")
    d, T, L = 1280, 8192, 24
    attn = 6 * 3 * d * d + 12 * 8 * 160 * T
    moe = 18 * d * 9 * 640 + 6 * d * 144
    dense = 18 * d * 10944
    expected = 6 * 152064 * d + L * attn + (L - 1) * moe + dense
    full = full_count(c)
    assert full.ntp == expected
    assert full.overhead < paper_formula(c).overhead
    assert training_flops_per_token(c, "ntp") == expected
    assert training_flops_per_token(c, "nitp") == expected + full.nitp


def test_projector_off_counts_only_the_loss():
    c = make_config("tiny", nitp_projector=False)
    assert paper_formula(c).nitp == 18 * c.d_model


def test_cli_prints_both_overheads():
    out = succeeded(run_python("-m", "engine.flops", "--preset", "moe-9b-a1b")).stdout
    assert "paper-formula NITP overhead: 2.33%" in out
    assert "full-count NITP overhead: " in out
