"""llama.cpp's type presets (``--type Q3_K_M`` ...) as per-tensor GGML types.

The rules restate ``llama_tensor_get_type_impl`` and ``tensor_type_fallback`` of
src/llama-quant.cpp in the llama.cpp that llama-cpp-python 0.3.36 vendors, for the dense
(non-MoE) LLaMA-family models we export, without an importance matrix. Matching them tensor by
tensor is what makes a comparison with ``llama-quantize`` one at equal file size.

Facts from that source that shape the code:

* Layer-dependent rules count tensors in file order, which for our models is the layer index:
  attn_v and ffn_down of layer i are the i-th of ``n_layers`` such tensors.
* ``output.weight`` (and ``token_embd.weight`` when tied, since it then *is* the output) gets Q6_K,
  or Q8_0 when the preset is Q8_0 or the row length is not a multiple of the preset's block.
  An untied ``token_embd`` keeps the preset's base type.
* A row length (input features, GGML ``ne[0]``) that is not a multiple of the chosen type's block
  falls back (each type's ``fallback``): Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K ->
  Q8_0; IQ types -> IQ4_NL; and to F16 when even 32 does not divide it.
* The IQ presets follow the rules llama.cpp applies *with* an importance matrix (it refuses most of
  them without one; our calibration is the importance): IQ3_XXS keeps IQ3_XXS on attn_v and its
  base type on ffn_down, IQ4_NL / IQ4_XS do not raise the first ffn_down layers.
* The "70B" rule (attn_v Q3_K/Q4_K -> Q5_K) applies to 80-layer models with grouped-query
  attention, as llama.cpp classifies them for the llama and qwen2 architectures.
* A fused attn_qkv (Phi-3) is counted and typed as attn_v (category_is_attn_v); a fused ffn_up
  follows the ffn_up rules (none in these presets).

Not modelled: the Q4_0 preset's ffn_down bump to Q4_1 that llama.cpp makes only when given an
importance matrix, MoE and Falcon rules, and user overrides (--tensor-type, --output-tensor-type).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from d2quant.errors import D2Error
from d2quant.grids.ggml import ggml_grid  # (also registers the GGML grid kinds the specs name)
from d2quant.qmodel import ModelSpec

DEFAULT_PRESET = "Q3_K_M"  # what `d2export gguf` makes with no --type
# preset -> the GGML type its tensors get unless a rule says otherwise (llama-quant.cpp's
# default_type_for_ftype)
_BASE = {"Q2_K": "q2_k", "Q3_K_S": "q3_k", "Q3_K_M": "q3_k", "Q3_K_L": "q3_k", "Q4_K_S": "q4_k",
         "Q4_K_M": "q4_k", "Q5_K_M": "q5_k", "Q6_K": "q6_k", "Q4_0": "q4_0", "Q8_0": "q8_0",
         "Q2_K_S": "q2_k", "IQ2_XXS": "iq2_xxs", "IQ2_XS": "iq2_xs", "IQ2_S": "iq2_xs", "IQ2_M": "iq2_s",
         "IQ3_XXS": "iq3_xxs", "IQ3_XS": "iq3_s", "IQ3_S": "iq3_s", "IQ3_M": "iq3_s", "IQ4_NL": "iq4_nl",
         "IQ4_XS": "iq4_xs", "IQ1_S": "iq1_s", "IQ1_M": "iq1_m"}
PRESETS = tuple(_BASE)
# the presets whose small tensors llama.cpp keeps in a 2-bit or IQ3_S type (its IQ2 / IQ1 branch)
_IQ2 = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")
_IQ1 = ("IQ1_S", "IQ1_M")
_IQ2_HIGH = ("IQ2_S", "IQ2_M")  # ... which raise them to IQ3_S instead of Q2_K


# "float" marks a tensor llama.cpp would leave unquantized (F16): its rows fit no block type.
FLOAT = "float"


def block_size(kind: str) -> int:
    return ggml_grid(kind).block


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get a larger type: the first and last eighth, and every
    third layer in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _attn_v(preset: str, base: str, i: int, n: int, gqa: int, is_70b: bool) -> str:
    if preset in _IQ2:
        return "q4_k" if gqa >= 4 else "iq3_s" if preset in _IQ2_HIGH else "q2_k"
    t = base
    if preset == "Q2_K":
        t = "q4_k" if gqa >= 4 else "q3_k"
    elif preset in ("Q2_K_S", "IQ3_XXS", "IQ3_XS", "IQ3_S") and gqa >= 4:
        t = "q4_k"
    elif preset == "IQ3_M":
        t = "q4_k"
    elif preset == "Q3_K_M":
        t = "q5_k" if i < 2 else "q4_k"
    elif preset == "Q3_K_L":
        t = "q5_k"
    elif preset in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
        t = "q5_k"
    elif preset in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
        t = "q6_k"
    elif preset == "Q4_K_S" and i < 4:
        t = "q5_k"
    if is_70b and t in ("q3_k", "q4_k"):
        t = "q5_k"
    return t


def _ffn_down(preset: str, base: str, i: int, n: int) -> str:
    if preset in _IQ2:
        return ("iq3_s" if preset in _IQ2_HIGH else "q2_k") if i < n // 8 else base
    if preset == "Q2_K":
        return "q3_k"
    if preset == "Q2_K_S":
        return "q4_k" if i < n // 8 else base
    if preset == "Q3_K_M":
        return "q5_k" if i < n // 16 else "q4_k"
    if preset == "IQ3_M" and i < n // 8:
        return "q4_k"
    if preset == "Q3_K_L":
        return "q5_k"
    if preset in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
        return "q6_k"
    if preset == "Q4_K_S" and i < n // 8:
        return "q5_k"
    return base


def _attn_output(preset: str, base: str) -> str:
    if preset in _IQ2:
        return "iq3_s" if preset in _IQ2_HIGH else "iq2_xxs" if preset in _IQ1 else base
    return {"Q2_K": "q3_k", "IQ3_XXS": "iq3_s", "Q3_K_M": "q4_k", "Q3_K_L": "q5_k", "IQ3_M": "q4_k"}.get(preset, base)


def _attn_q_k(preset: str, base: str) -> str:
    return {"IQ3_XS": "iq3_xxs", "IQ3_XXS": "iq2_s"}.get(preset, base)


def _ffn_gate_up(preset: str, base: str, i: int, n: int) -> str:
    return "iq3_xxs" if preset == "IQ3_XS" and n // 8 <= i < 7 * n // 8 else base


def _output(preset: str, base: str, n_cols: int) -> str:
    if n_cols % block_size(base) != 0 or base == "q8_0":
        return "q8_0"
    return "q5_k" if preset in (*_IQ2, "IQ3_XXS") else "q6_k"


def _token_embd(preset: str, base: str) -> str:
    """An untied token embedding (a tied one is the output tensor)."""
    if preset in ("IQ2_XXS", "IQ2_XS", *_IQ1):
        return "q2_k"
    return "iq3_s" if preset in (*_IQ2_HIGH, "IQ3_XXS") else base


def _fit_rows(kind: str, n_cols: int) -> str:
    if n_cols % block_size(kind) == 0:
        return kind
    kind = ggml_grid(kind).fallback or kind
    return kind if n_cols % block_size(kind) == 0 else FLOAT


def _is_70b(spec: ModelSpec) -> bool:
    """llama.cpp's LLM_TYPE_70B, as its llama and qwen2 loaders classify 80-layer GQA models."""
    return (spec.family.gguf_archs[0] in ("llama", "qwen2") and spec.layers == 80
            and spec.heads != spec.kv_heads)


