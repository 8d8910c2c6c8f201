"""Config presets, validation messages, the command line, and the WSD schedule."""

import pytest
from helpers import train_cli

from engine.config import PRESETS, make_config, parse_cli, validate
from engine.optim import wsd_factor


@pytest.mark.parametrize("overrides, message", [
    (dict(nitp_layer=4), "nitp_layer=4 is outside 0..3"),
    (dict(nitp_layer=-1), "nitp_layer=-1 is outside 0..3"),
    (dict(n_heads=5), "n_heads=5 does not divide d_model=128"),
    (dict(n_heads=8, n_kv_heads=3), "n_kv_heads=3 does not divide n_heads=8"),
    (dict(nitp_weight=-0.5), "--nitp-weight must be a finite number >= 0, got -0.5"),
    (dict(batch_size=6, micro_batch_size=4), "batch_size=6 is not divisible by micro_batch_size*world_size=4*1=4"),
    (dict(micro_batch_size=0), "micro_batch_size must be a positive integer or 'auto', got 0"),
    (dict(objective="mtp"), "objective 'mtp' is not one of"),
    (dict(nitp_loss_type="l2"), "nitp_loss_type 'l2' is not one of"),
    (dict(nitp_shift=256), "nitp_shift=256 must satisfy 0 <= shift < seq_len=256"),
    (dict(lr=0.0), "--lr must be a finite number > 0, got 0.0"),
    (dict(decay_ratio=1.5), "--decay-ratio must be a number in [0, 1], got 1.5"),
    (dict(steps=-1), "steps must be >= 0"),
])
def test_invalid_values_are_refused_with_one_message(overrides, message):
    with pytest.raises(ValueError) as err:
        make_config("tiny", **overrides)
    assert message in str(err.value)


def test_moe_top_k_above_expert_count_is_refused():
    with pytest.raises(ValueError, match=r"moe_top_k=9 must be in 1..n_experts=8"):
        make_config("tiny-moe", moe_top_k=9)


def test_unknown_preset_and_field_are_refused():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_config("huge")
    with pytest.raises(ValueError, match="unknown config field"):
        make_config("tiny", n_layer=3)


def test_batch_must_divide_over_world_size():
    cfg = make_config("tiny", batch_size=4, micro_batch_size=2)
    validate(cfg, world_size=2)
    with pytest.raises(ValueError, match=r"micro_batch_size\*world_size=2\*4=8"):
        validate(cfg, world_size=4)


def test_paper_presets_follow_table_4():
    expected = {  # d, layers, q/kv heads, head dim, target layer, λ, lr, batch (the paper's Table 4)
        "moe-1.9b-a0.3b": (512, 16, 8, 4, 64, 3, 1.0, 6.0e-4, 256),
        "moe-3b-a0.5b": (768, 17, 8, 4, 96, 4, 1.0, 8.7e-4, 512),
        "moe-9b-a1b": (1280, 24, 8, 4, 160, 5, 0.8, 4.2e-4, 1024),
        "dense-0.5b": (896, 24, 14, 2, 64, 5, 1.0, 4.2e-4, 512),
        "dense-2b": (1792, 28, 14, 2, 128, 6, 1.0, 4.2e-4, 1024),
        "dense-3b": (2560, 28, 20, 4, 128, 6, 0.8, 4.2e-4, 1024),
    }
    for name, (d, layers, h, kv, hd, k, lam, lr, batch) in expected.items():
        c = make_config(name)
        assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (d, layers, h, kv, hd), name
        assert (c.nitp_layer, c.nitp_weight, c.lr, c.batch_size) == (k, lam, lr, batch), name
        assert (c.warmup_steps, c.decay_ratio, c.weight_decay, c.grad_clip, c.seq_len) == (2000, 0.2, 0.1, 1.0, 8192)
        assert (c.beta1, c.beta2) == (0.9, 0.95)
        if name.startswith("moe"):
            assert (c.n_experts, c.moe_top_k, c.n_shared_experts, c.n_dense_layers, c.ffn_hidden) == (144, 8, 1, 1, 10944)
    assert set(PRESETS) >= {"tiny", "tiny-moe"}


def test_cli_overrides_every_kind_of_field():
    cfg = parse_cli(["--preset", "tiny-moe", "--nitp-layer", "2", "--nitp_weight", "0.5", "--nitp-stop-gradient",
                     "false", "--doc-mask", "--tokenizer", "none", "--peak-tflops", "10", "--objective", "cosreg"])
    assert (cfg.preset, cfg.nitp_layer, cfg.nitp_weight, cfg.nitp_stop_gradient) == ("tiny-moe", 2, 0.5, False)
    assert (cfg.doc_mask, cfg.tokenizer, cfg.peak_tflops, cfg.objective) == (True, None, 10.0, "cosreg")
    assert cfg.n_experts == PRESETS["tiny-moe"]["n_experts"]


def test_cli_exits_with_the_message_and_no_traceback():
    with pytest.raises(SystemExit) as err:
        parse_cli(["--n-kv-heads", "3"])
    assert str(err.value) == "error: n_kv_heads=3 does not divide n_heads=4"
    proc = train_cli("--nitp-layer", "7")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: nitp_layer=7 is outside 0..3 (n_layers=4; 0 = embeddings)"


def test_wsd_schedule_warmup_stable_decay():
    total, warmup = 100, 10
    f = [wsd_factor(s, total, warmup, 0.2) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in f[10:80])                      # stable phase
    assert f[80] == 1.0 and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(f[80:], f[81:]))          # monotone decay
    assert wsd_factor(99, 100, 10, 0.2, min_lr_ratio=0.1) == pytest.approx(1 - 0.9 * 19 / 20)


def test_the_engine_offers_exactly_the_ops_loss_types_and_backends():
    """engine/config.py repeats the op's vocabularies so that flag parsing imports no torch: they must not drift."""
    from engine import config
    from nitp_kernels import contract

    assert config.NITP_LOSS_TYPES == contract.LOSS_TYPES
    assert config.BACKENDS == contract.BACKENDS
