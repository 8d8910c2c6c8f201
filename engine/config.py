"""One dataclass holds every knob of a training run; named presets fill it in.

Resolution order: dataclass defaults < preset < explicit overrides (Python keyword arguments or
``--field value`` on the command line). ``validate`` refuses inconsistent values with one clear
message before any work starts (a ValueError from Python; the CLI turns it into SystemExit).

Presets: ``tiny`` / ``tiny-moe`` run on a CPU in seconds per step; the others are the paper's
Table 4: AdamW (0.9, 0.95), wd 0.1, clip 1.0, WSD with 2000 warmup steps and decay ratio 0.2,
context 8192, Qwen2 vocabulary (152064), and each model's NITP layer and λ.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from engine.cli import TRACEBACK_HELP, OneLineArgumentParser, cli_errors

OBJECTIVES = ("nitp", "ntp", "cosreg")
# The op's vocabularies (nitp_kernels.contract), repeated so that parsing flags imports no torch;
# tests/test_engine_config.py holds them equal.
NITP_LOSS_TYPES = ("cosine", "mse", "smooth_l1", "kl")
BACKENDS = ("auto", "reference", "torch", "triton")
DEVICES = ("auto", "cpu", "cuda")
PARAM_DTYPES = ("auto", "fp32", "bf16")


def parse_micro_batch(text: str) -> int | str:
    """--micro-batch-size: "auto" or a positive integer."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:  # argparse prints an ArgumentTypeError's message as it is
        import argparse
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def parse_eval_batches(text: str) -> int | str:
    """--eval-batches: a positive integer or "all" (the whole validation split)."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        import argparse
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


@dataclass
class TrainConfig:
    """A complete, resolved description of one training run (see module docstring)."""

    preset: str = "tiny"
    # --- model ---
    vocab_size: int = 8192
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 384          # dense SwiGLU hidden width
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02         # normal(0, std); residual output projections get std/sqrt(2L)
    # --- mixture of experts (n_experts = 0: dense model) ---
    n_experts: int = 0             # routed experts per MoE layer
    moe_top_k: int = 0             # routed experts per token
    n_shared_experts: int = 0
    moe_ffn_hidden: int = 0        # hidden width of each routed expert
    shared_ffn_hidden: int = 0     # hidden width of each shared expert
    n_dense_layers: int = 0        # the first blocks use a dense MLP (DeepSeek-V2 style)
    moe_aux_weight: float = 0.003  # load-balancing loss weight (DeepSeek-V2's expert-level α1)
    # --- objective ---
    objective: str = "nitp"        # nitp | ntp | cosreg
    nitp_layer: int = 1            # target hidden_states[k]; 0 = embeddings
    nitp_weight: float = 1.0       # λ (also the cosreg penalty weight)
    nitp_shift: int = 1            # 1: next token (paper); 0: same position (ablation)
    nitp_loss_type: str = "cosine"
    nitp_stop_gradient: bool = True
    nitp_projector: bool = True    # False: projector-free ablation (P = identity)
    nitp_projector_mult: int = 4   # projector hidden width = mult * d_model
    nitp_start_step: int = 0       # before this step λ = 0 and the plain NTP op runs
    z_loss_weight: float = 0.0
    backend: str = "auto"          # nitp_kernels backend
    loss_chunk_size: int | None = None  # rows per chunk of the fused loss; None = the op's rule
    # --- optimisation ---
    steps: int = 250               # 0: build model, optimizer and data, write config.json, exit
    batch_size: int = 4            # global sequences per optimizer step
    # sequences per rank per forward: an int, or "auto" = the largest value <= max_micro_batch_size
    # that divides batch_size / world_size (gradient accumulation takes the rest)
    micro_batch_size: int | str = field(default="auto", metadata={"parse": parse_micro_batch})
    max_micro_batch_size: int = 4  # the preset's memory-safe micro-batch: the cap of "auto"
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.0      # lr at the end of the decay phase, relative to lr
    warmup_steps: int = 30
    decay_ratio: float = 0.2       # WSD: fraction of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    # --- data (read by engine.data) ---
    data: str = "stdlib"           # the built-in corpus: this Python's standard library source
    text_field: str = "text"
    tokenizer: str | None = None
    doc_mask: bool = False
    eval_every: int = 0
    # validation micro-batches per evaluation, over all ranks, or "all": the whole validation split
    eval_batches: int | str = field(default=4, metadata={"parse": parse_eval_batches})
    # the run's last evaluation (at --steps) also logs val_ce_full, CE over the whole validation split:
    # a few batches rank runs by chance, the full split can rank them (costs one pass over the split)
    eval_full_at_end: bool = True
    geometry_every: int = 0        # effective rank / avg cosine / grad-norm ratio every N steps (0: off)
    geometry_tokens: int = 1024    # size of the fixed token sample they are measured on
    val_fraction: float = 0.01
    data_cache_dir: str = ".cache/nitp-data"
    # --- system ---
    device: str = "auto"           # auto = cuda when available
    param_dtype: str = "auto"      # auto = bf16 compute (fp32 master, fp32 reduce) on CUDA, fp32 on CPU
    activation_checkpointing: bool = False
    compile: bool = False          # torch.compile each block
    # --- logging ---
    out: str = "runs/nitp"
    log_every: int = 10
    peak_tflops: float | None = None  # per device, for MFU; None = known GPUs only (else mfu null)
    # --- checkpoints and faults (engine/checkpoint.py) ---
    ckpt_every: int = 0            # save every N steps (0: only at the end of the run)
    resume: str | None = None      # "auto" (newest complete checkpoint in --out) or a path
    keep_last: int = 2             # complete checkpoints kept (0: all)
    max_bad_steps: int = 5         # stop after this many consecutive non-finite steps (0: never)
    async_ckpt: bool = False       # dcp.async_save: training continues while the files are written
    overwrite: bool = False        # an earlier run in --out is moved to <out>/previous/ (engine/run_dir.py)
    init_from_hf: str | None = None  # start from a Hugging Face checkpoint folder (engine/model/hf_adapter.py)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PAPER_RECIPE = dict(warmup_steps=2000, decay_ratio=0.2, weight_decay=0.1, beta1=0.9, beta2=0.95,
                     grad_clip=1.0, seq_len=8192, max_micro_batch_size=1, vocab_size=152064,
                     rope_theta=1e6, log_every=10, activation_checkpointing=True)
_PAPER_MOE = dict(n_heads=8, n_kv_heads=4, ffn_hidden=10944, n_experts=144, moe_top_k=8,
                  n_shared_experts=1, n_dense_layers=1)


def _steps(tokens: float, batch: int) -> int:
    """Optimizer steps for the paper's token budget (context 8192)."""
    return round(tokens / (batch * 8192))


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(),
    "tiny-moe": dict(n_experts=8, moe_top_k=2, n_shared_experts=1, moe_ffn_hidden=96,
                     shared_ffn_hidden=96, n_dense_layers=1, warmup_steps=20, lr=2e-3),
    "moe-1.9b-a0.3b": {**_PAPER_RECIPE, **_PAPER_MOE, **dict(
        d_model=512, n_layers=16, moe_ffn_hidden=496, shared_ffn_hidden=496, nitp_layer=3,
        nitp_weight=1.0, lr=6.0e-4, batch_size=256, steps=_steps(105e9, 256))},
    "moe-3b-a0.5b": {**_PAPER_RECIPE, **_PAPER_MOE, **dict(
        d_model=768, n_layers=17, moe_ffn_hidden=544, shared_ffn_hidden=544, nitp_layer=4,
        nitp_weight=1.0, lr=8.7e-4, batch_size=512, steps=_steps(200e9, 512))},
    "moe-9b-a1b": {**_PAPER_RECIPE, **_PAPER_MOE, **dict(
        d_model=1280, n_layers=24, moe_ffn_hidden=640, shared_ffn_hidden=640, nitp_layer=5,
        nitp_weight=0.8, lr=4.2e-4, batch_size=1024, steps=_steps(330e9, 1024))},
    "dense-0.5b": {**_PAPER_RECIPE, **dict(
        d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_hidden=4864, nitp_layer=5,
        nitp_weight=1.0, lr=4.2e-4, batch_size=512, steps=_steps(200e9, 512))},
    "dense-2b": {**_PAPER_RECIPE, **dict(
        d_model=1792, n_layers=28, n_heads=14, n_kv_heads=2, ffn_hidden=10752, nitp_layer=6,
        nitp_weight=1.0, lr=4.2e-4, batch_size=1024, steps=_steps(330e9, 1024))},
    "dense-3b": {**_PAPER_RECIPE, **dict(
        d_model=2560, n_layers=28, n_heads=20, n_kv_heads=4, ffn_hidden=10240, nitp_layer=6,
        nitp_weight=0.8, lr=4.2e-4, batch_size=1024, steps=_steps(330e9, 1024))},
}


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def make_config(preset: str = "tiny", **overrides: Any) -> TrainConfig:
    """Build and validate a config from a preset name plus field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(field_names()))
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    cfg = TrainConfig(**{**PRESETS[preset], **overrides, "preset": preset})
    validate(cfg)
    return cfg


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Allowed ranges of the float fields: (low, low included, high, high included). Every float field,
# listed here or not, must also be finite: inf and nan would train on NaN and exit 0.
_FLOAT_RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "rope_theta": (0.0, False, math.inf, False), "norm_eps": (0.0, False, math.inf, False),
    "init_std": (0.0, False, math.inf, False), "lr": (0.0, False, math.inf, False),
    "peak_tflops": (0.0, False, math.inf, False),
    "nitp_weight": (0.0, True, math.inf, False), "z_loss_weight": (0.0, True, math.inf, False),
    "moe_aux_weight": (0.0, True, math.inf, False), "weight_decay": (0.0, True, math.inf, False),
    "grad_clip": (0.0, True, math.inf, False),
    "min_lr_ratio": (0.0, True, 1.0, True), "decay_ratio": (0.0, True, 1.0, True),
    "beta1": (0.0, True, 1.0, False), "beta2": (0.0, True, 1.0, False),
    "val_fraction": (0.0, True, 1.0, False),
}


def _allowed(low: float, low_in: bool, high: float, high_in: bool) -> str:
    if high == math.inf:
        return f"a finite number {'>=' if low_in else '>'} {low:g}"
    return f"a number in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _check_numbers(cfg: TrainConfig) -> None:
    """Every number field has its type (int or float, never bool), floats are finite and in range."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        value, kinds = getattr(cfg, f.name), set(typing.get_args(hints[f.name])) or {hints[f.name]}
        if value is None and type(None) in kinds or kinds - {type(None)} not in ({int}, {float}):
            continue  # optional and unset, or not a plain number field (strings, "auto" or an int)
        if float in kinds:
            allowed = _allowed(*_FLOAT_RANGES[f.name]) if f.name in _FLOAT_RANGES else "a finite number"
            low, low_in, high, high_in = _FLOAT_RANGES.get(f.name, (-math.inf, False, math.inf, False))
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                   and (value >= low if low_in else value > low) and (value <= high if high_in else value < high),
                   f"{_flag(f.name)} must be {allowed}, got {value!r}")
        else:
            _check(isinstance(value, int) and not isinstance(value, bool),
                   f"{_flag(f.name)} must be an integer, got {value!r}")
    _check(cfg.seed >= 0, f"--seed must be an integer >= 0, got {cfg.seed}")


