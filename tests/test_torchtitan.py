"""NITP on torchtitan 0.3.0, on CPU (gloo): stock equality at λ=0, dp=2 and tp=2 gradients, resume, export.

The Trainer runs happen in tests/torchtitan_worker.py (one launch per test: torchtitan takes seconds to import).
torchtitan 0.3.0 needs Python >= 3.11; there, it is part of `make test`'s set-up and these tests must run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "torchtitan_worker.py"
needs_torchtitan = pytest.mark.skipif(sys.version_info < (3, 11),
                                      reason="torchtitan 0.3.0 requires Python >= 3.11")


def run_worker(*command: str, timeout: int = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def test_import_nitp_kernels_does_not_import_torchtitan():
    code = ("import sys, nitp_kernels, nitp_kernels.integrations, nitp_kernels.integrations.hf; "
            "assert 'torchtitan' not in sys.modules, 'torchtitan was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]


@needs_torchtitan
def test_one_process_stock_equality_resume_and_export(tmp_path):
    run_worker(str(WORKER), "single", str(tmp_path))
    results = json.loads((tmp_path / "single.json").read_text())

    # nitp_weight = 0: step 1 is stock torchtitan's (same seed, same data), and CE alone.
    stock = results["stock_step1"]
    assert abs(results["zero_step1"] - stock) <= 1e-6 * abs(stock)
    assert abs(results["zero_step1_ce"] - stock) <= 1e-6 * abs(stock)

    # Resume restores the projector and its Adam moments exactly (a fresh model's projector differs).
    resume = torch.load(tmp_path / "resume.pt")
    saved, loaded = resume["saved"], resume["loaded"]
    assert sorted(saved["weights"]) == ["nitp_projector.w_down", "nitp_projector.w_gate", "nitp_projector.w_up"]
    assert len(saved["moments"]) == 6
    for name, value in saved["weights"].items():
        assert not torch.equal(resume["fresh"][name], value)
        assert torch.equal(loaded["weights"][name], value)
    for name, value in saved["moments"].items():
        assert torch.equal(loaded["moments"][name], value), name

    # The Hugging Face export (torchtitan's own last_save_in_hf) has no projector and loads in transformers,
    # giving torchtitan's logits.
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    export = Path(results["export_dir"])
    state = {}
    for file in export.glob("*.safetensors"):
        state.update(load_file(str(file)))
    assert state and not any("nitp" in key for key in state)
    model = LlamaForCausalLM(LlamaConfig(**results["hf_config"])).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in key for key in missing), (missing, unexpected)
    expected = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        logits = model(expected["inputs"]).logits
    assert relative_error(logits, expected["logits"]) < 1e-4


@needs_torchtitan
def test_two_processes_data_and_tensor_parallel_gradients_equal_one_process(tmp_path):
    run_worker("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), "parallel",
               str(tmp_path))
    runs = torch.load(tmp_path / "grads_parallel.pt")
    one = runs["dp1"]
    # The fused op on one unsharded model against CE + cosine NITP written out in plain PyTorch.
    assert abs(one["loss"] - runs["hand"]["loss"]) <= 1e-6 * abs(one["loss"])
    assert set(one["grads"]) == set(runs["hand"]["grads"])
    for name, grad in runs["hand"]["grads"].items():
        assert relative_error(one["grads"][name], grad) < 1e-5, name
    # FSDP over 2 ranks, and tensor parallel over 2 (projector replicated, vocab-sharded LM head gathered),
    # both with the debug config's activation checkpointing on the blocks.
    for layout in ("dp2", "tp2"):
        run = runs[layout]
        assert run["activation_checkpointing"], layout
        assert abs(run["loss"] - one["loss"]) <= 1e-6 * abs(one["loss"]), layout
        assert set(run["grads"]) == set(one["grads"]) and any("nitp_projector" in n for n in one["grads"])
        for name, grad in one["grads"].items():
            assert relative_error(run["grads"][name], grad) < 1e-6, (layout, name)
