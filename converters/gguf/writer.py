"""QuantizedModel -> GGUF for stock llama.cpp, carrying the calibrated weights bit for bit.

Each quantized linear is written as the GGML block bytes of its own grid (no re-rounding); float
tensors as F32 (1-D) or, when that loses nothing, F16 (2-D). q/k rows (and biases) are permuted
for llama.cpp's interleaved RoPE where the architecture needs it; packed GGML rows are independent,
so permuting the packed rows is the same as permuting codes and parameters.

``lm_head.bias`` (DAC's final-norm shift folded through lm_head): the ``llama`` and ``qwen3``
architectures have no output.bias, and no other tensor can carry a per-token-independent logit
shift, so it is dropped with a warning (``plan_gguf(qm).dropped``); ``verify_gguf`` measures what
dropping it costs. Qwen2 models without ffn biases keep it (the ``qwen2`` architecture has it).
"""

from __future__ import annotations

import json
import os
from collections import Counter
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from converters.gguf.arch import (ArchLayout, choose_layout, extra_tensors, gguf_name, layer_tensors,
                                  required, rope_heads, rope_permutation)
from converters.gguf.blocks import ggml_form, pack_linear
from converters.gguf.presets import FLOAT, PRESETS, preset_types
from d2quant.grids.ggml import ggml_grid
from converters.gguf.tokenizer import add_tokenizer
from d2quant.errors import D2Error
from d2quant.qmodel import QuantizedModel, check_output

_NORM_ROLES = ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm", "attn_q_norm",
               "attn_k_norm", "output_norm")


@dataclass
class GGUFPlan:
    """What write_gguf will write, resolved without packing anything."""

    layout: ArchLayout
    sources: dict[str, str]  # GGUF tensor name -> HF name ("<linear>" for a QuantizedLinear weight)
    types: dict[str, str]  # GGUF tensor name -> GGML type name ("Q4_K", "F32", ...)
    dropped: dict[str, str] = field(default_factory=dict)  # HF name -> why
    notes: list[str] = field(default_factory=list)  # behaviour llama.cpp does not reproduce

    @property
    def warnings(self) -> list[str]:
        return [f"dropped {k}: {why}" for k, why in self.dropped.items()] + self.notes


def _float_type(t: torch.Tensor) -> str:
    if t.dim() == 1:
        return "F32"
    t32 = t.float()
    return "F16" if torch.equal(t32.to(torch.float16).float(), t32) else "F32"


def plan_gguf(qm: QuantizedModel) -> GGUFPlan:
    sources: dict[str, str] = {}
    types: dict[str, str] = {}
    fam = qm.spec.family
    for name, ql in qm.linears.items():
        gname = gguf_name(name + ".weight", fam)
        grid, _, _ = ggml_form(name, ql.grid, ql.codes, ql.params)
        sources[gname], types[gname] = name, grid.type_name
        if ql.bias is not None:
            sources[gguf_name(name + ".bias", fam)] = name + ".bias"
    for name, t in qm.tensors.items():
        gname = gguf_name(name, fam)
        if gname in sources:
            raise D2Error(f"{name} is both a quantized linear and a float tensor; the model is inconsistent")
        sources[gname], types[gname] = name, _float_type(t)
    for gname in sources:
        types.setdefault(gname, "F32")  # biases

    layout = choose_layout(qm.spec, set(sources))
    dropped = {}
    if "output.bias" in sources and not layout.output_bias:
        src = sources.pop("output.bias")
        types.pop("output.bias")
        if torch.count_nonzero(qm.tensor(src)):  # an all-zero bias is dropped at no cost
            dropped[src] = (f"llama.cpp's {layout.name} architecture has no output.bias; the "
                            "final-norm DAC shift is lost (measure its cost with verify_gguf)")
    _check_tensors(qm, layout, set(sources))
    for gname in extra_tensors(qm.spec):
        sources[gname], types[gname] = "<generated>", "F32"
    return GGUFPlan(layout, sources, types, dropped, _sliding_window_notes(qm, layout))


