"""The engine's model: a Llama / Qwen2-style decoder with an NITP output module.

    layers        RMSNorm, RoPE, grouped-query attention, the SwiGLU MLP (leaf)
    moe           the DeepSeek-V2-style mixture-of-experts block
    transformer   blocks, backbone, output head (the fused loss), NITPTransformer
    hf_adapter    Hugging Face parameter names and config.json, both directions
"""

from engine.model.hf_adapter import (HFImportError, config_from_hf, engine_to_hf, hf_config,
                                     load_hf_into_engine, load_hf_weights)
from engine.model.layers import MLP, Attention, RMSNorm, apply_rope, rope_cos_sin, swiglu
from engine.model.moe import MoE
from engine.model.transformer import (Backbone, Block, NITPTransformer, OutputHead, OutputLosses,
                                      mean_pairwise_cosine_per_sequence)

__all__ = ["MLP", "Attention", "Backbone", "Block", "HFImportError", "MoE", "NITPTransformer",
           "OutputHead", "OutputLosses", "RMSNorm", "apply_rope", "config_from_hf", "engine_to_hf",
           "hf_config", "load_hf_into_engine", "load_hf_weights", "mean_pairwise_cosine_per_sequence",
           "rope_cos_sin", "swiglu"]
