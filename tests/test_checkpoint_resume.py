"""Exact resume: a 40-step run against runs stopped (SIGTERM), killed (SIGKILL) or moved to another
world size at step 20 and resumed to 40; incomplete and corrupt checkpoints are skipped."""

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import (SMALL, assert_same_losses, cli_flags, metrics_rows, run_config, small, steps_in,
                     torchrun, train_cli)

from engine.checkpoint import MARKER, validate_checkpoint
from engine.checkpoint.layout import describe_files
from engine.trainer import run

STEPS = 40  # the length of every run here: 40 steps of SMALL take a second or two


def checkpointed_steps(out):
    return steps_in(Path(out) / "checkpoints")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 40-step run that also saves every 10 steps, keeping the last 2."""
    out = tmp_path_factory.mktemp("reference")
    run(small(out, steps=STEPS, ckpt_every=10, keep_last=2))
    assert checkpointed_steps(out) == [30, 40]
    return metrics_rows(out)


def test_sigterm_at_step_20_then_resume_is_bitwise_identical(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path
    monkeypatch.setenv("NITP_DEBUG_SIGNAL_AT_STEP", "20:TERM")  # the process signals itself
    run(small(out, steps=STEPS))
    assert "received SIGTERM: saved a checkpoint at step 20" in capsys.readouterr().out
    assert checkpointed_steps(out) == [20] and len(metrics_rows(out)) == 20
    monkeypatch.delenv("NITP_DEBUG_SIGNAL_AT_STEP")
    # The resumed half saves asynchronously; the run finalises its last save before returning.
    run(small(out, steps=STEPS, resume="auto", ckpt_every=10, async_ckpt=True))
    assert "resumed from" in capsys.readouterr().out
    assert_same_losses(metrics_rows(out), reference)
    assert checkpointed_steps(out) == [30, 40]
    assert validate_checkpoint(out / "checkpoints" / "step_00000040")["step"] == 40


def test_sigkill_after_checkpoint_then_resume_skips_broken_checkpoints(reference, tmp_path):
    proc = train_cli(*cli_flags({**SMALL, "steps": STEPS, "ckpt_every": 10, "out": tmp_path}),
                     env={"NITP_DEBUG_SIGNAL_AT_STEP": "20:KILL"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert checkpointed_steps(tmp_path) == [10, 20]
    # A save killed half-way (no marker, under .tmp) and a "complete" one whose data file is garbage
    # with a forged marker (right sizes and checksums: it fails in DCP's load) are both passed over.
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "step_00000020", root / "step_00000030.tmp")
    (root / "step_00000030.tmp" / MARKER).unlink()
    forged = root / "step_00000025"
    shutil.copytree(root / "step_00000020", forged)
    state = json.loads((forged / "state.json").read_text())
    (forged / "state.json").write_text(json.dumps({**state, "step": 25}))
    data = forged / "__0_0.distcp"
    data.write_bytes(os.urandom(data.stat().st_size))
    names = [p.name for p in forged.iterdir() if p.name != MARKER]
    (forged / MARKER).write_text(json.dumps({"step": 25, "files": describe_files(forged, names)}))
    with pytest.warns(UserWarning, match=r"1 checkpoint\(s\) newer than step 20 .* were moved to .*superseded"), \
            pytest.warns(UserWarning, match="skipping checkpoint .*step_00000025: loading failed"):
        run(small(tmp_path, steps=STEPS, resume="auto"))
    assert_same_losses(metrics_rows(tmp_path), reference)  # across processes too: bitwise
    # The skipped save is moved aside (never deleted), so keep_last=2 keeps two good ones: 20 and 40;
    # the interrupted .tmp save (never complete) is removed.
    assert checkpointed_steps(tmp_path) == [20, 40]
    assert [p.name for p in (root / "superseded").glob("*/*")] == ["step_00000025"]
    assert not list(root.glob("*.tmp"))


# Under torchrun: one 40-step reference run that saves at step 20, then a fresh TrainState in the same
# two processes resumed from a copy of that checkpoint (one torchrun start instead of two).
DRIVER = """
import shutil
from engine.config import make_config
from engine.trainer import run
small, root = json.loads(sys.argv[2]), sys.argv[3]
run(make_config("tiny", **small, out=root + "/ref", ckpt_every=20, keep_last=0))
if dist.get_rank() == 0:
    shutil.copytree(root + "/ref/checkpoints/step_00000020", root + "/two/checkpoints/step_00000020")
dist.barrier()
run(make_config("tiny", **small, out=root + "/two", resume="auto"))
"""


def test_two_fsdp_processes_resume_and_resume_on_one_process(tmp_path):
    proc = torchrun(tmp_path, DRIVER, json.dumps({**SMALL, "steps": STEPS}), str(tmp_path))
    assert "resumed from" in proc.stdout
    want = metrics_rows(tmp_path / "ref")
    assert run_config(tmp_path / "ref")["world_size"] == 2
    assert_same_losses(metrics_rows(tmp_path / "two"), want[20:], tol=1e-6)
    # Saved by two ranks, resumed by one: DCP reshards the FSDP2 parameters and Adam moments.
    step20 = "checkpoints/step_00000020"
    shutil.copytree(tmp_path / "ref" / step20, tmp_path / "one" / step20)
    run(small(tmp_path / "one", steps=STEPS, resume=str(tmp_path / "one")))  # a run folder
    assert_same_losses(metrics_rows(tmp_path / "one"), want[20:], tol=1e-5)
