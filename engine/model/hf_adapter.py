"""The Hugging Face state-dict adapter: engine parameter names <-> Hugging Face names.

Engine -> HF (``hf_config``, ``engine_to_hf``; used by ``python -m engine.export``):

- dense models -> LlamaForCausalLM: the engine's names are Llama's, RoPE is HF's half-split
  layout, RMSNorm has the same eps and casting, embeddings are untied. A rename-free copy.
- MoE models -> Qwen2MoeForCausalLM, exact for our DeepSeek-V2-style block:
  dense first layers via ``mlp_only_layers`` (their width is ``intermediate_size``);
  router: softmax in fp32 then top-k, weights not renormalised (``norm_topk_prob=False``) -- as
  engine/model/moe.py; routed experts one per ``experts.{j}.{gate,up,down}_proj`` (the hub layout);
  Qwen2-MoE multiplies its shared expert by sigmoid(shared_expert_gate(x)): we write a zero gate
  (sigmoid(0) = 0.5) and the shared down projection times 2 (exact in binary floating point);
  Qwen2-MoE has q/k/v biases: written as zeros. Without shared experts the shared expert is
  written as zeros (it then adds exactly 0).

HF -> engine (``load_hf_into_engine``, for ``--init-from-hf``): Llama, Mistral (no sliding
window), Qwen2 (zero attention biases only) and Qwen2-MoE (zero shared-expert gate, no top-k
renormalisation, dense layers first) checkpoints. What cannot map is refused by name.
Nothing here imports transformers; tensors are read with safetensors, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from engine.model.init import copy_full_rows


class HFImportError(ValueError):
    """A Hugging Face checkpoint that does not map onto the engine's model."""


# ----------------------------------------------------------------------------- engine -> HF

def hf_config(cfg: dict[str, Any], eos_token_id: int | None) -> dict[str, Any]:
    """config.json for the engine config ``cfg`` (a TrainConfig.to_dict())."""
    common = {
        "vocab_size": cfg["vocab_size"], "hidden_size": cfg["d_model"], "intermediate_size": cfg["ffn_hidden"],
        "num_hidden_layers": cfg["n_layers"], "num_attention_heads": cfg["n_heads"],
        "num_key_value_heads": cfg["n_kv_heads"], "head_dim": cfg["d_model"] // cfg["n_heads"],
        "hidden_act": "silu", "max_position_embeddings": cfg["seq_len"], "rms_norm_eps": cfg["norm_eps"],
        "rope_theta": cfg["rope_theta"],  # transformers 4.x reads this, 5.x rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg["rope_theta"]},
        "tie_word_embeddings": False, "initializer_range": cfg["init_std"], "use_cache": True,
        "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": eos_token_id,
        "pad_token_id": None, "torch_dtype": "float32",
    }
    if cfg["n_experts"] == 0:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                "attention_bias": False, "mlp_bias": False}
    shared = cfg["n_shared_experts"] * cfg["shared_ffn_hidden"] or cfg["moe_ffn_hidden"]
    return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **common,
            "qkv_bias": True, "use_sliding_window": False, "sliding_window": None,
            "decoder_sparse_step": 1, "mlp_only_layers": list(range(cfg["n_dense_layers"])),
            "num_experts": cfg["n_experts"], "num_experts_per_tok": cfg["moe_top_k"],
            "moe_intermediate_size": cfg["moe_ffn_hidden"], "shared_expert_intermediate_size": shared,
            "norm_topk_prob": False, "output_router_logits": False,
            "router_aux_loss_coef": cfg["moe_aux_weight"]}


