"""Memory and throughput plan of a preset on G GPUs: does it fit, and what to change if not.

    python -m engine.plan --preset moe-9b-a1b --gpus 8
    python -m engine.plan --preset dense-3b --gpus 16 --gpu-mem-gib 80 --activation-checkpointing false

Per GPU, under the engine's FSDP2 layout (engine/parallel.py), counted from the model's real
parameter shapes (built on the meta device, so nothing is allocated):

- parameters: fp32 master weights, 1/G of every parameter (dim 0 padded to a multiple of G);
- gradients: fp32, sharded the same way (reduce-scattered);
- optimizer: AdamW's two fp32 moments, sharded the same way;
- activations of one micro-batch: the tensors autograd saves, counted op by op for the kernels
  the engine runs (``kernels="cuda"``: Liger RMSNorm/RoPE/SwiGLU and flash attention in the
  compute dtype; ``kernels="cpu"``: the plain PyTorch forms in fp32), plus the fused loss's
  saved gradient buffers (d hidden, d lm_weight, the projector's weight gradients). With
  activation checkpointing only each block's input is kept, and backward recomputes one block
  at a time (``recompute_bytes``);
- the fused loss's transient memory: one chunk's logits and projector activations;
- FSDP2's transient memory: two blocks' unsharded parameters in the compute dtype (the current
  one and the prefetched next), the output module's (kept unsharded from forward to backward)
  and one block's unsharded fp32 gradients before the reduce-scatter.

The CPU forms are verified against what the engine holds (tests/test_plan.py, tensor storage
counted after a step and with saved-tensor hooks); the CUDA forms are estimates from the kernels'
saved tensors. The fit uses ``usable_fraction`` of the GPU's memory (the rest is left for the
CUDA context, NCCL buffers and allocator fragmentation).

Expert parallelism is not implemented: every MoE expert is FSDP-sharded like any weight, so each
GPU holds 1/G of all experts and all-gathers every expert of a layer for its forward and
backward (the "FSDP transient" line of an MoE preset shows that cost).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from engine.config import PRESETS, TrainConfig, _parse_bool, make_config, resolve_micro_batch_size, validate
from engine.flops import training_flops_per_token
from engine.model import NITPTransformer
from engine.parallel import apply_activation_checkpointing
from nitp_kernels.chunked import default_chunk_size

GIB = 2 ** 30
ADAMW_STATES = 2
DEFAULT_PEAK_TFLOPS = 989.5  # H100/H200 dense bf16
KERNELS = ("cuda", "cpu")


@dataclass
class Plan:
    """Bytes per GPU of each component, and throughput at the given MFU."""

    cfg: TrainConfig
    gpus: int
    micro_batch: int
    activation_checkpointing: bool
    params: int
    grads: int
    optimizer: int
    activations: int            # kept from forward to backward (without checkpointing)
    activations_ac: int         # kept with activation checkpointing
    recompute: int              # one block recomputed in backward (checkpointing only)
    loss_transient: int
    fsdp_transient: int
    gpu_bytes: int
    usable_fraction: float
    tokens_per_s: float | None  # per GPU
    mfu: float

    @property
    def kept_activations(self) -> int:
        return (self.activations_ac + self.recompute) if self.activation_checkpointing else self.activations

    @property
    def total(self) -> int:
        return (self.params + self.grads + self.optimizer + self.kept_activations + self.loss_transient
                + self.fsdp_transient)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable_fraction * self.gpu_bytes


def _shapes(cfg: TrainConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = NITPTransformer(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _sharded_numel(shape: tuple[int, ...], gpus: int) -> int:
    """Elements of the largest shard: FSDP2 splits dim 0 into chunks of ceil(dim0 / G)."""
    return math.ceil(shape[0] / gpus) * math.prod(shape[1:])


def block_activation_bytes(cfg: TrainConfig, tokens: int, moe: bool, kernels: str, elem: int) -> int:
    """Bytes one block saves for backward at `tokens` tokens, its input included."""
    n, d, h, F = tokens, cfg.d_model, cfg.n_heads, cfg.ffn_hidden
    kv = cfg.n_kv_heads * cfg.head_dim
    # each norm: its input, its output (saved by the next matmul), fp32 rstd, and in the plain
    # form also the normalised y (the weight's gradient needs it; Liger recomputes it)
    norm = n * d * (2 if kernels == "cuda" else 3) * elem + n * 4
    attention = n * (d + 2 * kv + d) * elem + n * h * 4  # q, k, v after RoPE, output, fp32 logsumexp
    per_swiglu = 3 if kernels == "cuda" else 4  # Liger recomputes silu(gate) in backward
    total = 2 * norm + attention
    if not moe:
        return total + per_swiglu * n * F * elem
    k, E, he = cfg.moe_top_k, cfg.n_experts, cfg.moe_ffn_hidden
    hs = cfg.n_shared_experts * cfg.shared_ffn_hidden
    total += 2 * n * k * d * elem          # token copies sorted by expert; expert outputs before combining
    total += 4 * n * k * he * elem          # routed SwiGLU: gate, silu, up, product (loop and grouped GEMM)
    total += per_swiglu * n * hs * elem     # shared experts
    total += 4 * n * E + 28 * n * k + 8 * E  # router probabilities, top-k weights and indices, balance terms
    return total


def output_activation_bytes(cfg: TrainConfig, tokens: int, kernels: str, elem: int) -> int:
    """The final norm's saved tensors and the fused loss's saved gradient buffers (+ embedding ids)."""
    n, d, V = tokens, cfg.d_model, cfg.vocab_size
    norm = n * d * (1 if kernels == "cuda" else 2) * elem + n * 4     # last residual stream, (y), rstd
    grad_hidden = n * d * 4  # the op's gradient buffers are in the accumulation dtype, fp32
    grad_shallow = n * d * 4 if (cfg.objective == "nitp" and not cfg.nitp_stop_gradient) else 0
    projector = 3 * d * cfg.nitp_projector_mult * d * 4 if (cfg.objective == "nitp" and cfg.nitp_projector) else 0
    rope = 2 * cfg.seq_len * cfg.head_dim * 4
    return norm + grad_hidden + grad_shallow + V * d * 4 + projector + n * 8 + rope


def saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                           checkpointing: bool = False) -> int:
    """Measured: storage bytes autograd keeps from one forward of an unsharded model to its backward
    (parameters excluded), counted with saved-tensor hooks; what the plan's activations estimate.

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