def preset_types(preset: str, spec: ModelSpec) -> dict[str, str]:
    """GGML type kind ("q3_k", ..., or FLOAT) of every weight matrix, by transformers name.

    With tied embeddings there is no ``lm_head`` entry: the file's token_embd serves both and
    gets the output tensor's type, as llama.cpp does.
    """
    if preset not in _BASE:
        raise D2Error(f"unknown GGUF type {preset!r}; choose one of {', '.join(PRESETS)}")
    base, n = _BASE[preset], spec.layers
    gqa = spec.heads // spec.kv_heads
    out: dict[str, str] = {}
    fam = spec.family
    for name, (_, k) in spec.matrix_shapes().items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        role = fam.role_of(name.split(".", 3)[3]) if layer >= 0 else None
        if name == "lm_head" or (name == "model.embed_tokens" and spec.tie_embeddings):
            t = _output(preset, base, k)
        elif name == "model.embed_tokens":
            t = _token_embd(preset, base)
        elif role in ("attn_v", "attn_qkv"):  # llama-quant.cpp counts a fused qkv as attn_v
            t = _attn_v(preset, base, layer, n, gqa, _is_70b(spec))
        elif role == "ffn_down":
            t = _ffn_down(preset, base, layer, n)
        elif role == "attn_output":
            t = _attn_output(preset, base)
        elif role in ("attn_q", "attn_k"):
            t = _attn_q_k(preset, base)
        else:  # gate, up (and a fused gate_up)
            t = _ffn_gate_up(preset, base, layer, n)
        out[name] = _fit_rows(t, k)
    return out


def preset_grids(preset: str, spec: ModelSpec) -> dict[str, dict | None]:
    """Grid spec per weight matrix ({"kind": "q3_k"}), or None where the tensor stays float."""
    return {name: None if t == FLOAT else {"kind": t}
            for name, t in preset_types(preset, spec).items()}


# ---- size -------------------------------------------------------------------------------------

def tensor_nbytes(kind: str, n_rows: int, n_cols: int) -> int:
    """Bytes a [n_rows, n_cols] matrix takes in a GGML type (FLOAT counts as F16)."""
    if kind == FLOAT:
        return 2 * n_rows * n_cols
    grid = ggml_grid(kind)
    blk, nbytes = grid.block, grid.block_bytes
    if n_cols % blk:
        raise D2Error(f"a row of {n_cols} values does not fit {kind.upper()} blocks of {blk}")
    return n_rows * (n_cols // blk) * nbytes


@dataclass(frozen=True)
class SizeEstimate:
    nbytes: int  # tensor data bytes, metadata excluded
    n_params: int
    bits_per_weight: float
    types: dict[str, int]  # tensors per GGML type


def preset_size(preset: str, spec: ModelSpec, real_params: int | None = None) -> SizeEstimate:
    """Tensor bytes of a preset on this model; norms counted as F32, biases ignored.

    ``real_params``: divide by this count instead (e.g. the unpadded model's parameters when
    measuring a zero-padded copy), so padded zeros do not lower the reported bits per weight.
    """
    shapes = spec.matrix_shapes()
    types = preset_types(preset, spec)
    nbytes = sum(tensor_nbytes(types[k], *shapes[k]) for k in shapes)
    nbytes += 4 * (spec.n_params - sum(n * k for n, k in shapes.values()))
    n = real_params or spec.n_params
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return SizeEstimate(nbytes, n, 8 * nbytes / n, counts)


def file_bits_per_weight(path, real_params: int | None = None) -> float:
    """Bits per weight of a GGUF file: all tensor data bytes over the parameters.

    Counts every tensor the file holds (biases and norms included); pass ``real_params`` to divide
    by the real model's parameters instead of the file's element count.
    """
    reader = gguf.GGUFReader(str(path))
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    n = real_params or sum(int(t.n_elements) for t in reader.tensors)
    return 8 * nbytes / n
