"""A model family: everything that differs between decoder architectures, in one class.

Like llama.cpp's converter classes (one per architecture) and GPTQModel's ``module_tree``, each
family is one subclass that registers itself by the transformers class names it serves. The
pipeline, rotation, padding, GGUF presets and writer and the ONNX builder ask the family and
never branch on a family's name:

* the module tree of a decoder layer: its linears in calibration order, grouped by the input
  they read (q/k/v share the attention norm's output, gate/up the MLP norm's), fused or not;
* the norms: which one feeds attention, which feeds the MLP (DAC's site), optional norms on the
  branch outputs (Gemma 3), per-head q/k norms, and the norm's weight offset (Gemma computes
  x * (1 + w));
* DSQ's fold: which rows absorb down_proj's input-column scale (up_proj, or the up half of a fused
  gate_up_proj);
* whether rotation applies (it needs norms that commute with an orthogonal map);
* per layer: the attention window and which rotary table it reads;
* the formats' names for the same parts: llama.cpp's tensor role of every module (the GGUF name
  inside ``blk.N.``, which is also the canonical role the presets and the ONNX builder use), the
  llama.cpp architectures that can carry the family (first that loads every tensor wins), and
  onnxruntime-genai's model type. These are facts, not format code: the converters read them.

Adding a family is one module here (and a tiny random model in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from d2quant.errors import D2Error

_BY_HF_CLASS: dict[str, type["Family"]] = {}
_BY_NAME: dict[str, type["Family"]] = {}


@dataclass(frozen=True)
class Linear:
    """One linear of a decoder layer: its module path inside the layer and llama.cpp's role."""

    path: str  # "self_attn.q_proj"
    role: str  # "attn_q" (the GGUF name inside blk.N.)