def _check_data_settings(cfg: TrainConfig) -> None:
    """What the data pipeline would refuse only after preparing the data: refused now."""
    from engine.data.config import MIN_BPE_VOCAB, MIN_SYNTHETIC_VOCAB

    for name in ("data", "text_field", "data_cache_dir", "out"):
        _check(isinstance(getattr(cfg, name), str) and getattr(cfg, name).strip() != "",
               f"{_flag(name)} must be a non-empty string, got {getattr(cfg, name)!r}")
    _check(cfg.tokenizer is None or cfg.tokenizer.strip() != "",
           f"--tokenizer must be a tokenizer.json path or none, got {cfg.tokenizer!r}")
    if cfg.eval_every > 0:
        _check(cfg.val_fraction > 0,
               f"--eval-every {cfg.eval_every} needs a validation split, but --val-fraction is "
               f"{cfg.val_fraction}: set --val-fraction > 0 (e.g. 0.01) or --eval-every 0")
        _check(cfg.eval_batches == "all" or (type(cfg.eval_batches) is int and cfg.eval_batches >= 1),
               f"--eval-batches must be a positive integer or 'all' with --eval-every {cfg.eval_every}, "
               f"got {cfg.eval_batches!r}")
    _check(cfg.eval_batches == "all" or (type(cfg.eval_batches) is int and cfg.eval_batches >= 0),
           f"--eval-batches must be a positive integer or 'all', got {cfg.eval_batches!r}")
    if cfg.data == "synthetic":
        _check(cfg.vocab_size >= MIN_SYNTHETIC_VOCAB,
               f"--vocab-size {cfg.vocab_size} is too small for --data synthetic: it needs >= "
               f"{MIN_SYNTHETIC_VOCAB}")
    elif cfg.tokenizer is None and cfg.init_from_hf is None:
        _check(cfg.vocab_size >= MIN_BPE_VOCAB,
               f"--vocab-size {cfg.vocab_size} is too small for the byte-level BPE trained on --data "
               f"{cfg.data}: it needs >= {MIN_BPE_VOCAB} (256 bytes + end-of-document)")


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Raise ValueError naming the first inconsistent field; does nothing on a valid config.
    Number types and the ranges of float fields: _check_numbers; data settings: _check_data_settings."""
    _check_numbers(cfg)
    _check_data_settings(cfg)
    _check(cfg.preset in PRESETS, f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden",
                 "batch_size", "max_micro_batch_size", "seq_len", "log_every", "nitp_projector_mult"):
        _check(getattr(cfg, name) > 0, f"{name} must be positive, got {getattr(cfg, name)}")
    _check(cfg.geometry_tokens >= 2, f"geometry_tokens must be >= 2, got {cfg.geometry_tokens}")
    for name in ("steps", "warmup_steps", "eval_every", "geometry_every", "nitp_start_step",
                 "weight_decay", "moe_aux_weight", "z_loss_weight", "grad_clip", "n_dense_layers"):
        _check(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    _check(cfg.d_model % cfg.n_heads == 0,
           f"n_heads={cfg.n_heads} does not divide d_model={cfg.d_model}")
    _check(cfg.head_dim % 2 == 0, f"head dim d_model/n_heads={cfg.head_dim} must be even for RoPE")
    _check(cfg.n_heads % cfg.n_kv_heads == 0,
           f"n_kv_heads={cfg.n_kv_heads} does not divide n_heads={cfg.n_heads}")
    _check(0 <= cfg.nitp_layer <= cfg.n_layers - 1,
           f"nitp_layer={cfg.nitp_layer} is outside 0..{cfg.n_layers - 1} (n_layers={cfg.n_layers}; "
           "0 = embeddings)")
    _check(0 <= cfg.nitp_shift < cfg.seq_len,
           f"nitp_shift={cfg.nitp_shift} must satisfy 0 <= shift < seq_len={cfg.seq_len}")
    _check(cfg.objective in OBJECTIVES, f"objective {cfg.objective!r} is not one of {OBJECTIVES}")
    _check(cfg.nitp_loss_type in NITP_LOSS_TYPES,
           f"nitp_loss_type {cfg.nitp_loss_type!r} is not one of {NITP_LOSS_TYPES}")
    _check(cfg.backend in BACKENDS, f"backend {cfg.backend!r} is not one of {BACKENDS}")
    _check(cfg.device in DEVICES, f"device {cfg.device!r} is not one of {DEVICES}")
    _check(cfg.param_dtype in PARAM_DTYPES, f"param_dtype {cfg.param_dtype!r} is not one of {PARAM_DTYPES}")
    for name in ("ckpt_every", "keep_last", "max_bad_steps"):
        _check(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    _check(cfg.resume is None or (isinstance(cfg.resume, str) and cfg.resume != ""),
           f"resume must be 'auto' or a checkpoint path, got {cfg.resume!r}")
    _check(cfg.loss_chunk_size is None or cfg.loss_chunk_size > 0,
           f"loss_chunk_size must be positive or None, got {cfg.loss_chunk_size}")
    _check(world_size > 0, f"world_size must be positive, got {world_size}")
    _check(cfg.micro_batch_size == "auto" or (type(cfg.micro_batch_size) is int and cfg.micro_batch_size > 0),
           f"micro_batch_size must be a positive integer or 'auto', got {cfg.micro_batch_size!r}")
    if cfg.micro_batch_size == "auto":
        _check(cfg.batch_size % world_size == 0,
               f"batch_size={cfg.batch_size} is not divisible by world_size={world_size} (the number of "
               "processes): each rank takes an equal share of whole sequences; choose a batch_size that "
               "is a multiple of the world size")
    else:
        per_step = cfg.micro_batch_size * world_size
        _check(cfg.batch_size % per_step == 0,
               f"batch_size={cfg.batch_size} is not divisible by micro_batch_size*world_size="
               f"{cfg.micro_batch_size}*{world_size}={per_step}")
    if cfg.is_moe:
        _check(cfg.n_dense_layers < cfg.n_layers,
               f"n_dense_layers={cfg.n_dense_layers} leaves no MoE layer (n_layers={cfg.n_layers})")
        _check(1 <= cfg.moe_top_k <= cfg.n_experts,
               f"moe_top_k={cfg.moe_top_k} must be in 1..n_experts={cfg.n_experts}")
        _check(cfg.moe_ffn_hidden > 0, f"moe_ffn_hidden must be positive, got {cfg.moe_ffn_hidden}")
        _check(cfg.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {cfg.n_shared_experts}")
        _check(cfg.n_shared_experts == 0 or cfg.shared_ffn_hidden > 0,
               f"shared_ffn_hidden must be positive with shared experts, got {cfg.shared_ffn_hidden}")
    else:
        _check(cfg.n_experts == 0, f"n_experts must be >= 0, got {cfg.n_experts}")


def resolve_micro_batch_size(cfg: TrainConfig, world_size: int) -> int:
    """The micro-batch a rank runs: the explicit value, or for "auto" the largest divisor of
    batch_size / world_size that is <= max_micro_batch_size."""
    if cfg.micro_batch_size != "auto":
        return cfg.micro_batch_size
    per_rank = cfg.batch_size // world_size
    return max(m for m in range(1, min(cfg.max_micro_batch_size, per_rank) + 1) if per_rank % m == 0)


def with_micro_batch_size(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """cfg with "auto" replaced by the micro-batch for this world size (call after validate)."""
    return dataclasses.replace(cfg, micro_batch_size=resolve_micro_batch_size(cfg, world_size))


def gradient_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per rank per optimizer step."""
    return cfg.batch_size // (resolve_micro_batch_size(cfg, world_size) * world_size)


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


