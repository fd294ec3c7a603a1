"""Phi-3: the LLaMA block with q/k/v fused into qkv_proj (rows q, k, v) and gate/up fused into
gate_up_proj (rows gate, then up)."""

from __future__ import annotations

from d2quant.families.base import Family, Linear


class Phi3(Family):
    name, model_type, genai_type = "phi3", "phi3", "phi3"
    hf_classes = ("Phi3ForCausalLM",)
    gguf_archs = ("phi3",)
    qkv = (Linear("self_attn.qkv_proj", "attn_qkv"),)
    gate_up = (Linear("mlp.gate_up_proj", "ffn_up"),)
    activation_module = "mlp.activation_fn"

    @classmethod
    def up_rows(cls, ffn):
        return "mlp.gate_up_proj", slice(ffn, 2 * ffn)

    @classmethod
    def linear_shapes(cls, spec):
        q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        return {"self_attn.qkv_proj": (q + 2 * kv, spec.hidden), "self_attn.o_proj": (spec.hidden, q),
                "mlp.gate_up_proj": (2 * spec.ffn, spec.hidden), "mlp.down_proj": (spec.hidden, spec.ffn)}
