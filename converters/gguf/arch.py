"""Which llama.cpp architecture a model is written as, its tensor names and hyperparameters.

Facts from the llama.cpp that llama-cpp-python 0.3.36 vendors (src/models/<arch>.cpp
``load_arch_tensors``, llama-model.cpp ``create_tensor_qkv``, conversion/*.py):

* every architecture here loads q/k/v as separate tensors or one fused ``attn_qkv``, each with
  optional biases; anything else it does not create makes the loader fail ("wrong number of
  tensors"), so the architecture is the first of the family's candidates that carries every tensor;
* ``llama``: optional attn_output and ffn_gate/up/down biases (applied by build_ffn); no
  output.bias. RoPE is the interleaved ("normal") kind, so q/k rows are permuted from
  transformers' rotate-half order (convert_hf_to_gguf's LLaMA permute), their biases too;
* ``qwen2``: optional output.bias (added to the logits), no other biases. NEOX RoPE;
* ``qwen3``: attn_q_norm/attn_k_norm, no other biases. NEOX RoPE;
* ``gemma3``: attn_q_norm/attn_k_norm, post_attention_norm, post_ffw_norm, no other biases.
  NEOX RoPE. The graph multiplies by the stored norm weight, so a (1 + w) norm is stored as 1 + w
  (conversion/gemma.py); it scales the token embeddings by sqrt(n_embd) itself and Q by
  1/sqrt(head_dim), so a query_pre_attn_scalar other than head_dim is carried by attn_q_norm.
  Sliding-window layers read ``rope.freq_base_swa``; which layers slide is the per-layer
  ``attention.sliding_window_pattern`` array;
* ``phi3``: fused attn_qkv and ffn_up (gate rows first, then up), no biases but q/k/v. NEOX
  RoPE; llama.cpp disables its sliding window.

No architecture with a gated MLP takes both ffn_gate/ffn_up biases and output.bias, and none with
q/k norms takes ffn biases: DAC's ffn biases reach llama.cpp only through ``llama`` (so never for
Qwen3, Gemma 3 or Phi-3), and its final-norm shift (lm_head.bias) only through ``qwen2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import gguf
import numpy as np

from d2quant.errors import D2Error
from d2quant.families import Family
from d2quant.qmodel import ModelSpec

_QKV = frozenset({"attn_q", "attn_k", "attn_v"})
_QKV_BIAS = frozenset({"attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_qkv.bias"})
_BLOCK = frozenset({"attn_norm", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"})
DAC_FFN_BIASES = frozenset({"ffn_gate.bias", "ffn_up.bias"})


@dataclass(frozen=True)
class ArchLayout:
    name: str  # general.architecture
    permute_qk: bool  # interleaved RoPE: q/k rows need convert_hf_to_gguf's permutation
    required: frozenset[str]  # per-layer weights (names after "blk.N.", no suffix), q/k/v aside
    optional: frozenset[str]  # per-layer tensors (with suffix) the loader accepts if present
    output_bias: bool
    hparams: Callable  # (writer, spec) -> None: the architecture's hyperparameter fields
    sliding_window: bool = False  # llama.cpp applies the model's attention windows


def _common(writer, spec: ModelSpec) -> None:
    writer.add_context_length(spec.max_positions)
    writer.add_embedding_length(spec.hidden)
    writer.add_block_count(spec.layers)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)


def _llama_hparams(writer, spec: ModelSpec) -> None:
    """What convert_hf_to_gguf writes for the LLaMA-family architectures."""
    _common(writer, spec)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_vocab_size(spec.vocab)
    _write_rope_scaling(writer, spec)


def _gemma3_hparams(writer, spec: ModelSpec) -> None:
    fam, cfg = spec.family, spec.hf_config
    _common(writer, spec)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    thetas = fam.rope_thetas(cfg, spec.layers, spec.rope_theta)
    windows = fam.sliding_windows(cfg, spec.layers)
    slide = [w is not None for w in windows]
    writer.add_rope_freq_base(next((t for t, s in zip(thetas, slide) if not s), spec.rope_theta))
    if any(slide):
        writer.add_float32(f"{writer.arch}.rope.freq_base_swa", next(t for t, s in zip(thetas, slide) if s))
        writer.add_sliding_window(next(w for w in windows if w))
        writer.add_array(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=writer.arch), slide)
    if cfg.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if cfg.get("attn_logit_softcapping"):
        raise D2Error("llama.cpp's gemma3 has no attention logit softcapping; this model uses it")
    writer.add_vocab_size(spec.vocab)
    _write_rope_scaling(writer, spec)


def _phi3_hparams(writer, spec: ModelSpec) -> None:
    cfg = spec.hf_config
    if spec.heads * spec.head_dim != spec.hidden:
        raise D2Error("llama.cpp's phi3 assumes heads x head_dim == hidden; this model differs")
    if (cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}).get("rope_type", "default") != "default":
        raise D2Error("Phi-3 with RoPE scaling (longrope) is not supported for GGUF export yet")
    _common(writer, spec)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_scaling_orig_ctx_len(int(cfg.get("original_max_position_embeddings") or spec.max_positions))
    writer.add_rope_dimension_count(int(cfg.get("partial_rotary_factor", 1.0) * spec.hidden) // spec.heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_sliding_window(int(cfg.get("sliding_window") or 0))
    writer.add_vocab_size(spec.vocab)


LAYOUTS = {lay.name: lay for lay in (
    ArchLayout("llama", True, _BLOCK, _QKV_BIAS | {"attn_output.bias", "ffn_gate.bias", "ffn_up.bias",
                                                  "ffn_down.bias"}, False, _llama_hparams),
    ArchLayout("qwen2", False, _BLOCK, _QKV_BIAS, True, _llama_hparams),
    ArchLayout("qwen3", False, _BLOCK | {"attn_q_norm", "attn_k_norm"}, _QKV_BIAS, False, _llama_hparams),
    ArchLayout("gemma3", False, _BLOCK | {"attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"},
               _QKV_BIAS, False, _gemma3_hparams, sliding_window=True),
    ArchLayout("phi3", False, _BLOCK - {"ffn_gate"}, _QKV_BIAS, False, _phi3_hparams),
)}

_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str, fam: type[Family]) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (also without suffix)."""
    stem, _, suffix = hf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        stem, suffix = hf_name, "weight"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".", 3)
    role = fam.role_of(parts[3]) if len(parts) == 4 and parts[:2] == ["model", "layers"] else None
    if role is None:
        raise D2Error(f"tensor {hf_name} has no GGUF name; the model has parts llama.cpp does not load")
    return f"blk.{parts[2]}.{role}.{suffix}"


