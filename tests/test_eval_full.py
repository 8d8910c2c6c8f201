"""Full-split validation: the last evaluation logs val_ce_full, and it equals the cross-entropy that
transformers computes on the exported model over every validation token (a plain loop over
non-overlapping windows); --eval-batches all; bad values refused."""

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from engine.config import make_config, parse_cli  # noqa: E402
from engine.data import build_data  # noqa: E402
from engine.export import export_run  # noqa: E402
from engine.trainer import run  # noqa: E402

VOCAB = 64
SEQ = 16
SMALL = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, seq_len=SEQ, batch_size=4,
             micro_batch_size=2, warmup_steps=1, log_every=2, lr=1e-2, val_fraction=0.001, backend="torch",
             device="cpu", eval_every=3, steps=6)


def _config(tmp_path, name, **overrides):
    return make_config("tiny", **{**SMALL, **overrides}, data="synthetic", vocab_size=VOCAB,
                       out=str(tmp_path / name))


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _transformers_val_ce(hf_dir, tokens: torch.Tensor) -> float:
    """Mean next-token CE over every token of the validation stream, in windows of SEQ inputs."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, SEQ):
            chunk = tokens[start:start + SEQ + 1]
            logits = model(chunk[None, :-1]).logits[0]
            total += F.cross_entropy(logits.double(), chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    assert count == len(tokens) - 1  # every validation token but the first is predicted once
    return total / count


def test_val_ce_full_matches_transformers_on_the_export(tmp_path):
    cfg = _config(tmp_path, "run", eval_batches=1)
    run(cfg)
    records = _records(tmp_path / "run")
    evals = [r for r in records if "val_ce" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert "val_ce_full" not in evals[0]  # only the run's last evaluation covers the whole split
    final = evals[-1]

    val = build_data(cfg).val
    assert val.num_batches() >= 8  # the split is many batches: one batch alone is a different number
    tokens = torch.from_numpy(val.stream.tokens.astype("int64"))
    export_run(tmp_path / "run", tmp_path / "hf")
    want = _transformers_val_ce(tmp_path / "hf", tokens)
    assert final["val_ce_full"] == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert abs(final["val_ce"] - final["val_ce_full"]) > 1e-3


def test_eval_batches_all_and_turning_the_full_evaluation_off(tmp_path):
    run(_config(tmp_path, "all", eval_batches="all", steps=3))
    final = _records(tmp_path / "all")[-1]
    assert final["val_ce_full"] == final["val_ce"]  # one pass: the evaluation already covered the split
    run(_config(tmp_path, "off", eval_full_at_end=False, steps=3))
    final = _records(tmp_path / "off")[-1]
    assert "val_ce" in final and "val_ce_full" not in final


def test_eval_batches_flag():
    assert parse_cli(["--eval-batches", "all", "--eval-every", "5"]).eval_batches == "all"
    assert parse_cli(["--eval-batches", "ALL"]).eval_batches == "all"
    assert parse_cli(["--eval-batches", "7"]).eval_batches == 7
    assert parse_cli(["--eval-full-at-end", "false"]).eval_full_at_end is False
    with pytest.raises(ValueError, match=r"--eval-batches must be a positive integer or 'all', got 'some'"):
        make_config("tiny", eval_batches="some")
    with pytest.raises(ValueError, match=r"--eval-batches must be a positive integer or 'all', got -1"):
        make_config("tiny", eval_batches=-1)