def make_plan(cfg: TrainConfig, gpus: int, *, gpu_mem_gib: float = 80.0, micro_batch: int | None = None,
              activation_checkpointing: bool | None = None, kernels: str = "cuda", mfu: float = 0.4,
              peak_tflops: float | None = DEFAULT_PEAK_TFLOPS, usable_fraction: float = 0.9) -> Plan:
    """The plan of cfg on `gpus` GPUs (see the module docstring)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    validate(cfg, gpus)
    micro = micro_batch or resolve_micro_batch_size(cfg, gpus)
    ac = cfg.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    elem = 2 if kernels == "cuda" else 4  # bf16 compute on CUDA, fp32 on CPU
    shapes = _shapes(cfg)
    shard = sum(_sharded_numel(s, gpus) for s in shapes.values())
    tokens = micro * cfg.seq_len
    blocks = [block_activation_bytes(cfg, tokens, cfg.is_moe and i >= cfg.n_dense_layers, kernels, elem)
              for i in range(cfg.n_layers)]
    output = output_activation_bytes(cfg, tokens, kernels, elem)
    block_inputs = cfg.n_layers * tokens * cfg.d_model * elem
    rows = min(default_chunk_size(tokens, cfg.d_model, cfg.vocab_size), tokens)
    loss_transient = rows * (cfg.vocab_size + 3 * cfg.nitp_projector_mult * cfg.d_model) * 4
    block_params = max(sum(math.prod(s) for n, s in shapes.items() if n.startswith(f"backbone.layers.{i}."))
                       for i in range(cfg.n_layers))
    output_params = sum(math.prod(s) for n, s in shapes.items() if n.startswith("output."))
    fsdp = (2 * block_params + output_params) * elem + block_params * 4
    peak = peak_tflops * 1e12 if peak_tflops else None
    tokens_per_s = mfu * peak / training_flops_per_token(cfg) if peak else None
    return Plan(cfg, gpus, micro, ac, 4 * shard, 4 * shard, 4 * ADAMW_STATES * shard, sum(blocks) + output,
                block_inputs + output, max(blocks), loss_transient, fsdp, int(gpu_mem_gib * GIB),
                usable_fraction, tokens_per_s, mfu)


def advice(plan: Plan, **kwargs) -> list[str]:
    """What to change when the plan does not fit: checkpointing, micro-batch, more GPUs."""
    if plan.fits:
        return []
    cfg, tips = plan.cfg, []
    if not plan.activation_checkpointing and make_plan(cfg, plan.gpus, micro_batch=plan.micro_batch,
                                                       activation_checkpointing=True, **kwargs).fits:
        tips.append("turn on activation checkpointing (--activation-checkpointing)")
    per_rank = cfg.batch_size // plan.gpus
    for micro in range(plan.micro_batch - 1, 0, -1):
        if per_rank % micro == 0 and make_plan(cfg, plan.gpus, micro_batch=micro,
                                               activation_checkpointing=plan.activation_checkpointing,
                                               **kwargs).fits:
            tips.append(f"use --micro-batch-size {micro} (gradient accumulation keeps the batch)")
            break
    for gpus in range(plan.gpus + 1, min(cfg.batch_size, 4096) + 1):
        if cfg.batch_size % gpus == 0 and make_plan(cfg, gpus, micro_batch=1, activation_checkpointing=True,
                                                    **kwargs).fits:
            tips.append(f"use {gpus} GPUs (fits with micro-batch 1 and activation checkpointing)")
            break
    else:
        tips.append("no GPU count that divides the batch fits: shorten --seq-len or use larger GPUs")
    return tips


def report(plan: Plan, **kwargs) -> str:
    cfg = plan.cfg

    def row(label: str, nbytes: int, note: str = "") -> str:
        return f"  {label:<36}{nbytes / GIB:9.2f} GiB{note}"

    ac_line = ("on: block inputs kept, one block recomputed at a time" if plan.activation_checkpointing
               else "off")
    usable = int(plan.usable_fraction * plan.gpu_bytes)
    lines = [
        f"preset {cfg.preset} on {plan.gpus} GPU(s) of {plan.gpu_bytes / GIB:.0f} GiB: global batch "
        f"{cfg.batch_size} x {cfg.seq_len} tokens, micro-batch {plan.micro_batch} per GPU, "
        f"{cfg.batch_size // (plan.micro_batch * plan.gpus)} accumulation step(s); activation checkpointing {ac_line}",
        "per GPU (estimates from the model's shapes; see engine/plan.py):",
        row(f"parameters (fp32, 1/{plan.gpus})", plan.params),
        row(f"gradients (fp32, 1/{plan.gpus})", plan.grads),
        row(f"optimizer states (AdamW, fp32, 1/{plan.gpus})", plan.optimizer),
        row("activations without checkpointing", plan.activations),
        row("activations with checkpointing", plan.activations_ac + plan.recompute,
            f"  (kept {plan.activations_ac / GIB:.2f} + one block recomputed {plan.recompute / GIB:.2f})"),
        row("fused loss transient", plan.loss_transient),
        row("FSDP transient (unsharded blocks)", plan.fsdp_transient),
        row("total", plan.total, f"  of {usable / GIB:.2f} GiB usable ({plan.usable_fraction:.0%}): "
                                 f"{'FITS' if plan.fits else 'DOES NOT FIT'}"),
    ]
    if cfg.is_moe:
        lines.append(f"  MoE: no expert parallelism: each GPU holds 1/{plan.gpus} of all {cfg.n_experts} experts "
                     "of every layer and all-gathers all of them per layer (in the FSDP transient line)")
    if plan.tokens_per_s:
        total = plan.tokens_per_s * plan.gpus
        lines.append(f"throughput at {plan.mfu:.0%} MFU of {kwargs.get('peak_tflops') or DEFAULT_PEAK_TFLOPS:g} "
                     f"TFLOP/s: {plan.tokens_per_s:,.0f} tokens/s per GPU, {total:,.0f} in all, "
                     f"{cfg.batch_size * cfg.seq_len / total:.1f} s per optimizer step")
    lines += [f"to fit: {tip}" for tip in advice(plan, **kwargs)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Per-GPU memory and throughput plan of a preset.")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0)
    parser.add_argument("--activation-checkpointing", nargs="?", const=True, type=_parse_bool, default=None,
                        metavar="BOOL", help="default: the preset's setting")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: auto")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS)
    args = parser.parse_args(argv)
    try:
        cfg = make_config(args.preset, **({"seq_len": args.seq_len} if args.seq_len else {}))
        kwargs = dict(gpu_mem_gib=args.gpu_mem_gib, mfu=args.mfu, peak_tflops=args.peak_tflops)
        plan = make_plan(cfg, args.gpus, micro_batch=args.micro_batch_size,
                         activation_checkpointing=args.activation_checkpointing, **kwargs)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(report(plan, **kwargs))


if __name__ == "__main__":
    main()
