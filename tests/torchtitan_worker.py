"""torchtitan Trainer runs for tests/test_torchtitan.py (a script: torchtitan is slow to import, so each
launch does several checks and writes what the test asserts on into OUT).

    python tests/torchtitan_worker.py single OUT          # one process: stock vs λ=0, resume, export, reference
    torchrun --nproc-per-node 2 tests/torchtitan_worker.py parallel OUT   # dp=2 and tp=2 gradients

Every run is the llama3 debug model on CPU (SDPA, fp32, gloo) with the engine's synthetic corpus.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: E402
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


def build(config: object) -> object:
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
    grads = {clean(n): full(p.grad) for n, p in trainer.model_parts[0].named_parameters()}
    return {"loss": float(loss), "grads": grads}


def projector_state(trainer: object) -> dict:
    model = trainer.model_parts[0]
    weights = {n: full(p) for n, p in model.named_parameters() if "nitp_projector" in n}
    optimizer = trainer.optimizers.optimizers[0]
    moments = {}
    for name, param in model.named_parameters():
        if "nitp_projector" in name and optimizer.state[param]:  # empty before the first step
            state = optimizer.state[param]
            moments.update({f"{name}.{key}": full(state[key]) for key in ("exp_avg", "exp_avg_sq")})
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

    # 2. Reference gradients (dp=1) on a fixed batch, from saved weights the parallel runs load too.
    reference = build(make_config(out, nitp=True, sub="reference"))
    inputs, labels = fixed_batch()
    torch.save({clean(n): full(p) for n, p in reference.model_parts[0].named_parameters()}, out / "weights.pt")
    torch.save(gradients(reference, inputs, labels, int((labels != -100).sum())), out / "grads_dp1.pt")
    reference.close()

    # 3. Train 2 steps and checkpoint; a new Trainer resumes (projector and its Adam moments), trains a 3rd
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


def parallel(out: Path) -> None:
    dist.init_process_group("gloo")  # torchtitan's Trainers then reuse this process group
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs, labels = fixed_batch()
    n_valid = int((labels != -100).sum())
    weights = torch.load(out / "weights.pt")
    runs = {}
    for name, dp, tp in (("dp2", world, 1), ("tp2", 1, world)):
        batch = GLOBAL_BATCH // dp
        trainer = build(make_config(out, nitp=True, batch=batch, dp=dp, tp=tp, sub=name))
        load_weights(trainer.model_parts[0], weights)
        rows = slice(rank * batch, (rank + 1) * batch) if dp > 1 else slice(None)
        runs[name] = gradients(trainer, inputs[rows], labels[rows], n_valid)
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
