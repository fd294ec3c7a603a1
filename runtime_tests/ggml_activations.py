"""llama.cpp's CPU arithmetic on the activations, reproduced in torch.

The weights of a GGUF are exact, but llama.cpp does not multiply them by float activations: each
matmul first rounds its activation operand to the weight type's ``vec_dot_type`` (ggml-cpu's type
traits), one scale per block:

* K-quants (Q2_K..Q6_K) -> Q8_K: blocks of 256, scale = -max/127 where max is the signed value of
  largest magnitude (so it lands on -127), float32 scale;
* Q4_0, Q5_0, Q8_0, IQ4_NL -> Q8_0 and Q4_1, Q5_1 -> Q8_1: blocks of 32, scale = amax/127, stored
  as fp16 (the codes were rounded with the unrounded scale);
* F16 weights -> the activation in fp16; F32 weights -> untouched.

Attention runs on fp16 q/k (after RoPE) and v, and its softmax probabilities are rounded to fp16
before they meet the values (:func:`llamacpp_attention`); a GELU-tanh gate reads llama.cpp's fp16
table (:func:`gelu_fp16_table`). A torch model with these roundings applied
(:func:`emulate_llamacpp`) against the plain one measures what the runtime's arithmetic does to a
given quantized model, on its own; runtime_tests/llamacpp.py sizes its parity bound from that.

It is not llama.cpp's arithmetic to the last bit, and cannot be made so in torch. Traced op by op
on SmolLM2 (bench/llamacpp_trace.py: llama.cpp's eval callback, each op recomputed from llama.cpp's
own inputs and the file's decoded weights), every matmul equals this rounding to <= 1.4e-3
relative in layer 0 and <= 1e-3 elsewhere, most to 3e-7 (unrounded activations: 0.3-3%); what is
left are single codes at, or one ulp from, a .5 tie that llama.cpp rounds the other way (layer 0
reads an 8-bit embedding table, so exact ties occur). Such last-bit differences do not stay small:
8-bit rounding is discontinuous, so a one-ulp change flips a code one step and the flips
propagate. :func:`nudge_embeddings` measures that sensitivity: the emulation against itself with
the embeddings moved by a relative 1e-7 differs by mean KL 0.0043 / 0.0067 / 0.029 on llama.cpp's
own Q8_0 / Q3_K_M / padded-Q3_K_S SmolLM2 files, while llama.cpp differs from the emulation by
0.0048 / 0.0066 / 0.033 (bench/parity_floor.py, measured before the attention was emulated too).
The fp16 softmax probabilities were the largest gap left: with them, llama.cpp's distance from the
emulation on tiny random models fell 3x (LLaMA, Qwen3) to 8x (Gemma 3, whose large activations
make the rounding 40x stronger).
"""

from __future__ import annotations

import contextlib

import gguf
import torch

from d2quant.grids.ggml import ggml_types

def vec_dot(weight_type: str) -> tuple[str, int]:
    """(activation block type, its block length) llama.cpp pairs a weight type's matmul with."""
    if weight_type in ("F16", "F32"):
        return weight_type, 1
    kind = ggml_types()[weight_type].vec_dot
    return kind, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]


def round_activations(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """``x`` [..., K] as llama.cpp hands it to a matmul with a ``weight_type`` weight."""
    kind, block = vec_dot(weight_type)
    if kind == "F32":
        return x
    if kind == "F16":
        return x.to(torch.float16).to(x.dtype)
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"{weight_type} weights need rows of a multiple of {block}, got {k}")
    xb = x.float().reshape(*x.shape[:-1], k // block, block)
    if kind == "Q8_K":
        peak = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))  # signed
        iscale = torch.where(peak != 0, -127.0 / peak, torch.zeros_like(peak))
        q = torch.round(xb * iscale).clamp(max=127)
        d = torch.where(peak != 0, 1.0 / iscale, torch.zeros_like(peak))
    else:  # Q8_0 / Q8_1
        amax = xb.abs().amax(-1, keepdim=True)
        inv = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
        q = torch.round(xb * inv)
        d = (amax / 127.0).to(torch.float16).float()
    return (q * d).reshape(x.shape).to(x.dtype)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(t.dtype)