def _sliding_window_notes(qm: QuantizedModel, layout: ArchLayout) -> list[str]:
    windows = [w for w in qm.spec.family.sliding_windows(qm.spec.hf_config, qm.spec.layers)
               if w and w < qm.spec.max_positions]
    if not windows or layout.sliding_window:
        return []
    return [f"llama.cpp's {layout.name} architecture attends to the whole context, not the model's "
            f"{windows[0]}-token sliding window: outputs differ beyond {windows[0]} tokens"]


def _check_tensors(qm: QuantizedModel, layout: ArchLayout, names: set[str]) -> None:
    for i in range(qm.spec.layers):
        have = layer_tensors({n for n in names if n.startswith(f"blk.{i}.")})
        need = required(layout, have)
        if missing := need - have:
            raise D2Error(f"layer {i} lacks {', '.join(sorted(missing))}; the quantized model is incomplete")
        if extra := have - need - layout.optional:
            raise D2Error(f"llama.cpp's {layout.name} architecture cannot load "
                          f"{', '.join(sorted(extra))} (layer {i})")
    for top in ("token_embd.weight", "output_norm.weight"):
        if top not in names:
            raise D2Error(f"the quantized model lacks {top}; it is incomplete")


def _rope_rows(layout: ArchLayout, qm: QuantizedModel, gname: str, arr: np.ndarray) -> np.ndarray:
    role = gname.split(".")[2] if gname.startswith("blk.") else ""
    if not layout.permute_qk or role not in ("attn_q", "attn_k"):
        return arr
    return arr[rope_permutation(arr.shape[0], rope_heads(qm.spec, role))]


