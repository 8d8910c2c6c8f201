"""--micro-batch-size auto: the largest micro-batch up to the preset's that divides the per-rank
batch; every preset starts on 1, 2 and 8 processes where its batch can be split that way."""

import pytest

from engine.config import (PRESETS, gradient_accumulation_steps, make_config, parse_cli,
                           resolve_micro_batch_size, validate)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_every_preset_validates_on_1_2_and_8_processes(preset, world_size):
    cfg = make_config(preset)
    assert cfg.micro_batch_size == "auto"
    if cfg.batch_size % world_size:  # the CPU presets' batch of 4 cannot feed 8 ranks: refused, naming both
        with pytest.raises(ValueError, match=rf"batch_size={cfg.batch_size} is not divisible by "
                                             rf"world_size={world_size}"):
            validate(cfg, world_size)
        assert preset.startswith("tiny") and world_size == 8
        return
    validate(cfg, world_size)
    micro = resolve_micro_batch_size(cfg, world_size)
    accum = gradient_accumulation_steps(cfg, world_size)
    assert 1 <= micro <= cfg.max_micro_batch_size and micro * accum * world_size == cfg.batch_size


@pytest.mark.parametrize("batch, world, cap, micro", [
    (4, 1, 4, 4), (4, 2, 4, 2), (12, 2, 4, 3), (12, 1, 4, 4), (14, 2, 4, 1), (1024, 8, 1, 1), (30, 3, 8, 5)])
def test_auto_is_the_largest_divisor_up_to_the_cap(batch, world, cap, micro):
    cfg = make_config("tiny", batch_size=batch, max_micro_batch_size=cap)
    validate(cfg, world)
    assert resolve_micro_batch_size(cfg, world) == micro
    assert gradient_accumulation_steps(cfg, world) == batch // (micro * world)


def test_cli_takes_auto_or_an_integer_and_names_the_flag_otherwise(capsys):
    assert parse_cli(["--micro-batch-size", "auto"]).micro_batch_size == "auto"
    assert parse_cli(["--micro-batch-size", "2"]).micro_batch_size == 2
    with pytest.raises(SystemExit):
        parse_cli(["--micro-batch-size", "two"])
    assert "--micro_batch_size: expected a positive integer or 'auto', got 'two'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="batch_size=4 is not divisible by world_size=3"):
        parse_cli([], world_size=3)
