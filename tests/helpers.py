"""What the engine-side tests share (fixtures are in conftest.py): the repository root, a model small
enough that a run of a few steps takes about a second, readers of a run's outputs, the command-line
runners (engine/train.py, torchrun, ``python -m``), one relative-error check, and the independent
measurements some tests compare against (attention one document at a time, the bytes autograd saves).

The op tests keep their comparison rules in tests/op_cases.py (the fp64/fp32 relative error and Cut
Cross-Entropy's low-precision rule).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.checkpoint import list_checkpoints
from engine.config import TrainConfig, make_config
from engine.parallel import apply_activation_checkpointing
from engine.trainer import TrainState, build_state

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a run of a few steps takes about a second (the tiny preset is 4x wider).
TINY_SHAPE = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, seq_len=16)
# A whole run of it on synthetic data: 2 micro-batches of 2 per step, a log line per step.
SMALL = dict(data="synthetic", vocab_size=128, **TINY_SHAPE, batch_size=4, micro_batch_size=2, warmup_steps=4,
             log_every=1, steps=2)
# What the loop logs that two runs of the same schedule must agree on.
LOSS_KEYS = ("loss", "ce_loss", "nitp_loss", "grad_norm", "lr")


def small(out: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """The tiny preset with SMALL and `overrides`, writing to `out` (None: the config's default)."""
    out_field = {} if out is None else {"out": str(out)}
    return make_config("tiny", **{**SMALL, **overrides}, **out_field)


def cli_flags(fields: Mapping[str, Any]) -> list[str]:
    """Config fields as engine/train.py flags: {"seq_len": 16} -> ["--seq-len=16"]."""
    return [f"--{name.replace('_', '-')}={value}" for name, value in fields.items()]


@contextlib.contextmanager
def training_state(cfg: TrainConfig) -> Iterator[TrainState]:
    """build_state(cfg), closed on the way out (run directory released, process group left)."""
    state = build_state(cfg)
    try:
        yield state
    finally:
        state.close()


# --- a run's outputs ---------------------------------------------------------------------------------

def metrics_rows(out: str | os.PathLike) -> list[dict]:
    """Every record of `<out>/metrics.jsonl`, in order."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def run_config(out: str | os.PathLike) -> dict:
    """The run's `<out>/config.json`."""
    return json.loads((Path(out) / "config.json").read_text())


def steps_in(root: str | os.PathLike) -> list[int]:
    """Steps of the complete-looking checkpoints in a checkpoints folder."""
    return [s for s, _ in list_checkpoints(Path(root))]


def assert_same_losses(got: list[dict], want: list[dict], tol: float = 0.0) -> None:
    """The same steps, and every LOSS_KEYS value within `tol` (0: bitwise)."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for key in LOSS_KEYS:
            assert abs(g[key] - w[key]) <= tol, (g["step"], key, g[key], w[key])


# --- processes ------------------------------------------------------------------------------------------

TRAIN = "engine/train.py"
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")  # two CPU processes (gloo)
# One thread per process: the suite already runs a worker per core, and torchrun starts two processes.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_python(*args: str, env: Mapping[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python ARGS` in the repository root, output captured as text, one intra-op thread."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ONE_THREAD, **(env or {})})


def train_cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python engine/train.py ARGS`, as a user types it."""
    return run_python(TRAIN, *args, env=env, timeout=timeout)


def start_train(*args: str, stdout: int | None = subprocess.PIPE) -> subprocess.Popen:
    """engine/train.py in the background (stderr kept for the failure message)."""
    return subprocess.Popen([sys.executable, TRAIN, *args], cwd=REPO, env={**os.environ, **ONE_THREAD},
                            stdout=stdout, stderr=subprocess.PIPE, text=True)


def wait_until(condition: Callable[[], bool], seconds: float = 120) -> None:
    """Poll `condition` every 0.1 s until it holds or `seconds` pass (the caller asserts what it needs)."""
    deadline = time.time() + seconds
    while time.time() < deadline and not condition():
        time.sleep(0.1)


def succeeded(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`proc`, after asserting it exited 0 (the tail of its output as the message)."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


# Every torchrun driver starts in a gloo process group with the repository first on sys.path (the driver
# lives in tmp_path); its own arguments start at sys.argv[2].
_DRIVER_PRELUDE = """\
import json, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
dist.init_process_group("gloo")
"""


def torchrun(tmp_path: Path, driver: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `driver` (Python source) on two processes in one torchrun start; assert it succeeded."""
    script = tmp_path / "driver.py"
    # a barrier before leaving: a rank that destroys its group while a peer still works can abort gloo
    script.write_text(_DRIVER_PRELUDE + driver + "\ndist.barrier()\ndist.destroy_process_group()\n")
    return succeeded(run_python(*TORCHRUN, str(script), str(REPO), *args, timeout=timeout))


# --- numbers and measurements ------------------------------------------------------------------------

def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| over the tensor."""
    return (actual - expected).abs().max().item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """max |actual - expected| <= rel * max |expected|: a per-tensor relative error. An all-zero reference is
    refused: the comparison would be empty."""
    scale = expected.abs().max().item()
    err = max_abs_error(actual, expected)
    assert scale > 0, f"{what}: reference is all zeros, the comparison would be empty"
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:g} × {scale:.3e}"


def per_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """The truth for document-masked attention: causal SDPA run on each document alone (GQA by repeating
    k and v). q (B, H, T, D), k and v (B, H_kv, T, D), doc_ids (B, T); returns (B, T, H * D)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for d in doc_ids[b].unique():
            idx = (doc_ids[b] == d).nonzero().squeeze(1)
            out[b, :, idx] = F.scaled_dot_product_attention(q[b:b + 1, :, idx], k[b:b + 1, :, idx],
                                                            v[b:b + 1, :, idx], is_causal=True)[0]
    B, H, T, D = q.shape
    return out.transpose(1, 2).reshape(B, T, H * D)


def saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                           checkpointing: bool = False) -> int:
    """Measured: storage bytes autograd keeps from one forward of an unsharded model to its backward
    (parameters excluded), counted with saved-tensor hooks; what engine.plan's activations estimate.

    With checkpointing (applied here) a block keeps its input alive through the checkpoint, not
    through saved-tensor hooks, so block inputs are counted from forward pre-hooks.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    def keep_input(_module, args) -> None:
        pack(args[0])

    if checkpointing:
        apply_activation_checkpointing(model)
        for block in model.backbone.layers:
            block.register_forward_pre_hook(keep_input)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids, labels, aux_weight=1.0)
    return sum(kept.values())