class Family:
    """The LLaMA block; families differ by overriding class attributes and a few methods."""

    name: ClassVar[str] = ""  # spec.arch
    hf_classes: ClassVar[tuple[str, ...]] = ()
    model_type: ClassVar[str] = ""  # transformers' config.model_type
    gguf_model_types: ClassVar[tuple[str, ...]] = ()  # other model_types transformers gives it
    genai_type: ClassVar[str] = ""  # onnxruntime-genai's model type
    gguf_archs: ClassVar[tuple[str, ...]] = ()  # llama.cpp architectures that can hold it, preferred first

    # module tree, in calibration order; each group reads one input (one Hessian)
    qkv: ClassVar[tuple[Linear, ...]] = (Linear("self_attn.q_proj", "attn_q"),
                                         Linear("self_attn.k_proj", "attn_k"),
                                         Linear("self_attn.v_proj", "attn_v"))
    o: ClassVar[Linear] = Linear("self_attn.o_proj", "attn_output")
    gate_up: ClassVar[tuple[Linear, ...]] = (Linear("mlp.gate_proj", "ffn_gate"), Linear("mlp.up_proj", "ffn_up"))
    down: ClassVar[Linear] = Linear("mlp.down_proj", "ffn_down")
    # norms (module paths inside the layer)
    attn_norm: ClassVar[str] = "input_layernorm"  # its output feeds q/k/v
    mlp_norm: ClassVar[str] = "post_attention_layernorm"  # its output feeds gate/up: DAC's site
    attn_post_norm: ClassVar[str | None] = None  # applied to the attention output before the residual
    mlp_post_norm: ClassVar[str | None] = None  # applied to the MLP output before the residual
    qk_norms: ClassVar[tuple[str, str] | None] = None  # per-head RMSNorms of q and k before RoPE
    norm_offset: ClassVar[float] = 0.0  # the norm computes x / rms(x) * (norm_offset + w)
    activation: ClassVar[str] = "silu"  # of the gate: silu | gelu_tanh
    activation_module: ClassVar[str] = "mlp.act_fn"  # the module that applies it
    rotation: ClassVar[bool] = True  # plain RMSNorms (offset 0) whose outputs feed only linears

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            _BY_NAME[cls.name] = cls
            for c in cls.hf_classes:
                _BY_HF_CLASS[c] = cls

    # ---- the module tree -------------------------------------------------------------------
    @classmethod
    def layer_linears(cls) -> tuple[Linear, ...]:
        return (*cls.qkv, cls.o, *cls.gate_up, cls.down)

    @classmethod
    def input_sites(cls) -> dict[str, str]:
        """One module path per distinct linear input of the layer (one Hessian each), by site."""
        return {"qkv": cls.qkv[0].path, "o": cls.o.path, "gate_up": cls.gate_up[0].path, "down": cls.down.path}

    @classmethod
    def layer_norms(cls) -> dict[str, str]:
        """Norm module path inside the layer -> llama.cpp role."""
        out = {cls.attn_norm: "attn_norm", cls.mlp_norm: "ffn_norm"}
        if cls.attn_post_norm:
            out[cls.attn_post_norm] = "post_attention_norm"
        if cls.mlp_post_norm:
            out[cls.mlp_post_norm] = "post_ffw_norm"
        if cls.qk_norms:
            out |= {cls.qk_norms[0]: "attn_q_norm", cls.qk_norms[1]: "attn_k_norm"}
        return out

    @classmethod
    def role_of(cls, path: str) -> str | None:
        """llama.cpp role of a module path inside a layer ("mlp.down_proj" -> "ffn_down")."""
        for lin in cls.layer_linears():
            if lin.path == path:
                return lin.role
        return cls.layer_norms().get(path)

    @classmethod
    def up_rows(cls, ffn: int) -> tuple[str, slice]:
        """The linear (path) and rows whose outputs multiply down_proj's input channels 0..ffn-1."""
        return "mlp.up_proj", slice(0, ffn)

    @classmethod
    def linear_shapes(cls, spec) -> dict[str, tuple[int, int]]:
        """[N out, K in] of the linears of one layer, by path."""
        q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        return {"self_attn.q_proj": (q, spec.hidden), "self_attn.k_proj": (kv, spec.hidden),
                "self_attn.v_proj": (kv, spec.hidden), "self_attn.o_proj": (spec.hidden, q),
                "mlp.gate_proj": (spec.ffn, spec.hidden), "mlp.up_proj": (spec.ffn, spec.hidden),
                "mlp.down_proj": (spec.hidden, spec.ffn)}

    # ---- per layer ---------------------------------------------------------------------------
    @classmethod
    def layer_types(cls, cfg: dict, n_layers: int) -> list[str]:
        """Per layer: "full_attention" or "sliding_attention" (transformers' names)."""
        types = cfg.get("layer_types")
        if types and cfg.get("sliding_window"):
            return list(types)
        return ["full_attention"] * n_layers

    @classmethod
    def sliding_windows(cls, cfg: dict, n_layers: int) -> list[int | None]:
        """Per layer: tokens a query attends to (itself included), or None for the whole context."""
        window = cfg.get("sliding_window")
        return [window if t == "sliding_attention" else None for t in cls.layer_types(cfg, n_layers)]

    @classmethod
    def rope_thetas(cls, cfg: dict, n_layers: int, theta: float) -> list[float]:
        """Per layer: the RoPE base its rotary table uses."""
        return [theta] * n_layers

    @classmethod
    def position_embeddings(cls, inner, x, pos, layer_type: str):
        """(cos, sin) for the layers of ``layer_type`` from the model's rotary module."""
        return inner.rotary_emb(x, pos)

    @classmethod
    def attention_scale(cls, spec) -> float:
        return spec.head_dim ** -0.5

    @classmethod
    def embed_scale(cls, spec) -> float:
        """The factor the embedding lookup multiplies by (Gemma: sqrt(hidden))."""
        return 1.0

    @classmethod
    def norm_count(cls, spec) -> int:
        """Norm weight values of the whole model (for parameter counts)."""
        per_layer = spec.hidden * (2 + bool(cls.attn_post_norm) + bool(cls.mlp_post_norm))
        if cls.qk_norms:
            per_layer += 2 * spec.head_dim
        return per_layer * spec.layers + spec.hidden


def family_of_hf(arch_names: list[str], model_type: str | None = None) -> type[Family]:
    """The family of a transformers model by its ``architectures``, or by ``model_type`` when
    there are none (a config made from a GGUF file)."""
    for a in arch_names:
        if a in _BY_HF_CLASS:
            return _BY_HF_CLASS[a]
    for fam in _BY_NAME.values():
        if not arch_names and model_type and model_type in (fam.model_type, *fam.gguf_model_types):
            return fam
    raise D2Error(f"unsupported architecture {arch_names or model_type!r}; supported: "
                  f"{', '.join(supported_hf_classes())}")


def family(name: str) -> type[Family]:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise D2Error(f"unknown model family {name!r}; known: {', '.join(_BY_NAME)}") from None


def supported_hf_classes() -> list[str]:
    return list(_BY_HF_CLASS)


def families() -> list[type[Family]]:
    return list(_BY_NAME.values())
