"""Faults and safety: non-finite steps skipped and counted, --max-bad-steps, SIGINT from outside,
a malicious .metadata refused, an incompatible checkpoint named field by field."""

import json
import os
import pickle
import signal

import pytest
import torch
from helpers import SMALL, cli_flags, metrics_rows, small, start_train, steps_in, wait_until

from engine.checkpoint import (MARKER, CheckpointError, UnsafeCheckpointError, read_metadata_safely,
                               validate_checkpoint)
from engine.faults import StopSignals, TrainingDiverged
from engine.trainer import next_batches, run, train_step


def test_non_finite_step_is_skipped_without_touching_weights_or_adam(tmp_path, monkeypatch, train_state):
    monkeypatch.setenv("NITP_DEBUG_NAN_STEPS", "2")
    state = train_state(small(tmp_path, steps=8))
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


def test_max_bad_steps_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("NITP_DEBUG_NAN_STEPS", "3,5,6,7")
    cfg = small(tmp_path, steps=20, ckpt_every=2, max_bad_steps=3)
    with pytest.raises(TrainingDiverged, match=r"^3 consecutive steps \(up to step 7\).*--max-bad-steps 3.*step 4"):
        run(cfg)
    records = metrics_rows(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["bad_steps"] for r in records] == [0, 0, 1, 1, 2, 3, 4]
    assert [r["skipped"] for r in records] == [False, False, True, False, True, True, True]
    assert records[2]["loss"] is None  # NaN is written as null
    # Step 6 was bad: no checkpoint then; keep_last=2 leaves steps 2 and 4, both complete.
    root = tmp_path / "checkpoints"
    assert steps_in(root) == [2, 4]
    assert validate_checkpoint(root / "step_00000004")["bad_steps"] == 1


def test_sigint_from_outside_saves_and_exits_cleanly(tmp_path):
    proc = start_train(*cli_flags({**SMALL, "steps": 100000}), f"--out={tmp_path}")
    metrics = tmp_path / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    last = metrics_rows(tmp_path)[-1]["step"]
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
    run(small(out, steps=2))
    ckpt = out / "checkpoints" / "step_00000002"
    assert read_metadata_safely(ckpt / ".metadata").state_dict_metadata  # DCP's own file passes
    # Shape fields must match; steps / lr may change.
    with pytest.raises(CheckpointError, match=r"d_model: checkpoint 32, this run 48.*n_layers: checkpoint 2, this run 3"):
        run(small(out, steps=4, d_model=48, n_layers=3, resume="auto"))
    with pytest.raises(CheckpointError, match="objective: checkpoint 'nitp', this run 'ntp'"):
        run(small(out, steps=4, objective="ntp", resume="auto"))
    run(small(out, steps=3, lr=1e-3, resume=str(ckpt)))  # --resume PATH
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
        run(small(out, steps=4, resume="auto"))
    assert not evil.path.exists()
    # A fresh run in the same --out is refused (the earlier run is untouched); --overwrite moves it aside.
    with pytest.raises(ValueError, match="already holds an earlier run"):
        run(small(out, steps=2, seed=1))
    run(small(out, steps=2, seed=1, overwrite=True))
    root = out / "checkpoints"
    assert steps_in(root) == [2]
    assert validate_checkpoint(root / "step_00000002")["config"]["seed"] == 1
    (previous,) = (out / "previous").iterdir()
    assert steps_in(previous / "checkpoints") == [2, 3]
