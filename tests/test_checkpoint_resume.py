"""Exact resume: a 40-step run against runs stopped (SIGTERM), killed (SIGKILL) or moved to another
world size at step 20 and resumed to 40; incomplete and corrupt checkpoints are skipped."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from engine.checkpoint import MARKER, list_checkpoints, validate_checkpoint
from engine.checkpoint.layout import describe_files
from engine.config import make_config
from engine.trainer import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Smaller than the tiny preset so that 40 steps take a second or two.
SMALL = dict(data="synthetic", vocab_size=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, seq_len=16,
             batch_size=4, micro_batch_size=2, warmup_steps=4, log_every=1, steps=40)
KEYS = ("loss", "ce_loss", "nitp_loss", "grad_norm", "lr")


def flags(**kw):
    out = []
    for k, v in {**SMALL, **kw}.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out



def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def steps_of(out):
    return [s for s, _ in list_checkpoints(__import__("pathlib").Path(out) / "checkpoints")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 40-step run that also saves every 10 steps, keeping the last 2."""
    out = str(tmp_path_factory.mktemp("reference"))
    torch.set_num_threads(1)
    run(make_config("tiny", **SMALL, out=out, ckpt_every=10, keep_last=2))
    assert steps_of(out) == [30, 40]
    return rows(out)


def assert_same(got, want, tol=0.0):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for key in KEYS:
            assert abs(g[key] - w[key]) <= tol, (g["step"], key, g[key], w[key])


def test_sigterm_at_step_20_then_resume_is_bitwise_identical(reference, tmp_path, monkeypatch, capsys):
    out = str(tmp_path)
    monkeypatch.setenv("NITP_DEBUG_SIGNAL_AT_STEP", "20:TERM")  # the process signals itself
    run(make_config("tiny", **SMALL, out=out))
    assert "received SIGTERM: saved a checkpoint at step 20" in capsys.readouterr().out
    assert steps_of(out) == [20] and len(rows(out)) == 20
    monkeypatch.delenv("NITP_DEBUG_SIGNAL_AT_STEP")
    # The resumed half saves asynchronously; the run finalises its last save before returning.
    run(make_config("tiny", **SMALL, out=out, resume="auto", ckpt_every=10, async_ckpt=True))
    assert "resumed from" in capsys.readouterr().out
    assert_same(rows(out), reference)
    assert steps_of(out) == [30, 40] and validate_checkpoint(tmp_path / "checkpoints" / "step_00000040")["step"] == 40


def test_sigkill_after_checkpoint_then_resume_skips_broken_checkpoints(reference, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NITP_DEBUG_SIGNAL_AT_STEP": "20:KILL"}
    proc = subprocess.run([sys.executable, "engine/train.py", *flags(ckpt_every=10, out=tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert steps_of(tmp_path) == [10, 20]
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
        run(make_config("tiny", **SMALL, out=str(tmp_path), resume="auto"))
    assert_same(rows(tmp_path), reference)  # across processes too: bitwise
    # The skipped save is moved aside (never deleted), so keep_last=2 keeps two good ones: 20 and 40;
    # the interrupted .tmp save (never complete) is removed.
    assert steps_of(tmp_path) == [20, 40]
    assert [p.name for p in (root / "superseded").glob("*/*")] == ["step_00000025"]
    assert not list(root.glob("*.tmp"))


# Under torchrun: one 40-step reference run that saves at step 20, then a fresh TrainState in the same
# two processes resumed from a copy of that checkpoint (one torchrun start instead of two).
DRIVER = """
import json, shutil, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
dist.init_process_group("gloo")
from engine.config import make_config
from engine.trainer import run
small, root = json.loads(sys.argv[2]), sys.argv[3]
run(make_config("tiny", **small, out=root + "/ref", ckpt_every=20, keep_last=0))
if dist.get_rank() == 0:
    shutil.copytree(root + "/ref/checkpoints/step_00000020", root + "/two/checkpoints/step_00000020")
dist.barrier()
run(make_config("tiny", **small, out=root + "/two", resume="auto"))
dist.destroy_process_group()
"""


def test_two_fsdp_processes_resume_and_resume_on_one_process(tmp_path):
    (tmp_path / "driver.py").write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "driver.py"), REPO, json.dumps(SMALL), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "resumed from" in proc.stdout
    want = rows(tmp_path / "ref")
    assert json.loads((tmp_path / "ref" / "config.json").read_text())["world_size"] == 2
    assert_same(rows(tmp_path / "two"), want[20:], tol=1e-6)
    # Saved by two ranks, resumed by one: DCP reshards the FSDP2 parameters and Adam moments.
    step20 = "checkpoints/step_00000020"
    shutil.copytree(tmp_path / "ref" / step20, tmp_path / "one" / step20)
    run(make_config("tiny", **SMALL, out=str(tmp_path / "one"), resume=str(tmp_path / "one")))  # a run folder
    assert_same(rows(tmp_path / "one"), want[20:], tol=1e-5)
