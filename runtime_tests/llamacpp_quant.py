"""llama.cpp's own quantizer as a baseline: ``llama-quantize [--imatrix]`` done in-process.

For every tensor of a preset the float weights go through libggml's ``ggml_quantize_chunk`` (the
call llama-quantize makes, per row, with the same per-tensor types as ``converters.gguf.presets``).
Its bytes are unpacked by our grid of that type into a QuantizedLinear, so the baseline is written
by the same ``write_gguf``, checked by the same parity harness, and differs from our calibration
only in how the codes were chosen.

The importance matrix is what llama-imatrix computes: per weight tensor of a decoder layer, the
mean over calibration tokens of the squared input activation of each input column (x_j^2), taken
on the float model. Like llama-imatrix by default, the output/embedding tensor gets none.

It lives with the runtime tests because it drives the runtime's library (runtime_tests.libggml)
and imports flow from here to converters and d2quant, never back.
"""

from __future__ import annotations

import torch

from converters.gguf.presets import preset_grids
from d2quant import sensitivity
from d2quant.grids import grid_from_spec, round_to_fp16
from d2quant.qmodel import QuantizedLinear, QuantizedModel
from d2quant.sources import Source
from runtime_tests.libggml import quantize_rows

def collect_importance(src: Source, tokens: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """What llama-imatrix collects: the mean squared input per column of every linear of the
    decoder layers ("blk.": not output.weight), on the float model. {linear name: [in_features]}."""
    return sensitivity.collect_importance(src.model, tokens, batch, scope="model.layers.")


def quantize_with_libggml(src: Source, preset: str,
                          importance: dict[str, torch.Tensor] | None = None) -> QuantizedModel:
    """``src`` quantized by llama.cpp's quantizer onto ``preset``'s per-tensor GGML types.

    importance: from ``collect_importance`` (llama-quantize --imatrix), or None (plain llama-quantize).
    ``src.model`` is not modified.
    """
    model = src.model
    linears: dict[str, QuantizedLinear] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in preset_grids(preset, src.spec).items():
        mod = model.get_submodule(name)
        w = mod.weight.detach().float().cpu()
        if spec is None:  # no block type fits the rows: llama.cpp stores F16
            tensors[f"{name}.weight"] = round_to_fp16(w)
            continue
        grid = grid_from_spec(spec)
        imp = None if importance is None else importance.get(name)
        raw = quantize_rows(grid.type_name, w.numpy(), None if imp is None else imp.numpy())
        codes, params = grid.unpack(raw, *w.shape)
        bias = getattr(mod, "bias", None)
        linears[name] = QuantizedLinear(grid, codes, params,
                                        None if bias is None else bias.detach().float().cpu().clone())
    covered = {f"{n}.{k}" for n in linears for k in ("weight", "bias")} | set(tensors)
    for n, p in model.named_parameters():  # a tied lm_head is listed once, as embed_tokens
        if n not in covered:
            tensors[n] = p.detach().float().cpu().clone()
    recipe = {"method": "llamacpp", "preset": preset, "imatrix": importance is not None}
    return QuantizedModel(spec=src.spec, linears=linears, tensors=tensors, recipe=recipe,
                          report={}, source=dict(src.info), tokenizer=src.tokenizer)
