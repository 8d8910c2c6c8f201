"""Checkpoint integrity and resume semantics: flipped bits in a shard are caught by the checksum and the
previous checkpoint is used; a full disk (injected ENOSPC, and a real small tmpfs where it can be
mounted) gives a message with the path, cause and size, leaves nothing partial and the previous
checkpoints intact, and a retry works; schedule changes on resume take effect exactly as in a fresh
run; fields that must stay fixed are all named in the refusal."""

import contextlib
import dataclasses
import errno
import os
import subprocess

import pytest
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from run_cases import rows, small, steps_in

from engine.checkpoint import (FIXED_ON_RESUME, MAY_CHANGE_ON_RESUME, CheckpointError, Checkpointer,
                               CheckpointWriteError, ResumeMismatchError, validate_checkpoint)
from engine.config import TrainConfig
from engine.metrics import truncate_metrics
from engine.trainer import build_state, run

def test_flipped_bits_in_a_shard_fall_back_to_the_previous_checkpoint(tmp_path, capsys):
    run(small(tmp_path, steps=2, ckpt_every=1, keep_last=0))
    shard = tmp_path / "checkpoints" / "step_00000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 16, 8):  # 16 bits: what turned weights into 1e37 before checksums
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="__0_0.distcp: SHA-256 differs"):
        validate_checkpoint(shard.parent)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_00000002: .*__0_0.distcp: SHA-256 differs"), \
            pytest.warns(UserWarning, match=r"1 checkpoint\(s\) newer than step 1 .* moved to .*superseded"):
        run(small(tmp_path, steps=3, keep_last=0, resume="auto"))
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000001'} (step 1)" in capsys.readouterr().out
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3]
    # Named explicitly, a corrupt checkpoint is refused (no fall-back), the reason in the error itself.
    corrupt = next((tmp_path / "checkpoints" / "superseded").iterdir()) / "step_00000002"
    with pytest.warns(UserWarning, match="SHA-256 differs"), \
            pytest.raises(CheckpointError, match=r"no loadable checkpoint in .*step_00000002: step_00000002: .*SHA-256"):
        run(small(tmp_path / "other", steps=3, resume=str(corrupt)))


class _DiskFullStream:
    """A file that takes ``budget`` bytes, writes part of the next write and then fails with ENOSPC."""

    def __init__(self, stream, budget: int):
        self._stream, self._left = stream, budget

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) > self._left:
            self._stream.write(view[: self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(view)
        return self._stream.write(view)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@pytest.mark.parametrize("async_ckpt", [False, True])
def test_disk_full_leaves_nothing_partial_and_a_retry_works(tmp_path, monkeypatch, async_ckpt):
    real_create_stream = dcp_filesystem.FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real_create_stream(self, path, mode) as stream:
            full = "step_00000004.tmp" in str(path) and str(path).endswith(".distcp")
            yield _DiskFullStream(stream, 1000) if full else stream

    monkeypatch.setattr(dcp_filesystem.FileSystem, "create_stream", create_stream)
    with pytest.raises(CheckpointWriteError) as failure:
        run(small(tmp_path, steps=4, ckpt_every=2, async_ckpt=async_ckpt))
    message = str(failure.value)
    assert f"could not write the checkpoint of step 4 to {tmp_path / 'checkpoints' / 'step_00000004.tmp'}" in message
    assert "No space left on device" in message and "the previous checkpoint (step 2) is intact" in message
    needed = float(message.split("It needs about ")[1].split(" MiB")[0])
    assert 0.3 < needed < 1.0  # model + Adam moments of this model: ~0.45 MiB of fp32 tensors
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    validate_checkpoint(tmp_path / "checkpoints" / "step_00000002")
    monkeypatch.undo()  # space again: the retry resumes from step 2 and saves step 4
    run(small(tmp_path, steps=4, ckpt_every=2, async_ckpt=async_ckpt, resume="auto"))
    assert steps_in(tmp_path / "checkpoints") == [2, 4] and [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4]


def test_a_real_full_file_system(tmp_path):
    """The same on a 256 KiB tmpfs (needs root and mount permission, else skipped: the injected
    ENOSPC above covers the behaviour everywhere)."""
    out = tmp_path / "small-disk"
    out.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(out)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root with mount permission")
    try:
        with pytest.raises(CheckpointWriteError, match=r"step_00000002.tmp \(.*\). It needs about 0\.\d MiB "
                                                       r".* has 0\.\d MiB free \(less than that: the disk is full\)"
                                                       r".*no earlier checkpoint"):
            run(small(out, steps=2))
        assert not (out / "checkpoints" / "step_00000002.tmp").exists()
        subprocess.run(["mount", "-o", "remount,size=4m", str(out)], check=True)
        run(small(out, steps=2, resume="auto"))
        assert steps_in(out / "checkpoints") == [2]
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_schedule_changes_on_resume_take_effect_as_in_a_fresh_run(tmp_path):
    fresh = tmp_path / "fresh"
    run(small(fresh, steps=8, lr=0.01))
    want = [r["lr"] for r in rows(fresh)]
    # A 4-step run resumed with --steps 8 --lr 0.01: from step 5 on, the fresh 8-step run's rates.
    run(small(tmp_path / "a", steps=4))
    run(small(tmp_path / "a", steps=8, lr=0.01, resume="auto"))
    assert [r["lr"] for r in rows(tmp_path / "a")][4:] == want[4:]
    # A finished 6-step run extended to 8 steps (its own schedule ended in the decay to 0).
    run(small(tmp_path / "b", steps=6, lr=0.01, decay_ratio=0.5))
    run(small(tmp_path / "b", steps=8, lr=0.01, resume="auto"))
    assert [r["lr"] for r in rows(tmp_path / "b")][6:] == want[6:] and want[6] > 0


def test_fixed_fields_are_all_named_and_optimizer_settings_come_from_the_run(tmp_path):
    run(small(tmp_path, steps=2))
    changed = dict(seed=1, seq_len=8, d_model=48, objective="ntp", nitp_weight=0.5)
    with pytest.raises(ResumeMismatchError) as refusal:
        run(small(tmp_path, steps=4, resume="auto", **changed))
    message = str(refusal.value)
    assert message.startswith(f"cannot resume from {tmp_path / 'checkpoints' / 'step_00000002'}")
    for name, value in changed.items():
        assert f"{name}: checkpoint {getattr(small(tmp_path), name)!r}, this run {value!r}" in message, name
    state = build_state(small(tmp_path, steps=4, resume="auto", beta2=0.99, weight_decay=0.05))
    try:
        Checkpointer(state.cfg, state.dist).start(state)
        assert state.step == 2
        assert [g["betas"] for g in state.optimizer.param_groups] == [(0.9, 0.99)] * 2
        assert [g["weight_decay"] for g in state.optimizer.param_groups] == [0.05, 0.0]
    finally:
        state.close()


def test_every_config_field_is_classified_for_resume():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not MAY_CHANGE_ON_RESUME & FIXED_ON_RESUME
    assert names - MAY_CHANGE_ON_RESUME - FIXED_ON_RESUME == set(), "classify new fields in engine/checkpoint/resume.py"
    assert (MAY_CHANGE_ON_RESUME | FIXED_ON_RESUME) - names == set()


def test_truncate_metrics_keeps_records_up_to_the_step_and_drops_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st\n{"step": 3}\n{"step": 4, "lo')
    with pytest.warns(UserWarning, match=r"dropped 2 unreadable line\(s\) \(line 3, 5 of 5"):
        truncate_metrics(path, 3)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
