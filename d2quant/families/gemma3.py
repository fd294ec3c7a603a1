"""Gemma 3 (text): (1 + w) RMSNorms, four per layer (the attention and MLP outputs are normed
before the residual), per-head q/k norms, embeddings scaled by sqrt(hidden), a GELU-tanh gate,
sliding-window and global layers with their own RoPE bases."""

from __future__ import annotations

import math

from d2quant.families.base import Family


class Gemma3(Family):
    name, model_type, genai_type = "gemma3", "gemma3_text", "gemma3_text"
    gguf_model_types = ("gemma3",)
    hf_classes = ("Gemma3ForCausalLM",)
    gguf_archs = ("gemma3",)
    attn_post_norm = "post_attention_layernorm"
    mlp_norm = "pre_feedforward_layernorm"
    mlp_post_norm = "post_feedforward_layernorm"
    qk_norms = ("self_attn.q_norm", "self_attn.k_norm")
    norm_offset = 1.0
    activation = "gelu_tanh"
    rotation = False  # the branch-output norms do not commute with a rotation of the stream

    @classmethod
    def position_embeddings(cls, inner, x, pos, layer_type):
        return inner.rotary_emb(x, pos, layer_type)

    @classmethod
    def rope_thetas(cls, cfg, n_layers, theta):
        rope = cfg.get("rope_parameters") or {}
        local = (rope.get("sliding_attention") or {}).get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
        glob = (rope.get("full_attention") or {}).get("rope_theta", theta)
        return [local if t == "sliding_attention" else glob for t in cls.layer_types(cfg, n_layers)]

    @classmethod
    def attention_scale(cls, spec):
        return spec.hf_config.get("query_pre_attn_scalar", spec.head_dim) ** -0.5

    @classmethod
    def embed_scale(cls, spec):
        return math.sqrt(spec.hidden)