def layer_tensors(names: set[str]) -> set[str]:
    """Per-layer tensor names without the "blk.N." prefix."""
    return {n.split(".", 2)[2] for n in names if n.startswith("blk.")}


def required(layout: ArchLayout, have: set[str]) -> set[str]:
    """The weights a layer must hold, given whether its q/k/v are fused (``have``: its tensors)."""
    qkv = {"attn_qkv"} if "attn_qkv.weight" in have else _QKV
    return {f"{r}.weight" for r in layout.required | qkv}


def choose_layout(spec: ModelSpec, gguf_names: set[str]) -> ArchLayout:
    """The first of the family's llama.cpp architectures that loads every tensor (module doc)."""
    per_layer = layer_tensors(gguf_names)
    extra_by = {}
    for name in spec.family.gguf_archs:
        lay = LAYOUTS[name]
        extra = per_layer - required(lay, per_layer) - lay.optional
        if not extra:
            return lay
        extra_by[name] = extra
    extra = set.intersection(*extra_by.values())
    archs = " or ".join(extra_by)
    if extra and extra <= DAC_FFN_BIASES:
        raise D2Error(f"llama.cpp's {archs} architecture has no {', '.join(sorted(extra))} tensors (DAC's "
                      f"ffn biases); quantize {spec.arch} for GGUF without DAC (--no-dac)")
    raise D2Error(f"llama.cpp's {archs} architecture cannot load {', '.join(sorted(extra or set().union(*extra_by.values())))}")


def rope_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that turns transformers' rotate-half q/k rows into llama.cpp's interleaved pairs.

    Within each head, row (t * half + i) moves to position (2 * i + t); ``rows[perm]`` applies it.
    """
    half = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, 2, half).transpose(0, 2, 1).reshape(-1)


def rope_heads(spec: ModelSpec, role: str) -> int:
    return spec.heads if role == "attn_q" else spec.kv_heads


def _rope_params(spec: ModelSpec) -> dict:
    """The RoPE scaling of the global layers (per layer type in Gemma 3's config)."""
    cfg = spec.hf_config
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return rp.get("full_attention", rp)


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