def llamacpp_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                       softcap=None, sliding_window=None, **_):
    """Attention as llama.cpp's CPU backend computes it: q and k after RoPE and v in fp16 (the fp16
    KV cache and the fp16 queries that meet it), scores and softmax in float32, the probabilities
    rounded to fp16 for the product with fp16 values (a transformers attention function)."""
    q, k, v = _fp16(query), _fp16(key), _fp16(value)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    w = (q @ k.transpose(2, 3)) * (module.head_dim ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is None:  # transformers left it to the function: causal, maybe windowed
        s_q, s_k = w.shape[-2:]
        attention_mask = torch.ones(s_q, s_k, dtype=torch.bool, device=w.device).tril(s_k - s_q)
        if sliding_window:
            attention_mask &= ~torch.ones_like(attention_mask).tril(s_k - s_q - sliding_window)
    mask = attention_mask[..., :k.shape[-2]]
    w = w.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else w + mask
    p = _fp16(torch.softmax(w.float(), -1))
    return (p @ v).transpose(1, 2).contiguous(), p


_ATTENTION = "d2export_llamacpp"


def gelu_fp16_table(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's CPU GELU (tanh form) with GGML_GELU_FP16: the value of a 65536-entry fp16 table
    at fp16(x), whose entries are fp16(gelu(fp16 value)); 0 below -10, x above 10."""
    f = x.to(torch.float16).float()
    g = (0.5 * f * (1.0 + torch.tanh(0.7978845608028654 * f * (1.0 + 0.044715 * f * f)))).to(torch.float16).float()
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, g.to(x.dtype)))


@contextlib.contextmanager
def emulate_llamacpp(model: torch.nn.Module, weight_types: dict[str, str], gelu_modules: tuple[str, ...] = ()):
    """Within the block, ``model`` (a transformers decoder) rounds like llama.cpp's CPU backend.

    ``weight_types`` maps module names (``model.layers.0.mlp.down_proj``, ``lm_head``) to the GGML
    type of that weight in the file. A transformers model also attends as llama.cpp does
    (:func:`llamacpp_attention`). The modules named by ``gelu_modules`` (path endings of a GELU-tanh
    gate's activation) compute it through llama.cpp's fp16 table (:func:`gelu_fp16_table`).
    """
    modules = dict(model.named_modules())
    handles = []
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    try:
        if config is not None:
            from transformers import AttentionInterface

            AttentionInterface.register(_ATTENTION, llamacpp_attention)
            model.set_attn_implementation(_ATTENTION)
        for name, wtype in weight_types.items():
            mod = modules.get(name)
            if mod is None:
                raise KeyError(f"no module {name} in the model")
            handles.append(mod.register_forward_pre_hook(
                lambda _m, args, t=wtype: (round_activations(args[0], t), *args[1:])))
        for name, mod in modules.items():
            if gelu_modules and name.endswith(gelu_modules):
                handles.append(mod.register_forward_hook(lambda _m, args, _out: gelu_fp16_table(args[0])))
        yield model
    finally:
        for h in handles:
            h.remove()
        if attn is not None:
            model.set_attn_implementation(attn)


@contextlib.contextmanager
def nudge_embeddings(model: torch.nn.Module, rel: float = 1e-7, seed: int = 0):
    """Within the block the embedding table is multiplied by (1 + rel * N(0, 1)), about one float32
    ulp; restored exactly afterwards. Under :func:`emulate_llamacpp` this shows how far last-bit
    arithmetic differences alone carry a model through 8-bit rounding."""
    emb = model.get_input_embeddings().weight
    saved = emb.detach().clone()
    noise = torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            emb.mul_(1 + rel * noise.to(emb.dtype))
        yield model
    finally:
        with torch.no_grad():
            emb.copy_(saved)
