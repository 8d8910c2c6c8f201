"""Faults and safety: non-finite steps skipped and counted, --max-bad-steps, SIGINT from outside,
a malicious .metadata refused, an incompatible checkpoint named field by field."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine.checkpoint import (MARKER, CheckpointError, UnsafeCheckpointError, list_checkpoints,
                               read_metadata_safely, validate_checkpoint)
from engine.config import make_config
from engine.faults import StopSignals, TrainingDiverged
from engine.parallel import close_distributed
from engine.trainer import build_state, next_batches, run, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(data="synthetic", vocab_size=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, seq_len=16,
             batch_size=4, micro_batch_size=2, warmup_steps=4, log_every=1, steps=8)



def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_non_finite_step_is_skipped_without_touching_weights_or_adam(tmp_path, monkeypatch):
    monkeypatch.setenv("NITP_DEBUG_NAN_STEPS", "2")
    state = build_state(make_config("tiny", **SMALL, out=str(tmp_path)))
    try:
        assert not train_step(state, next_batches(state))["skipped"]
        params = {n: p.full_tensor().clone() for n, p in state.model.named_parameters()}
        moments = [(s["step"].clone(), s["exp_avg_sq"].full_tensor().clone()) for s in state.optimizer.state.values()]
        cursor, lr_before = state.data.train.cursor, state.scheduler.get_last_lr()[0]
        m = train_step(state, next_batches(state))
        assert m["skipped"] and m["bad_steps"] == 1 and state.consecutive_bad_steps == 1
        assert m["loss"] != m["loss"]  # NaN
        for n, p in state.model.named_parameters():
            assert torch.equal(p.full_tensor(), params[n]), n
        for s, (step, sq) in zip(state.optimizer.state.values(), moments, strict=True):
            assert torch.equal(s["step"], step) and torch.equal(s["exp_avg_sq"].full_tensor(), sq)
        assert all(p.grad is None for p in state.model.parameters())
        # The step counts: its data is consumed and the schedule moves on (documented choice).
        assert state.step == 2 and state.data.train.cursor > cursor and state.scheduler.last_epoch == 2
        assert state.scheduler.get_last_lr()[0] != lr_before
        m = train_step(state, next_batches(state))
        assert not m["skipped"] and m["bad_steps"] == 1 and state.consecutive_bad_steps == 0
    finally:
        close_distributed(state.dist)


def test_max_bad_steps_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("NITP_DEBUG_NAN_STEPS", "3,5,6,7")
    cfg = make_config("tiny", **{**SMALL, "steps": 20}, out=str(tmp_path), ckpt_every=2, max_bad_steps=3)
    with pytest.raises(TrainingDiverged, match=r"^3 consecutive steps \(up to step 7\).*--max-bad-steps 3.*step 4"):
        run(cfg)
    records = rows(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["bad_steps"] for r in records] == [0, 0, 1, 1, 2, 3, 4]
    assert [r["skipped"] for r in records] == [False, False, True, False, True, True, True]
    assert records[2]["loss"] is None  # NaN is written as null
    # Step 6 was bad: no checkpoint then; keep_last=2 leaves steps 2 and 4, both complete.
    root = tmp_path / "checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [2, 4]
    assert validate_checkpoint(root / "step_00000004")["bad_steps"] == 1


def test_sigint_from_outside_saves_and_exits_cleanly(tmp_path):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**SMALL, "steps": 100000}.items()]
    proc = subprocess.Popen([sys.executable, "engine/train.py", *args, f"--out={tmp_path}"], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    last = rows(tmp_path)[-1]["step"]
    assert f"received SIGINT: saved a checkpoint at step {last}" in stdout
    assert validate_checkpoint(tmp_path / "checkpoints" / f"step_{last:08d}")["step"] == last


def test_a_second_signal_stops_at_once():
    stop = StopSignals()
    stop.install()
    try:
        signal.raise_signal(signal.SIGTERM)
        assert stop.received == "SIGTERM" and stop.requested(torch.device("cpu"))
        with pytest.raises(SystemExit) as exc:
            signal.raise_signal(signal.SIGTERM)
        assert exc.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) != stop._handle  # the previous handler is back
    finally:
        stop.restore()


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_metadata_is_refused_and_incompatible_config_named(tmp_path, capsys):
    out = tmp_path / "run"
    run(make_config("tiny", **{**SMALL, "steps": 2}, out=str(out)))
    ckpt = out / "checkpoints" / "step_00000002"
    assert read_metadata_safely(ckpt / ".metadata").state_dict_metadata  # DCP's own file passes
    # Shape fields must match; steps / lr may change.
    with pytest.raises(CheckpointError, match=r"d_model: checkpoint 32, this run 48.*n_layers: checkpoint 2, this run 3"):
        run(make_config("tiny", **{**SMALL, "steps": 4, "d_model": 48, "n_layers": 3}, out=str(out), resume="auto"))
    with pytest.raises(CheckpointError, match="objective: checkpoint 'nitp', this run 'ntp'"):
        run(make_config("tiny", **{**SMALL, "steps": 4}, objective="ntp", out=str(out), resume="auto"))
    run(make_config("tiny", **{**SMALL, "steps": 3, "lr": 1e-3}, out=str(out), resume=str(ckpt)))  # --resume PATH
    assert f"resumed from {ckpt} (step 2)" in capsys.readouterr().out
    # A crafted .metadata whose unpickling would run a command: refused, never executed.
    ckpt = out / "checkpoints" / "step_00000003"
    evil = _Payload()
    evil.path = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(evil))
    marker = json.loads((ckpt / MARKER).read_text())
    marker["files"][".metadata"] = (ckpt / ".metadata").stat().st_size
    (ckpt / MARKER).write_text(json.dumps(marker))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle (posix|os)\.system"):
        run(make_config("tiny", **{**SMALL, "steps": 4}, out=str(out), resume="auto"))
    assert not evil.path.exists()
    # A fresh run in the same --out is refused (the earlier run is untouched); --overwrite moves it aside.
    with pytest.raises(ValueError, match="already holds an earlier run"):
        run(make_config("tiny", **{**SMALL, "steps": 2, "seed": 1}, out=str(out)))
    run(make_config("tiny", **{**SMALL, "steps": 2, "seed": 1}, out=str(out), overwrite=True))
    root = out / "checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [2]
    assert validate_checkpoint(root / "step_00000002")["config"]["seed"] == 1
    (previous,) = (out / "previous").iterdir()
    assert [s for s, _ in list_checkpoints(previous / "checkpoints")] == [2, 3]