_parse_bool.__name__ = "boolean"  # argparse: "invalid boolean value: 'maybe'"


def _parser():
    """argparse parser with one ``--field-name`` option per config field (``--field_name`` too)."""
    import argparse

    parser = OneLineArgumentParser(description="NITP pre-training (FSDP2).", epilog=TRACEBACK_HELP,
                                   argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        hint = hints[f.name]
        if "parse" in f.metadata:  # a field with its own syntax (e.g. micro_batch_size: int or "auto")
            parser.add_argument(*flags, dest=f.name, type=f.metadata["parse"], metavar="VALUE",
                                help=f"(default {f.default})")
            continue
        if hint is bool:
            parser.add_argument(*flags, dest=f.name, nargs="?", const=True, type=_parse_bool,
                                metavar="BOOL", help=f"(default {f.default})")
            continue
        optional = type(None) in typing.get_args(hint)
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint

        def convert(text: str, base=base, optional=optional):
            if optional and text.lower() == "none":
                return None
            return base(text)

        convert.__name__ = base.__name__  # argparse names it in "invalid float value: 'abc'"

        parser.add_argument(*flags, dest=f.name, type=convert, metavar=base.__name__.upper(),
                            help=f"(default {f.default})")
    return parser


def parse_cli(argv: list[str] | None = None, world_size: int = 1) -> TrainConfig:
    """Config from command-line flags; any invalid value exits with one message, no traceback."""
    with cli_errors():
        args = vars(_parser().parse_args(argv))
        preset = args.pop("preset", "tiny")
        cfg = make_config(preset, **args)
        validate(cfg, world_size)
    return cfg
