"""Transformers models quantized RTN into a QuantizedModel, for format and parity tests.

Tiny random models cover architectures cheaply; ``rtn_quantized_model`` also takes a real model
(the slow tests use SmolLM2). The calibration pipeline is not involved: these prove the writers.
"""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config,
                          Qwen2Config, Qwen3Config)

from d2quant.families import family_of_hf
from d2quant.grids import ResidualBinaryGrid, UniformGrid, strip_col_scale
from d2quant.qmodel import ModelSpec, QuantizedLinear, QuantizedModel

CONFIGS = {"llama": (LlamaConfig, "LlamaForCausalLM"), "mistral": (MistralConfig, "MistralForCausalLM"),
           "qwen2": (Qwen2Config, "Qwen2ForCausalLM"), "qwen3": (Qwen3Config, "Qwen3ForCausalLM"),
           "gemma3": (Gemma3TextConfig, "Gemma3ForCausalLM"), "phi3": (Phi3Config, "Phi3ForCausalLM")}


def tiny_config(arch: str, **overrides):
    cls, name = CONFIGS[arch]
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=True, architectures=[name],
              # larger than the default 0.02 so logits are peaked and greedy choices are not ties
              initializer_range=0.15)
    if arch == "mistral":
        kw["sliding_window"] = 24  # shorter than the test windows, so the window matters
    if arch == "gemma3":  # a sliding layer (24-token window, its own RoPE base), then a global one
        kw.update(sliding_window=24, layer_types=["sliding_attention", "full_attention"],
                  query_pre_attn_scalar=kw["head_dim"], hidden_activation="gelu_pytorch_tanh",
                  pad_token_id=0, bos_token_id=2, eos_token_id=1)
    if arch == "phi3":
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=None)
    kw.update(overrides)
    return cls(**kw)


def rtn_quantized_model(model, *, bits: int = 4, group: int = 16, rbin_down_bits: int | None = None,
                        fake_dac: bool = True, quantize_embed: bool = False, seed: int = 0,
                        tokenizer=None) -> QuantizedModel:
    """RTN of every linear of ``model`` on a uniform grid.

    rbin_down_bits: down_proj on DSQ's residual-binary grid, its column scale folded into up_proj
    as the pipeline does. fake_dac: random DAC-like gate/up biases and an lm_head bias.
    quantize_embed: the embedding table on the uniform grid too.
    """
    cfg = model.config
    fam = family_of_hf(cfg.architectures, cfg.model_type)
    gen = torch.Generator().manual_seed(seed + 1)
    linears: dict[str, QuantizedLinear] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            grid = (ResidualBinaryGrid(rbin_down_bits, group)
                    if rbin_down_bits and name.endswith("down_proj") else UniformGrid(bits, group))
            codes, params = grid.quantize_matrix(mod.weight.detach().float())
            bias = mod.bias.detach().float().clone() if mod.bias is not None else None
            linears[name] = QuantizedLinear(grid, codes, params, bias)
    if quantize_embed:
        grid = UniformGrid(bits, group)
        codes, params = grid.quantize_matrix(model.model.embed_tokens.weight.detach().float())
        linears["model.embed_tokens"] = QuantizedLinear(grid, codes, params)
    if rbin_down_bits:
        for name in [n for n in linears if n.endswith(fam.down.path)]:
            down = linears[name]
            grid, params, col_scale = strip_col_scale(down.grid, down.params, down.shape[1])
            linears[name] = QuantizedLinear(grid, down.codes, params, down.bias)
            up_path, rows = fam.up_rows(down.shape[1])
            up = linears[name.removesuffix(fam.down.path) + up_path]
            scale = torch.ones(up.shape[0])
            scale[rows] = col_scale
            up.params = up.grid.scale_rows(up.params, scale)
    tensors = {k: v.detach().float().clone() for k, v in model.state_dict().items()
               if not any(k in (f"{n}.weight", f"{n}.bias") for n in linears)
               and not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    if fake_dac:
        for name, ql in linears.items():
            if name.endswith(tuple(lin.path for lin in fam.gate_up)):
                ql.bias = 0.1 * torch.randn(ql.shape[0], generator=gen)
        tensors["lm_head.bias"] = 0.1 * torch.randn(cfg.vocab_size, generator=gen)
    return QuantizedModel(spec=ModelSpec.from_hf_config(cfg), linears=linears, tensors=tensors,
                          recipe={"method": "rtn", "bits": bits, "group_size": group},
                          tokenizer=tokenizer)


def tiny_quantized_model(arch: str, *, seed: int = 0, **kw) -> QuantizedModel:
    """A 2-layer random model of ``arch`` (config overrides among kw) through rtn_quantized_model;
    norm weights are randomised so a misplaced norm shows in the logits."""
    quant_keys = {"bits", "group", "rbin_down_bits", "fake_dac", "quantize_embed"}
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **{k: v for k, v in kw.items() if k not in quant_keys})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return rtn_quantized_model(model, seed=seed, **{k: v for k, v in kw.items() if k in quant_keys})