def engine_to_hf(cfg: dict[str, Any], sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Engine state dict (backbone.*, output.*) -> Hugging Face names (model.*, lm_head)."""
    out = {"model.embed_tokens.weight": sd["backbone.embed_tokens.weight"],
           "model.norm.weight": sd["output.norm.weight"], "lm_head.weight": sd["output.lm_head.weight"]}
    moe = cfg["n_experts"] > 0
    for i in range(cfg["n_layers"]):
        src, dst = f"backbone.layers.{i}.", f"model.layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                     "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"):
            out[dst + name] = sd[src + name]
        if moe:
            for p in ("q", "k", "v"):
                w = sd[f"{src}self_attn.{p}_proj.weight"]
                out[f"{dst}self_attn.{p}_proj.bias"] = w.new_zeros(w.shape[0])
        if not moe or i < cfg["n_dense_layers"]:
            for p in ("gate", "up", "down"):
                out[f"{dst}mlp.{p}_proj.weight"] = sd[f"{src}mlp.{p}_proj.weight"]
            continue
        out[dst + "mlp.gate.weight"] = sd[src + "mlp.router.weight"]
        for p in ("gate", "up", "down"):
            for j, w in enumerate(sd[f"{src}mlp.w_{p}"].unbind(0)):
                out[f"{dst}mlp.experts.{j}.{p}_proj.weight"] = w
        d, h = cfg["d_model"], cfg["moe_ffn_hidden"]
        if f"{src}mlp.shared.down_proj.weight" in sd:
            for p in ("gate", "up"):
                out[f"{dst}mlp.shared_expert.{p}_proj.weight"] = sd[f"{src}mlp.shared.{p}_proj.weight"]
            out[f"{dst}mlp.shared_expert.down_proj.weight"] = sd[f"{src}mlp.shared.down_proj.weight"] * 2
        else:  # no shared expert in the engine: an exactly-zero one in Qwen2-MoE
            zero = sd[src + "mlp.router.weight"].new_zeros
            out.update({f"{dst}mlp.shared_expert.gate_proj.weight": zero(h, d),
                        f"{dst}mlp.shared_expert.up_proj.weight": zero(h, d),
                        f"{dst}mlp.shared_expert.down_proj.weight": zero(d, h)})
        out[dst + "mlp.shared_expert_gate.weight"] = sd[src + "mlp.router.weight"].new_zeros(1, d)
    return out


# ----------------------------------------------------------------------------- HF -> engine

def _tensor_reader(hf_dir: Path) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors (pytorch_model.bin is not read: it is a pickle)")
    where = {}
    for name in files:
        with safe_open(str(hf_dir / name), "pt") as f:
            where.update({k: name for k in f.keys()})

    def get(key: str) -> torch.Tensor:
        if key not in where:
            raise KeyError(f"{hf_dir}: tensor {key} missing")
        with safe_open(str(hf_dir / where[key]), "pt") as f:
            return f.get_tensor(key).float()

    return list(where), get


def _refuse(cond: bool, hf_dir: Path, msg: str) -> None:
    if cond:
        raise HFImportError(f"--init-from-hf {hf_dir}: {msg}")


def _rope_theta(c: dict[str, Any], hf_dir: Path) -> float:
    rope, scaling = c.get("rope_parameters") or {}, c.get("rope_scaling") or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    _refuse(kind != "default", hf_dir, f"RoPE scaling {kind!r} is not supported")
    return float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))


def load_hf_into_engine(hf_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(TrainConfig overrides, engine backbone state dict) for a Hugging Face checkpoint folder.

    The state dict has every model parameter except the NITP projector (freshly initialised).
    """
    hf_dir = Path(hf_dir)
    c = json.loads((hf_dir / "config.json").read_text())
    by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen2_moe": "Qwen2MoeForCausalLM"}
    arch = (c.get("architectures") or [by_type.get(c.get("model_type"), f"model_type {c.get('model_type')!r}")])[0]
    supported = tuple(by_type.values())
    _refuse(arch not in supported, hf_dir, f"{arch} is not supported (supported: {', '.join(supported)})")
    _refuse(c.get("hidden_act", "silu") != "silu", hf_dir, f"hidden_act {c.get('hidden_act')!r} is not silu")
    d, heads = c["hidden_size"], c["num_attention_heads"]
    _refuse(c.get("head_dim") not in (None, d // heads), hf_dir, f"head_dim {c.get('head_dim')} != hidden/heads")
    _refuse(c.get("attention_bias") or c.get("mlp_bias"), hf_dir, "attention/MLP biases are not supported")
    _refuse(arch == "MistralForCausalLM" and c.get("sliding_window") is not None, hf_dir,
            "sliding-window attention is not supported")
    _refuse(c.get("use_sliding_window", False), hf_dir, "sliding-window attention is not supported")
    keys, get = _tensor_reader(hf_dir)
    L = c["num_hidden_layers"]
    overrides = dict(vocab_size=c["vocab_size"], d_model=d, n_layers=L, n_heads=heads,
                     n_kv_heads=c.get("num_key_value_heads") or heads, ffn_hidden=c["intermediate_size"],
                     rope_theta=_rope_theta(c, hf_dir), norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                     n_experts=0, moe_top_k=0, n_shared_experts=0, moe_ffn_hidden=0, shared_ffn_hidden=0,
                     n_dense_layers=0)
    for key in keys:  # attention biases (Qwen2 families) can only map when they are zero
        if key.endswith("_proj.bias"):
            _refuse(bool(get(key).any()), hf_dir, f"{key} is non-zero; the engine's attention has no biases")
    embed = get("model.embed_tokens.weight")
    sd = {"backbone.embed_tokens.weight": embed, "output.norm.weight": get("model.norm.weight"),
          # tied embeddings: the engine unties them, both starting from the shared matrix
          "output.lm_head.weight": get("lm_head.weight") if "lm_head.weight" in keys else embed.clone()}
    moe_layers = set()
    if arch == "Qwen2MoeForCausalLM":
        dense = list(c.get("mlp_only_layers") or [])
        step = c.get("decoder_sparse_step", 1)
        moe_layers = {i for i in range(L) if i not in dense and (i + 1) % step == 0}
        n_dense = L - len(moe_layers)
        _refuse(moe_layers != set(range(n_dense, L)), hf_dir, "only dense layers first, then MoE layers, map")
        _refuse(bool(c.get("norm_topk_prob")), hf_dir, "norm_topk_prob=True (renormalised top-k) does not map")
        overrides.update(n_experts=c["num_experts"], moe_top_k=c["num_experts_per_tok"], n_dense_layers=n_dense,
                         moe_ffn_hidden=c["moe_intermediate_size"], n_shared_experts=1,
                         shared_ffn_hidden=c["shared_expert_intermediate_size"])
    for i in range(L):
        src, dst = f"model.layers.{i}.", f"backbone.layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                     "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"):
            sd[dst + name] = get(src + name)
        if i not in moe_layers:
            for p in ("gate", "up", "down"):
                sd[f"{dst}mlp.{p}_proj.weight"] = get(f"{src}mlp.{p}_proj.weight")
            continue
        _refuse(bool(get(src + "mlp.shared_expert_gate.weight").any()), hf_dir,
                f"layer {i}: a non-zero shared_expert_gate (a gated shared expert) has no engine counterpart")
        sd[dst + "mlp.router.weight"] = get(src + "mlp.gate.weight")
        if src + "mlp.experts.gate_up_proj" in keys:  # transformers 5 fused layout
            gate, up = get(src + "mlp.experts.gate_up_proj").chunk(2, dim=1)
            sd[dst + "mlp.w_gate"], sd[dst + "mlp.w_up"] = gate.contiguous(), up.contiguous()
            sd[dst + "mlp.w_down"] = get(src + "mlp.experts.down_proj")
        else:
            for p in ("gate", "up", "down"):
                sd[f"{dst}mlp.w_{p}"] = torch.stack([get(f"{src}mlp.experts.{j}.{p}_proj.weight")
                                                     for j in range(c["num_experts"])])
        for p in ("gate", "up"):
            sd[f"{dst}mlp.shared.{p}_proj.weight"] = get(f"{src}mlp.shared_expert.{p}_proj.weight")
        sd[f"{dst}mlp.shared.down_proj.weight"] = get(f"{src}mlp.shared_expert.down_proj.weight") / 2
    if (hf_dir / "tokenizer.json").is_file():
        overrides["tokenizer"] = str(hf_dir / "tokenizer.json")
    return overrides, sd


def config_from_hf(cfg: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``cfg`` with the model fields of ``cfg.init_from_hf`` and the weights to start from.

    The folder's tokenizer.json becomes the run's tokenizer for real data unless --tokenizer is given.
    """
    overrides, sd = load_hf_into_engine(cfg.init_from_hf)
    tokenizer = overrides.pop("tokenizer", None)
    if tokenizer and cfg.tokenizer is None and cfg.data != "synthetic":
        overrides["tokenizer"] = tokenizer
    return dataclasses.replace(cfg, **overrides), sd


def load_hf_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy imported weights into an engine model, plain or sharded by FSDP2 (each rank copies its
    own rows); only the projector may be left out."""
    params = dict(model.named_parameters())
    missing = [k for k in params if k not in sd and not k.startswith("output.projector.")]
    unexpected = [k for k in sd if k not in params]
    if missing or unexpected:
        raise HFImportError(f"--init-from-hf: weights do not fit the model (missing {missing}, "
                            f"unexpected {unexpected})")
    for name, full in sd.items():
        try:
            copy_full_rows(params[name], full)
        except ValueError as exc:
            raise HFImportError(f"--init-from-hf: {name}: {exc}") from None
