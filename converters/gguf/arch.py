"""Which llama.cpp architecture a model is written as, its tensor names and hyperparameters.

Facts from the llama.cpp that llama-cpp-python 0.3.36 vendors (src/models/*.cpp,
llama-model.cpp ``create_tensor_qkv``):

* ``llama``: optional attn_q/k/v/output biases and ffn_gate/up/down biases; no output.bias.
  RoPE is the interleaved ("normal") kind, so q/k rows are permuted from transformers' rotate-half
  order (convert_hf_to_gguf's LLaMA permute); their biases too.
* ``qwen2``: optional attn_q/k/v biases and an optional output.bias, no other biases.
  NEOX RoPE: no permutation.
* ``qwen3``: attn_q_norm/attn_k_norm, optional attn_q/k/v biases, nothing else optional.
  NEOX RoPE.

A loader refuses tensors its architecture does not create ("wrong number of tensors"), so the
architecture is chosen by which one carries every tensor the quantized model has: a Qwen2 model
with DAC's ffn biases is written as ``llama`` (which loads Qwen2's q/k/v biases too, and with the
permutation computes the same attention); without them, as ``qwen2``, which also keeps
lm_head.bias. Qwen3 has no llama.cpp architecture with ffn biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import numpy as np

from d2quant.errors import D2Error
from d2quant.qmodel import ModelSpec

_QKV_BIAS = frozenset({"attn_q.bias", "attn_k.bias", "attn_v.bias"})


@dataclass(frozen=True)
class ArchLayout:
    name: str  # general.architecture
    permute_qk: bool  # interleaved RoPE: q/k rows need convert_hf_to_gguf's permutation
    optional: frozenset[str]  # per-layer tensors (name after "blk.N.") the loader accepts if present
    output_bias: bool
    qk_norm: bool


LAYOUTS = {
    "llama": ArchLayout("llama", True, _QKV_BIAS | {"attn_output.bias", "ffn_gate.bias",
                                                    "ffn_up.bias", "ffn_down.bias"}, False, False),
    "qwen2": ArchLayout("qwen2", False, _QKV_BIAS, True, False),
    "qwen3": ArchLayout("qwen3", False, _QKV_BIAS, False, True),
}

# transformers module path inside a decoder layer -> GGUF name inside "blk.N."
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (also without suffix)."""
    stem, _, suffix = hf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        stem, suffix = hf_name, "weight"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}.{suffix}"
    raise D2Error(f"tensor {hf_name} has no GGUF name; the model has parts llama.cpp does not load")


def choose_layout(spec: ModelSpec, gguf_names: set[str]) -> ArchLayout:
    """The architecture that loads every tensor in ``gguf_names`` (see the module doc)."""
    per_layer = {n.split(".", 2)[2] for n in gguf_names if n.startswith("blk.")}
    biases = {n for n in per_layer if n.endswith(".bias")}
    if spec.arch in ("llama", "mistral"):
        return LAYOUTS["llama"]
    if spec.arch == "qwen2":
        return LAYOUTS["qwen2"] if biases <= LAYOUTS["qwen2"].optional else LAYOUTS["llama"]
    if spec.arch == "qwen3":
        extra = biases - LAYOUTS["qwen3"].optional
        if extra:
            raise D2Error(f"llama.cpp's qwen3 architecture has no {', '.join(sorted(extra))} tensors; "
                          "quantize Qwen3 for GGUF without DAC (--no-dac)")
        return LAYOUTS["qwen3"]
    raise D2Error(f"no GGUF architecture for {spec.arch!r}; supported: llama, mistral, qwen2, qwen3")


def rope_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that turns transformers' rotate-half q/k rows into llama.cpp's interleaved pairs.

    Within each head, row (t * half + i) moves to position (2 * i + t); ``rows[perm]`` applies it.
    """
    half = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, 2, half).transpose(0, 2, 1).reshape(-1)


def rope_heads(spec: ModelSpec, role: str) -> int:
    return spec.heads if role == "attn_q" else spec.kv_heads


def write_hparams(writer, spec: ModelSpec, layout: ArchLayout) -> None:
    """The architecture's hyperparameter fields (what convert_hf_to_gguf writes for these models)."""
    writer.add_context_length(spec.max_positions)
    writer.add_embedding_length(spec.hidden)
    writer.add_block_count(spec.layers)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_vocab_size(spec.vocab)
    _write_rope_scaling(writer, spec)


def _rope_params(spec: ModelSpec) -> dict:
    cfg = spec.hf_config
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


def _write_rope_scaling(writer, spec: ModelSpec) -> None:
    rp = _rope_params(spec)
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rp["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rp["factor"])
        writer.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
    elif kind != "llama3":  # llama3 travels as the rope_freqs tensor
        raise D2Error(f"RoPE scaling {kind!r} is not supported for GGUF export; supported: "
                      "default, linear, yarn, llama3")


def extra_tensors(spec: ModelSpec) -> dict[str, np.ndarray]:
    """Generated tensors: Llama 3.1's rope_freqs (per-frequency divisors of its RoPE scaling)."""
    rp = _rope_params(spec)
    if rp.get("rope_type", rp.get("type")) != "llama3":
        return {}
    factor, lo, hi = rp["factor"], rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp["original_max_position_embeddings"]
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_ctx / wavelen - lo) / (hi - lo), 0.0, 1.0)
    # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    divisor = np.where(wavelen > old_ctx / lo, factor,
                       np.where(wavelen < old_ctx / hi, 1.0, 1.0 / ((1 - smooth) / factor + smooth)))
    return {"rope_freqs.weight": divisor.astype(np.float32)}