def _tensor_data(qm: QuantizedModel, plan: GGUFPlan,
                 gname: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    src = plan.sources[gname]
    if src == "<generated>":
        return extra_tensors(qm.spec)[gname], None
    if src in qm.linears:
        tname, raw = pack_linear(src, qm.linears[src])
        return _rope_rows(plan.layout, qm, gname, raw), gguf.GGMLQuantizationType[tname]
    arr = float_values(qm, plan, gname).numpy()
    if plan.types[gname] == "F16":
        arr = arr.astype(np.float16)
    return np.ascontiguousarray(_rope_rows(plan.layout, qm, gname, arr)), None


def _tensor_info(qm: QuantizedModel, plan: GGUFPlan, gname: str) -> tuple:
    """(shape, numpy dtype, bytes, GGML type or None) of a tensor, as ``_tensor_data`` will give it."""
    src, tname = plan.sources[gname], plan.types[gname]
    if src == "<generated>":
        arr = extra_tensors(qm.spec)[gname]
        return arr.shape, arr.dtype, arr.nbytes, None
    if src in qm.linears:
        rows, cols = qm.spec.matrix_shapes().get(src) or qm.linears[src].shape
        qtype = gguf.GGMLQuantizationType[tname]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return (rows, cols // block * size), np.dtype(np.uint8), rows * (cols // block) * size, qtype
    t = qm.tensor(src)
    dtype = np.dtype(np.float16 if tname == "F16" else np.float32)
    return tuple(t.shape), dtype, t.numel() * dtype.itemsize, None


def float_values(qm: QuantizedModel, plan: GGUFPlan, gname: str) -> torch.Tensor:
    """The float32 values a float tensor (or a linear's bias) is stored with, q/k rows unpermuted.

    A norm of a (1 + w) family is stored as 1 + w, which llama.cpp multiplies by; Gemma's
    query_pre_attn_scalar, which llama.cpp replaces by head_dim, is carried by attn_q_norm.
    """
    src = plan.sources[gname]
    t = qm.tensor(src).detach().cpu().float()
    role = gname.rsplit(".", 2)[-2] if gname.endswith(".weight") else ""
    fam = qm.spec.family
    if fam.norm_offset and role in _NORM_ROLES:
        t = t + fam.norm_offset
    plain = qm.spec.head_dim ** -0.5  # the attention scale llama.cpp applies
    if role == "attn_q_norm" and fam.attention_scale(qm.spec) != plain:
        t = t * (fam.attention_scale(qm.spec) / plain)
    return t


def _order(gname: str) -> tuple:
    """token_embd, then layer by layer, then output_norm and output (convert_hf_to_gguf's order)."""
    if gname.startswith("blk."):
        _, i, rest = gname.split(".", 2)
        role = rest.rsplit(".", 1)[0]
        roles = ["attn_norm", "attn_qkv", "attn_q", "attn_q_norm", "attn_k", "attn_k_norm", "attn_v",
                 "attn_output", "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
                 "post_ffw_norm"]
        return (1, int(i), roles.index(role) if role in roles else len(roles), rest)
    return ({"token_embd.weight": 0, "rope_freqs.weight": 0}.get(gname, 2), 0, 0, gname)


def followed_preset(qm: QuantizedModel, plan: GGUFPlan) -> str | None:
    """The --type preset whose per-tensor types the quantized weights follow exactly, if any."""
    held = {src: plan.types[g] for g, src in plan.sources.items() if src in qm.linears}
    floats = {n.removesuffix(".weight") for n in qm.tensors if n.endswith(".weight")}
    for preset in PRESETS:
        want = preset_types(preset, qm.spec)
        if set(held) <= set(want) and all(held.get(n) == t.upper() if t != FLOAT else n in floats
                                          for n, t in want.items()):
            return preset
    return None


def file_type(qm: QuantizedModel, plan: GGUFPlan) -> gguf.LlamaFileType:
    """llama.cpp's ``general.file_type`` for what the tensors hold: the preset they follow, else
    ``MOSTLY_<type>`` of the type most weights are stored in."""
    preset = followed_preset(qm, plan)
    if preset is not None:
        return gguf.LlamaFileType[f"MOSTLY_{preset}"]
    weights: Counter = Counter()
    for g, src in plan.sources.items():
        if src in qm.linears:
            weights[plan.types[g]] += qm.linears[src].codes.numel()
    if not weights:
        return gguf.LlamaFileType.ALL_F32
    return ggml_grid(weights.most_common(1)[0][0]).file_type


def write_gguf(qm: QuantizedModel, out_path: str | Path, *, force: bool = False,
               preset: str | None = None) -> Path:
    """Write ``qm`` as a GGUF llama.cpp loads; returns the path.

    ``preset``: the --type the model was quantized for; refused unless the tensors follow it.
    ``general.file_type`` is derived from the tensors (``file_type``).
    Dropped tensors (see the module doc) are reported with ``warnings.warn``; ``plan_gguf`` lists
    them without writing.
    """
    out = Path(out_path)
    check_output(out, force)
    plan = plan_gguf(qm)
    if preset is not None:
        if preset not in PRESETS:
            raise D2Error(f"unknown GGUF type {preset!r}; choose one of {', '.join(PRESETS)}")
        if followed_preset(qm, plan) != preset:
            held = file_type(qm, plan).name.removeprefix("MOSTLY_")
            raise D2Error(f"the model's tensors do not follow the {preset} preset (they hold {held}); "
                          f"drop --type to write them as they are, or re-calibrate with --type {preset}")
    for w in plan.warnings:
        warnings.warn(w, stacklevel=2)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, plan.layout.name)
        add_tokenizer(writer, qm)  # first: a GGUF source's general.* fields, then ours on top
        plan.layout.hparams(writer, qm.spec)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(file_type(qm, plan))
        writer.add_string("general.quantized_by", "d2export")
        writer.add_string("d2export.recipe", json.dumps(qm.recipe, sort_keys=True, default=str))
        names = sorted(plan.sources, key=_order)
        for gname in names:  # the directory first, from shapes alone
            writer.add_tensor_info(gname, *_tensor_info(qm, plan, gname))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gname in names:  # then each tensor packed and written in turn, never all at once
            writer.write_tensor_data(_tensor_data(qm, plan, gname)[0])
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
