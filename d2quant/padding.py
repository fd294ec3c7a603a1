"""Zero-padding a LLaMA-family model to a wider hidden size, computing exactly the same function.

Why: K-quants need rows of a multiple of 256 weights. SmolLM2's hidden size 576 is not one, so
llama.cpp falls back to 32-block types on most tensors; padding it to 768 gives a model on which
every linear can hold a K-quant, to measure quantizers on them (DESIGN.md §6, "256-aligned testbed").

Construction (hidden H -> H', ratio r = H / H'):

* the residual stream gets H' - H channels that stay zero: embedding columns, o_proj and down_proj
  output rows, and the matching input columns of q/k/v/gate/up are zero;
* RMSNorm divides by sqrt(mean(x^2) + eps); with the zero channels the mean over H' is r times the
  mean over H, so eps becomes r * eps and the norm weights w * sqrt(r) (zero on padded channels):
  w sqrt(r) x / sqrt(r mean_H(x^2) + r eps) = w x / sqrt(mean_H(x^2) + eps);
* query heads grow with the same ratio (so o_proj's input, heads * head_dim, is also padded) and
  key/value heads with them, keeping the query/kv group size: the added heads are appended and
  all-zero, so their queries score every key 0, attend to all-zero values and add nothing through
  o_proj's zero columns; head_dim is unchanged, so RoPE and the attention scale are too;
* optionally the MLP width: zero gate/up rows give silu(0) * 0 = 0 into zero down_proj columns.

Exact for LLaMA, Mistral and Qwen2 (up to float rounding). Qwen3's per-head q/k RMSNorms share the
model's rms_norm_eps, which is scaled too: they differ by the eps change relative to a head's mean
square (~1e-6 / |q|^2), far below float noise for real activations.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from d2quant.errors import D2Error
from d2quant.families import family_of_hf


@dataclass(frozen=True)
class PadShape:
    hidden: int
    hidden_to: int
    heads: int
    heads_to: int
    kv_heads: int
    kv_to: int
    head_dim: int
    ffn: int
    ffn_to: int

    @property
    def ratio(self) -> float:
        return self.hidden / self.hidden_to


def pad_shape(config, hidden_to: int, heads_to: int | None = None,
              ffn_to: int | None = None) -> PadShape:
    """The padded sizes for a transformers LLaMA-family config (see the module doc)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    ffn = config.intermediate_size
    if hidden_to < hidden:
        raise D2Error(f"cannot pad hidden size {hidden} down to {hidden_to}; give a larger size")
    if heads_to is None:
        heads_to, rem = divmod(heads * hidden_to, hidden)
        if rem:
            raise D2Error(f"padding hidden {hidden} to {hidden_to} scales {heads} heads to a fraction; "
                          "pass heads_to explicitly")
    group = heads // kv
    if heads_to < heads or heads_to % group:
        raise D2Error(f"heads_to={heads_to} must be >= {heads} and a multiple of the query/kv group "
                      f"size {group}")
    ffn_to = ffn if ffn_to is None else ffn_to
    if ffn_to < ffn:
        raise D2Error(f"cannot pad the MLP width {ffn} down to {ffn_to}")
    return PadShape(hidden, hidden_to, heads, heads_to, kv, heads_to // group, head_dim, ffn, ffn_to)


def _pad(t: torch.Tensor, *sizes: int) -> torch.Tensor:
    """t zero-padded at the end of each axis to ``sizes``."""
    out = t.new_zeros(sizes)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


_NORMS = ("attn_norm", "ffn_norm")
# llama.cpp role -> (rows, cols) of the padded matrix, as attributes of PadShape
_MATRICES = {"attn_q": ("q_to", "hidden_to"), "attn_k": ("kv_to", "hidden_to"),
             "attn_v": ("kv_to", "hidden_to"), "attn_output": ("hidden_to", "q_to"),
             "ffn_gate": ("ffn_to", "hidden_to"), "ffn_up": ("ffn_to", "hidden_to"),
             "ffn_down": ("hidden_to", "ffn_to")}


def _role(fam, name: str) -> str:
    """llama.cpp role of a transformers tensor name (its family names the layer's modules)."""
    stem = name.rsplit(".", 1)[0]
    if stem in ("model.embed_tokens", "lm_head"):
        return stem
    if stem == "model.norm":
        return "output_norm"
    parts = stem.split(".", 3)
    role = fam.role_of(parts[3]) if len(parts) == 4 and parts[:2] == ["model", "layers"] else None
    if role is None:
        raise D2Error(f"cannot pad tensor {name}: it is no part padding knows")
    return role


def _padded_tensor(fam, name: str, t: torch.Tensor, s: PadShape) -> torch.Tensor:
    role, kind = _role(fam, name), name.rsplit(".", 1)[1]
    sizes = {"q_to": s.heads_to * s.head_dim, "kv_to": s.kv_to * s.head_dim, "hidden_to": s.hidden_to,
             "ffn_to": s.ffn_to}
    if role in (*_NORMS, "output_norm"):
        return _pad(t * math.sqrt(s.ratio), s.hidden_to)
    if role in ("attn_q_norm", "attn_k_norm"):  # per head_dim, shared by all heads
        return t
    if role in ("model.embed_tokens", "lm_head"):
        return _pad(t, t.shape[0], s.hidden_to) if kind == "weight" else t
    rows, cols = (sizes[a] for a in _MATRICES[role])
    return _pad(t, rows, cols) if kind == "weight" else _pad(t, rows)


def pad_model(model: torch.nn.Module, hidden_to: int = 768, heads_to: int | None = None,
              ffn_to: int | None = None) -> torch.nn.Module:
    """A new transformers model, hidden size ``hidden_to``, computing the same logits as ``model``.

    heads_to: query heads of the padded model (default: scaled with the hidden size, e.g. SmolLM2's
    9 -> 12 at 576 -> 768); kv heads follow, keeping the group size. ffn_to: MLP width (unchanged
    by default). ``model`` is left as it is.
    """
    from transformers import AutoModelForCausalLM

    fam = family_of_hf(model.config.architectures or [], model.config.model_type)
    if fam.norm_offset or fam.attn_post_norm or fam.mlp_post_norm or {lin.role for lin in fam.layer_linears()} - set(_MATRICES):
        raise D2Error(f"padding knows the LLaMA block (unfused linears, plain RMSNorms), not {fam.name}")
    s = pad_shape(model.config, hidden_to, heads_to, ffn_to)
    cfg = copy.deepcopy(model.config)
    cfg.hidden_size, cfg.intermediate_size = s.hidden_to, s.ffn_to
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = s.heads_to, s.kv_to, s.head_dim
    cfg.rms_norm_eps = model.config.rms_norm_eps * s.ratio
    tied = bool(cfg.tie_word_embeddings)
    state = {n: _padded_tensor(fam, n, p.detach().float(), s) for n, p in model.state_dict().items()
             if not (tied and n == "lm_head.weight") and not n.endswith("rotary_emb.inv_freq")}
    with torch.device("meta"):
        new = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    new.load_state_dict(state, strict=False, assign=True)
    if tied:
        new.lm_head.weight = new.model.embed_tokens.weight
    new.model.rotary_emb = type(new.model.rotary_emb)(config=cfg)  # buffers off the meta device
    missing = [n for n, p in [*new.named_parameters(), *new.named_buffers()] if p.is_meta]
    if missing:
        raise D2Error(f"cannot pad {type(model).__name__}: no padded value for {missing[:3]}")
    return new.eval()


def param_count(model: torch.nn.Module) -> int:
    """Parameters of a model, tied tensors once: the 'real' count bits per weight divide by."""
    return sum(p.numel() for p in model.parameters())
