"""The engine's model: a Llama / Qwen2-style decoder with an NITP output module.

    attention     causal attention kernels; document masks (flash-attn varlen, FlexAttention, SDPA)
    init          shard-local seeded initialisation (the same weights for every world size)
    layers        RMSNorm, RoPE, grouped-query attention, the SwiGLU MLP
    moe           the DeepSeek-V2-style mixture-of-experts block
    transformer   blocks, backbone, output head (the fused loss), NITPTransformer
    hf_adapter    Hugging Face parameter names and config.json, both directions
"""

from engine.model.attention import DocumentMask, causal_attention, document_attention_path
from engine.model.hf_adapter import (HFImportError, config_from_hf, engine_to_hf, hf_config,
                                     load_hf_into_engine, load_hf_weights)
from engine.model.layers import MLP, Attention, RMSNorm, apply_rope, rope_cos_sin, swiglu
from engine.model.moe import MoE
from engine.model.transformer import (Backbone, Block, NITPTransformer, OutputHead, OutputLosses,
                                      mean_pairwise_cosine_per_sequence)

__all__ = ["MLP", "Attention", "Backbone", "Block", "DocumentMask", "HFImportError", "MoE", "NITPTransformer",
           "OutputHead", "OutputLosses", "RMSNorm", "apply_rope", "config_from_hf", "engine_to_hf",
           "causal_attention", "document_attention_path", "hf_config", "load_hf_into_engine", "load_hf_weights", "mean_pairwise_cosine_per_sequence",
           "rope_cos_sin", "swiglu"]
