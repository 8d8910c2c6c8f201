"""The run directory has one owner and keeps earlier runs: a second run into a live --out is refused
naming the holder's pid, a killed run frees it, a relaunch without --resume is refused, --overwrite
moves the earlier run aside, an abandoned timeline is moved (never deleted), a bad --out is refused
before any data or model work, and a torn metrics line is dropped on resume."""

import os
import subprocess
import sys
import time
import pytest
from run_cases import SMALL, rows, small, steps_in

from engine.checkpoint import list_checkpoints, validate_checkpoint
from engine.run_dir import RunDirBusyError, RunDirError
from engine.trainer import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kill_concurrent_start_and_torn_metrics_line(tmp_path):
    """A live run holds --out: a second one (--resume auto) is refused naming its pid. SIGKILL frees the
    lock; the resume then drops the torn metrics line the kill left and continues from the checkpoint."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**SMALL, "steps": 100000, "ckpt_every": 2}.items()]
    proc = subprocess.Popen([sys.executable, "engine/train.py", *flags, f"--out={tmp_path}"], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not steps_in(tmp_path / "checkpoints") and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        with pytest.raises(RunDirBusyError, match=rf"--out {tmp_path} is in use by another run \(pid {proc.pid} "):
            run(small(tmp_path, steps=4, resume="auto"))
    finally:
        proc.kill()
        proc.wait(timeout=60)
    last = steps_in(tmp_path / "checkpoints")[-1]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 999, "loss": 4.8')  # what a kill in the middle of a write leaves
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped 1 unreadable line"):
        run(small(tmp_path, steps=last + 2, resume="auto"))
    assert [r["step"] for r in rows(tmp_path)] == list(range(1, last + 3))
    assert validate_checkpoint(tmp_path / "checkpoints" / f"step_{last + 2:08d}")["step"] == last + 2


def test_relaunch_without_resume_is_refused_and_overwrite_moves_the_earlier_run(tmp_path, capsys):
    run(small(tmp_path))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "run.lock"}
    with pytest.raises(RunDirError, match=r"already holds an earlier run \(checkpoints \(step_00000002\)\); pass "
                                          r"--resume auto to continue it, another --out, or --overwrite"):
        run(small(tmp_path, seed=1))
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert after == before  # nothing touched
    # A finished run continued with --resume auto (what `make demo` does the second time): nothing to train.
    run(small(tmp_path, resume="auto"))
    assert "already at step 2 of --steps 2: nothing to train" in capsys.readouterr().out
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]
    run(small(tmp_path, seed=1, overwrite=True))
    (previous,) = (tmp_path / "previous").iterdir()
    assert {p: p.read_bytes() for p in previous.rglob("*") if p.is_file()}.keys() == {
        previous / p.relative_to(tmp_path) for p in before}
    assert validate_checkpoint(previous / "checkpoints" / "step_00000002")["config"]["seed"] == 0
    assert validate_checkpoint(tmp_path / "checkpoints" / "step_00000002")["config"]["seed"] == 1


def test_an_abandoned_timeline_is_moved_aside_never_deleted(tmp_path):
    run(small(tmp_path, steps=4, ckpt_every=1, keep_last=0))
    root = tmp_path / "checkpoints"
    with pytest.warns(UserWarning, match=r"2 checkpoint\(s\) newer than step 2 .* moved to"):
        run(small(tmp_path, steps=3, keep_last=0, resume=str(root / "step_00000002")))
    with pytest.warns(UserWarning, match=r"2 checkpoint\(s\) newer than step 1 .* moved to"):
        run(small(tmp_path, steps=2, keep_last=0, resume=str(root / "step_00000001")))
    assert steps_in(root) == [1, 2]
    first, second = sorted((root / "superseded").iterdir())  # both generations are kept
    assert steps_in(first) == [3, 4] and steps_in(second) == [2, 3]
    for folder in (first, second):
        for _, path in list_checkpoints(folder):
            validate_checkpoint(path)


def _read_only_folder(tmp_path):
    """A genuinely read-only folder: a read-only tmpfs as root, a 0555 folder otherwise."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path, None
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"root without permission to mount a read-only tmpfs: {mounted.stderr.strip()}")
    return path, lambda: subprocess.run(["umount", str(path)], check=True)


def test_bad_out_is_refused_naming_the_flag_before_any_data_work(tmp_path):
    # building the data would fail on this corpus; vocab 512 passes config validation for a trained BPE
    missing_data = str(tmp_path / "no-such-corpus")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match=rf"^--out {tmp_path / 'file'} is a file, not a folder"):
        run(small(tmp_path / "file", data=missing_data, vocab_size=512))
    with pytest.raises(RunDirError, match=rf"^--out {tmp_path / 'file' / 'sub'}: cannot create the folder"):
        run(small(tmp_path / "file" / "sub", data=missing_data, vocab_size=512))
    folder, cleanup = _read_only_folder(tmp_path)
    try:
        with pytest.raises(RunDirError, match=rf"^--out {folder}: cannot write there \((Read-only file system|"
                                              r"Permission denied)\)"):
            run(small(folder, data=missing_data, vocab_size=512))
        with pytest.raises(RunDirError, match=r"cannot create the folder \((Read-only file system|Permission denied)"):
            run(small(folder / "new", data=missing_data, vocab_size=512))
    finally:
        if cleanup:
            cleanup()


def test_resume_auto_without_checkpoints_keeps_the_earlier_log(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')  # a run killed before its first save
    run(small(tmp_path, resume="auto"))
    (previous,) = (tmp_path / "previous").iterdir()
    assert (previous / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'
    assert "the earlier run's log was moved to" in capsys.readouterr().out
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]
