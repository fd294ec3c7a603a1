"""The quantized model: integer codes + grid parameters + folded biases, one object.

It is the contract between calibration and the converters: converters read only this object
(or the checkpoint it saves). ``to_torch()`` rebuilds a transformers model whose weights are
exactly the dequantized codes — the model we evaluate and the reference for runtime parity.

Tensor names follow transformers' LLaMA-family module names ("model.layers.3.mlp.down_proj").
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from d2quant.errors import D2Error
from d2quant.families import Family, family, family_of_hf
from d2quant.grids import Grid, Params


@dataclass
class ModelSpec:
    """Architecture facts every stage needs; ``hf_config`` rebuilds the transformers model."""

    arch: str  # the family's name (d2quant.families): llama | mistral | qwen2 | qwen3 | gemma3 | phi3
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    max_positions: int
    hf_config: dict = field(repr=False)

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelSpec":
        # a config made from a GGUF file has no `architectures`; its model_type names the family
        archs = getattr(cfg, "architectures", None) or []
        fam = family_of_hf(archs, cfg.model_type)
        if not archs:
            archs = cfg.architectures = [fam.hf_classes[0]]
        arch = fam.name
        rope = getattr(cfg, "rope_parameters", None) or {}
        rope = rope.get("full_attention", rope)  # per layer type (Gemma 3): the global layers' base
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return cls(
            arch=arch, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            ffn=cfg.intermediate_size, vocab=cfg.vocab_size, rope_theta=float(theta),
            rms_eps=float(cfg.rms_norm_eps), tie_embeddings=bool(cfg.tie_word_embeddings),
            max_positions=int(getattr(cfg, "max_position_embeddings", 2048)),
            hf_config=cfg.to_dict())

    @property
    def family(self) -> type[Family]:
        return family(self.arch)

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """[N out, K in] of every weight matrix by transformers name (embeddings as [vocab, hidden];
        a tied lm_head is the embedding table, not a matrix of its own)."""
        shapes = {"model.embed_tokens": (self.vocab, self.hidden)}
        per_layer = self.family.linear_shapes(self)
        for i in range(self.layers):
            shapes |= {f"model.layers.{i}.{path}": shape for path, shape in per_layer.items()}
        if not self.tie_embeddings:
            shapes["lm_head"] = (self.vocab, self.hidden)
        return shapes

    @property
    def n_params(self) -> int:
        """Real parameters: the matrices (tied embeddings once) plus the norm weights."""
        return sum(n * k for n, k in self.matrix_shapes().values()) + self.family.norm_count(self)

    def hf(self):
        from transformers import AutoConfig

        d = dict(self.hf_config)
        model_type = d.pop("model_type")
        return AutoConfig.for_model(model_type, **d)


@dataclass
class QuantizedLinear:
    grid: Grid
    codes: torch.Tensor  # int16 [N, K]
    params: Params  # stacked over groups: [N or 1, G, ...]
    bias: torch.Tensor | None = None  # float32 [N]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def weight(self) -> torch.Tensor:
        return self.grid.dequantize_matrix(self.codes, self.params)


@dataclass
class QuantizedModel:
    spec: ModelSpec
    linears: dict[str, QuantizedLinear]
    tensors: dict[str, torch.Tensor]  # everything kept in float: embeddings, norms, lm_head
    recipe: dict  # how it was made (QuantConfig as dict)
    report: dict = field(default_factory=dict)  # per-layer errors, DAC shifts, timings
    source: dict = field(default_factory=dict)  # {"kind": "gguf"|"hf", "path": ...}
    tokenizer: object | None = None  # a transformers tokenizer

    @classmethod
    def unquantized(cls, src) -> "QuantizedModel":
        """The source model as is, every weight in float: the baseline the writers export as F32."""
        tensors = {n: p.detach().float().clone() for n, p in src.model.named_parameters()}
        return cls(spec=src.spec, linears={}, tensors=tensors, recipe={"method": "float"},
                   source=dict(src.info), tokenizer=src.tokenizer)

    def tensor(self, name: str) -> torch.Tensor:
        """A float tensor or a quantized linear's bias: ``lm_head.bias`` (DAC's final-norm shift)
        lives in ``tensors`` beside a float head and on the linear of a quantized one."""
        if name in self.tensors:
            return self.tensors[name]
        owner, _, kind = name.rpartition(".")
        bias = self.linears[owner].bias if kind == "bias" and owner in self.linears else None
        if bias is None:
            raise KeyError(name)
        return bias

    def without(self, names: set[str]) -> "QuantizedModel":
        """This model lacking the named float tensors and linear biases (what a file that could not
        carry them holds)."""
        linears = {n: replace(ql, bias=None) if f"{n}.bias" in names else ql for n, ql in self.linears.items()}
        return replace(self, linears=linears, tensors={k: v for k, v in self.tensors.items() if k not in names})

    # ---- torch ---------------------------------------------------------------------------
    def to_torch(self, dtype: torch.dtype = torch.float32):
        """A transformers model whose linear weights are exactly the dequantized codes."""
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        cfg = self.spec.hf()
        # uninitialised weights (replaced below) but real buffers: rotary tables, embedding scales
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        state = {k: v.to(dtype) for k, v in self.tensors.items() if not k.startswith("lm_head.")}
        model.load_state_dict(state, strict=False, assign=True)
        for name, ql in self.linears.items():  # an embedding is set the same way as a linear
            set_linear(model, name, ql.weight().to(dtype), ql.bias)
        if "lm_head" not in self.linears:
            if "lm_head.weight" in self.tensors or "lm_head.bias" in self.tensors:
                w = self.tensors.get("lm_head.weight")
                w = model.model.embed_tokens.weight.detach() if w is None else w.to(dtype)
                set_linear(model, "lm_head", w, self.tensors.get("lm_head.bias"))
            elif self.spec.tie_embeddings:
                model.lm_head.weight = model.model.embed_tokens.weight
        missing = sorted(set(dict(model.named_parameters())) - {f"{n}.weight" for n in self.linears}
                         - {f"{n}.bias" for n in self.linears} - set(self.tensors) - {"lm_head.weight"})
        if missing:
            raise D2Error(f"quantized model lacks tensors {missing[:3]}...; the checkpoint is incomplete")
        return model.eval()

    # ---- checkpoint ----------------------------------------------------------------------
    def manifest(self) -> dict:
        return {"spec": asdict(self.spec), "tensors": list(self.tensors), "recipe": self.recipe,
                "report": self.report, "source": self.source}

    def save(self, out_dir: str | Path, force: bool = False) -> Path:
        """Write the checkpoint (d2quant.checkpoint), layer by layer as calibration does."""
        from d2quant.checkpoint import CheckpointWriter

        out = Path(out_dir)
        check_output(out, force)
        writer = CheckpointWriter(out, "", force=force)
        try:
            rest_l, rest_t = dict(self.linears), dict(self.tensors)
            for i in range(self.spec.layers):
                p = f"model.layers.{i}."
                mine = lambda d: {n: d.pop(n) for n in [n for n in d if n.startswith(p)]}  # noqa: E731
                writer.layer(i, mine(rest_l), mine(rest_t), {}, None)
            return writer.finish(rest_l, rest_t, self.manifest(), self.tokenizer)
        except BaseException:
            writer.abandon()
            raise

    @classmethod
    def load(cls, path: str | Path) -> "QuantizedModel":
        """A checkpoint; its linears are read from disk when asked for (d2quant.checkpoint)."""
        from d2quant.checkpoint import read_checkpoint

        path = Path(path)
        manifest, linears, tensors = read_checkpoint(path)
        tokenizer = None
        if (path / "tokenizer").is_dir():
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        return cls(spec=ModelSpec(**manifest["spec"]), linears=linears, tensors=tensors,
                   recipe=manifest["recipe"], report=manifest.get("report", {}),
                   source=manifest.get("source", {}), tokenizer=tokenizer)


def check_output(out: Path, force: bool) -> None:
    """Fail before any work when an output cannot be written where it was asked for."""
    if out.exists() and not force:
        raise D2Error(f"output {out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise D2Error(f"output folder {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise D2Error(f"cannot write to {out.parent}; choose a writable output path")


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def set_linear(model: torch.nn.Module, name: str, weight: torch.Tensor,
               bias: torch.Tensor | None) -> None:
    """Put weight (and bias, adding one if the module has none) into the nn.Linear at ``name``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    n, k = weight.shape
    if bias is not None and getattr(old, "bias", None) is None:
        new = torch.nn.Linear(k, n, bias=True, device="meta")
        setattr(parent, attr, new)
        old = new
    old.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        old.bias = torch.nn.Parameter(bias.to(weight.dtype).contiguous(), requires_grad=False)
    elif getattr(old, "bias", None) is not None:  # a bias the model has but the quantized one lacks
        old.bias = torch.nn.Parameter(torch.zeros(n, dtype=weight.dtype), requires_grad=False)
