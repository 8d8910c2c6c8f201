"""What a resumed run may change, and what it may not.

A run resumed with ``--resume`` continues the checkpoint's training: the same model, data
and randomness. Every config field is in exactly one of two groups.

May change (they take effect from the resumed step on, exactly as in a run started with them):

- schedule: ``steps``, ``lr``, ``min_lr_ratio``, ``warmup_steps``, ``decay_ratio``,
  ``nitp_start_step``. The learning-rate scheduler is not restored from the checkpoint: it is
  rebuilt from this run's config at the resumed step, so a 4-step run resumed with
  ``--steps 8 --lr 0.01`` logs, from step 5 on, the learning rates of a fresh 8-step run with
  ``--lr 0.01``;
- optimizer hyper-parameters: ``weight_decay``, ``beta1``, ``beta2``, ``grad_clip`` (the
  checkpoint contributes the Adam moments and step counts only; every parameter-group setting
  comes from this run's config and device);
- logging and evaluation: ``log_every``, ``eval_every``, ``eval_batches``, ``geometry_every``,
  ``geometry_tokens``, ``peak_tflops``, ``out``;
- checkpoints and faults: ``ckpt_every``, ``keep_last``, ``max_bad_steps``, ``async_ckpt``,
  ``resume``, ``overwrite``;
- how the same computation is laid out: the world size (any number of processes),
  ``micro_batch_size``, ``device``, ``backend``, ``param_dtype``, ``activation_checkpointing``,
  ``compile``, ``loss_chunk_size``, ``data_cache_dir``;
- initialisation only (the checkpoint's weights replace it): ``init_std``, ``init_from_hf``,
  ``preset`` (a name; its values are compared field by field).

May not (the run is refused, every differing field named in the error):

- architecture: ``vocab_size``, ``d_model``, ``n_layers``, ``n_heads``, ``n_kv_heads``,
  ``ffn_hidden``, ``rope_theta``, ``norm_eps``, the MoE fields, ``nitp_projector``,
  ``nitp_projector_mult``;
- the objective: ``objective``, ``nitp_layer``, ``nitp_weight``, ``nitp_shift``,
  ``nitp_loss_type``, ``nitp_stop_gradient``, ``z_loss_weight``, ``moe_aux_weight``;
- data and batching: ``data``, ``text_field``, ``tokenizer``, ``val_fraction``, ``seq_len``,
  ``doc_mask``, ``batch_size`` (the global batch), and the data's own identity (corpus and
  tokenizer hashes recorded in the checkpoint), so a changed file behind the same path is caught;
- ``seed``.
"""

from __future__ import annotations

from typing import Any

from engine.checkpoint.safe_io import CheckpointError

MAY_CHANGE_ON_RESUME = frozenset({
    "steps", "lr", "min_lr_ratio", "warmup_steps", "decay_ratio", "nitp_start_step",
    "weight_decay", "beta1", "beta2", "grad_clip",
    "log_every", "eval_every", "eval_batches", "geometry_every", "geometry_tokens", "peak_tflops", "out",
    "ckpt_every", "keep_last", "max_bad_steps", "async_ckpt", "resume", "overwrite",
    "micro_batch_size", "max_micro_batch_size", "device", "backend", "param_dtype", "activation_checkpointing", "compile",
    "loss_chunk_size", "data_cache_dir",
    "init_std", "init_from_hf", "preset",
})
FIXED_ON_RESUME = frozenset({
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "rope_theta", "norm_eps",
    "n_experts", "moe_top_k", "n_shared_experts", "moe_ffn_hidden", "shared_ffn_hidden", "n_dense_layers",
    "nitp_projector", "nitp_projector_mult",
    "objective", "nitp_layer", "nitp_weight", "nitp_shift", "nitp_loss_type", "nitp_stop_gradient",
    "z_loss_weight", "moe_aux_weight",
    "data", "text_field", "tokenizer", "val_fraction", "seq_len", "doc_mask", "batch_size",
    "seed",
})
# What the data pipeline records about the data itself (engine/data): the same --data path may
# hold other files, or the tokenizer may have been retrained.
DATA_IDENTITY_KEYS = ("data_corpus_hash", "data_tokenizer_hash", "data_n_tokens_train")


class ResumeMismatchError(CheckpointError):
    """This run's config differs from the checkpoint's in fields that must stay fixed on resume."""


def resume_mismatches(saved_config: dict[str, Any], config: dict[str, Any],
                      saved_data: dict[str, Any] | None = None, data: dict[str, Any] | None = None) -> list[str]:
    """Every fixed field (and data identity) where the run differs from the checkpoint, as text.

    A field missing from the checkpoint's config (saved before the field existed) is not
    compared; a field of the run in neither group is compared (new fields are fixed until
    classified above).
    """
    diffs = [f"{name}: checkpoint {saved_config[name]!r}, this run {value!r}"
             for name, value in config.items()
             if name not in MAY_CHANGE_ON_RESUME and name in saved_config and saved_config[name] != value]
    for key in DATA_IDENTITY_KEYS:
        old, new = (saved_data or {}).get(key), (data or {}).get(key)
        if old is not None and new is not None and old != new:
            diffs.append(f"{key} (the data itself): checkpoint {old!r}, this run {new!r}")
    return diffs


def check_resumable(saved_state: dict[str, Any], config: dict[str, Any], data: dict[str, Any],
                    where: str) -> None:
    """Raise ResumeMismatchError naming every fixed field that differs (see the module docstring)."""
    diffs = resume_mismatches(saved_state.get("config", {}), config, saved_state.get("data_info"), data)
    if diffs:
        raise ResumeMismatchError(
            f"cannot resume from {where}: this run differs from the checkpoint in {len(diffs)} setting(s) that "
            f"must stay fixed on resume: {'; '.join(diffs)}. Resume with the checkpoint's values, or start a new "
            "run with another --out (the schedule, logging, checkpoint cadence, world size, micro-batch size, "
            "device and backend may change on resume)")
