"""torchtitan Trainer runs for tests/test_torchtitan.py (a script: torchtitan is slow to import, so each
launch does several checks and writes what the test asserts on into OUT).

    python tests/torchtitan_worker.py single OUT      # one process: stock vs λ=0, resume, Hugging Face export
    torchrun --nproc-per-node 2 tests/torchtitan_worker.py parallel OUT   # dp=2 and tp=2 vs plain PyTorch

Every run is the llama3 debug model on CPU (SDPA, fp32, gloo) with the engine's synthetic corpus.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: E402
import torchtitan.trainer as trainer_module  # noqa: E402
from torchtitan.models.llama3.config_registry import llama3_debugmodel  # noqa: E402

from examples.titan_nitp import cpu_config  # noqa: E402
from nitp_kernels.integrations.torchtitan import nitp_trainer_config  # noqa: E402

SEQ_LEN, GLOBAL_BATCH, VOCAB = 64, 4, 2048


def make_config(out: Path, *, nitp: bool, nitp_weight: float = 1.0, steps: int = 1, batch: int = GLOBAL_BATCH,
                dp: int = 1, tp: int = 1, sub: str = "run") -> object:
    config = cpu_config(llama3_debugmodel(), data="synthetic", seq_len=SEQ_LEN, batch_size=batch, steps=steps)
    config.dataloader.cache_dir = config.tokenizer.cache_dir = str(out / "data-cache")
    config.dump_folder = str(out / sub)
    config.parallelism.data_parallel_shard_degree = dp
    config.parallelism.tensor_parallel_degree = tp
    config.metrics.log_freq = 1
    return nitp_trainer_config(config, nitp_weight=nitp_weight) if nitp else config


class _NoSleep:
    """time, without the 2 s sleep Trainer.train ends with (for other ranks; this worker waits on no one)."""

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


def build(config: object) -> object:
    trainer_module.time = _NoSleep()
    trainer = config.build()
    trainer.logged_losses = []
    log = trainer.metrics_processor.log

    def record(step, global_avg_loss, *args, **kwargs):  # the loss stock torchtitan logs for each step
        trainer.logged_losses.append(float(global_avg_loss))
        return log(step, global_avg_loss, *args, **kwargs)

    trainer.metrics_processor.log = record
    return trainer


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN + 1), generator=generator)
    labels = tokens[:, 1:].clone()
    labels[:, :5] = -100  # some ignored positions
    return tokens[:, :-1].contiguous(), labels


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


@torch.no_grad()
def load_weights(model: torch.nn.Module, weights: dict) -> None:
    """Copy full tensors into a (possibly sharded) model, so every layout starts from the same weights."""
    for name, param in model.named_parameters():
        value = weights[clean(name)]
        if isinstance(param, DTensor):
            value = distribute_tensor(value, param.device_mesh, param.placements).to_local()
            param = param.to_local()
        param.copy_(value)


def gradients(trainer: object, inputs: torch.Tensor, labels: torch.Tensor, n_valid: int) -> dict:
    """One forward/backward of the Trainer on this rank's batch; the full (gathered) gradient of each parameter."""
    loss = trainer.forward_backward_step(input_dict={"input": inputs}, labels=labels,
                                         global_valid_tokens=torch.tensor(n_valid))
    named = list(trainer.model_parts[0].named_parameters())
    grads = {clean(n): full(p.grad) for n, p in named}
    activation_checkpointing = any("_checkpoint_wrapped_module" in n for n, _ in named)
    return {"loss": float(loss), "grads": grads, "activation_checkpointing": activation_checkpointing}


def projector_state(trainer: object) -> dict:
    """The projector's weights and Adam moments (exp_avg, exp_avg_sq; none before the first step), by name."""
    model = trainer.model_parts[0]
    weights = {clean(n): full(p) for n, p in model.named_parameters() if "nitp_projector" in n}
    optimizer_state = trainer.optimizers.state_dict()  # flattened, keyed by parameter name
    moments = {key: full(value) for key, value in optimizer_state.items()
               if key.startswith("state.nitp_projector.") and key.endswith(("exp_avg", "exp_avg_sq"))}
    return {"weights": weights, "moments": moments}


