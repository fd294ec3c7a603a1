"""The LLaMA block and its close relatives: Mistral (sliding window), Qwen2 (q/k/v biases),
Qwen3 (per-head q/k RMSNorms)."""

from __future__ import annotations

from d2quant.families.base import Family


class Llama(Family):
    name, model_type, genai_type = "llama", "llama", "llama"
    hf_classes = ("LlamaForCausalLM",)
    gguf_archs = ("llama",)


class Mistral(Llama):
    name, model_type, genai_type = "mistral", "mistral", "mistral"
    hf_classes = ("MistralForCausalLM",)

    @classmethod
    def layer_types(cls, cfg, n_layers):
        return ["sliding_attention" if cfg.get("sliding_window") else "full_attention"] * n_layers


class Qwen2(Llama):
    name, model_type, genai_type = "qwen2", "qwen2", "qwen2"
    hf_classes = ("Qwen2ForCausalLM",)
    # qwen2 carries output.bias (the final-norm DAC shift); DAC's ffn biases need llama's loader
    gguf_archs = ("qwen2", "llama")


class Qwen3(Llama):
    name, model_type, genai_type = "qwen3", "qwen3", "qwen3"
    hf_classes = ("Qwen3ForCausalLM",)
    gguf_archs = ("qwen3",)
    qk_norms = ("self_attn.q_norm", "self_attn.k_norm")