def single(out: Path) -> None:
    results: dict = {}
    # 1. Step 1 of stock torchtitan vs NITP with λ = 0 (same seed, same data).
    stock = build(make_config(out, nitp=False, sub="stock"))
    stock.train()
    stock.close()
    zero = build(make_config(out, nitp=True, nitp_weight=0.0, sub="zero"))
    zero.train()
    zero.close()
    results["stock_step1"] = stock.logged_losses[0]
    results["zero_step1"] = zero.logged_losses[0]
    results["zero_step1_ce"] = zero.nitp_history[0]["ce"]

    # 2. Train 2 steps and checkpoint; a new Trainer resumes (projector and its Adam moments), trains a 3rd
    #    step and exports to Hugging Face safetensors (model only) through the state-dict adapter.
    config = make_config(out, nitp=True, steps=2, sub="ckpt")
    config.checkpoint.enable, config.checkpoint.interval = True, 2
    first = build(config)
    first.train()
    saved = projector_state(first)
    first.close()
    config = make_config(out, nitp=True, steps=3, sub="ckpt")
    config.checkpoint.enable, config.checkpoint.interval = True, 2
    config.checkpoint.last_save_model_only, config.checkpoint.last_save_in_hf = True, True
    second = build(config)
    fresh = projector_state(second)["weights"]
    second.checkpointer.load(step=-1)
    torch.save({"saved": saved, "fresh": fresh, "loaded": projector_state(second)}, out / "resume.pt")
    second.train()
    inputs, _ = fixed_batch()
    model = second.model_parts[0]
    model._skip_lm_head = False
    with torch.no_grad():
        logits = model(inputs)
    torch.save({"inputs": inputs, "logits": full(logits)}, out / "logits.pt")
    model_config = second.model_config
    attention = model_config.layers[0].attention
    rope = attention.rope
    results["hf_config"] = {
        "vocab_size": model_config.vocab_size, "hidden_size": model_config.dim,
        "num_hidden_layers": len(model_config.layers), "num_attention_heads": attention.n_heads,
        "num_key_value_heads": attention.n_kv_heads or attention.n_heads,
        "intermediate_size": int(model.layers["0"].feed_forward.w1.weight.shape[0]),
        "rms_norm_eps": model_config.norm.eps, "tie_word_embeddings": False,
        "rope_theta": rope.theta, "max_position_embeddings": rope.max_seq_len,
        "rope_scaling": {"rope_type": "llama3", "factor": rope.scaling_factor,
                         "low_freq_factor": rope.low_freq_factor, "high_freq_factor": rope.high_freq_factor,
                         "original_max_position_embeddings": rope.original_max_position_embeddings}}
    results["export_dir"] = str(Path(second.config.dump_folder) / second.config.checkpoint.folder / "step-3")
    second.close()
    (out / "single.json").write_text(json.dumps(results))


def reference_gradients(out: Path, inputs: torch.Tensor, labels: torch.Tensor, n_valid: int) -> dict:
    """The model unsharded, outside any Trainer: "hand" = CE and the cosine NITP loss written out in plain
    PyTorch (logits built, no fused op); "dp1" = NITPLoss on it (the fused op, as one data-parallel rank runs it)."""
    config = make_config(out, nitp=True, sub="reference")
    model_config = config.model_spec.model
    model_config.update_from_config(config=config)
    torch.manual_seed(0)
    model = model_config.build()
    model.init_weights()
    model._skip_lm_head = True
    named = list(model.named_parameters())
    runs = {"weights": {clean(n): p.detach().clone() for n, p in named}}
    if dist.is_initialized() and dist.get_rank() != 0:
        return runs  # every rank needs the weights; only rank 0 reports the reference gradients

    hidden, shallow, (w_gate, w_up, w_down) = model(inputs)
    logits = F.linear(hidden, model.lm_head.weight)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
    predicted = F.linear(F.silu(F.linear(hidden, w_gate)) * F.linear(hidden, w_up), w_down)[:, :-1]
    target = shallow.detach()[:, 1:]  # hidden_states[k] at t + 1, stop-gradient
    cosine = (predicted * target).sum(-1) / (predicted.norm(dim=-1).clamp_min(1e-6)
                                            * target.norm(dim=-1).clamp_min(1e-6))
    nitp = ((1 - cosine) * (labels[:, :-1] != -100)).sum()
    loss = (ce + nitp) / n_valid
    loss.backward()
    runs["hand"] = {"loss": float(loss), "grads": {clean(n): p.grad.clone() for n, p in named}}

    model.zero_grad(set_to_none=True)
    loss_fn = config.loss.build()
    loss_fn.set_lm_head(model.lm_head)
    loss, _ = loss_fn(model(inputs), labels, torch.tensor(n_valid))
    loss.backward()
    runs["dp1"] = {"loss": float(loss), "grads": {clean(n): p.grad.clone() for n, p in named}}
    return runs


def parallel(out: Path) -> None:
    dist.init_process_group("gloo")  # torchtitan's Trainers then reuse this process group
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs, labels = fixed_batch()
    n_valid = int((labels != -100).sum())
    runs = reference_gradients(out, inputs, labels, n_valid)
    weights = runs.pop("weights")
    for name, dp, tp in (("dp2", world, 1), ("tp2", 1, world)):
        batch = GLOBAL_BATCH // dp
        trainer = build(make_config(out, nitp=True, batch=batch, dp=dp, tp=tp, sub=name))
        load_weights(trainer.model_parts[0], weights)
        rows = slice(rank * batch, (rank + 1) * batch) if dp > 1 else slice(None)
        runs[name] = gradients(trainer, inputs[rows], labels[rows], n_valid)
        if dp > 1:  # each rank returns its share of the loss (its sum over the global count)
            total = torch.tensor(runs[name]["loss"], dtype=torch.float64)
            dist.all_reduce(total)
            runs[name]["loss"] = float(total)
        trainer.close()
    if rank == 0:
        torch.save(runs, out / "grads_parallel.pt")


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    torch.set_num_threads(1)
    {"single": single, "parallel": parallel}[mode](out)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
