"""Zero-padding to a wider hidden size computes the same function (DESIGN.md §6 testbed)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from d2quant.errors import D2Error
from d2quant.padding import pad_model, pad_shape, param_count
from d2quant.sources import pad_source
from d2quant.qmodel import ModelSpec
from d2quant.sources import Source
from tests.tiny_models import tiny_config


def _model(arch: str, seed: int = 0, **kw):
    """hidden 96 = 6 heads x 16, 3 kv heads: padding to 128 gives 8 heads and 4 kv heads."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **({"hidden_size": 96, "intermediate_size": 160, "num_attention_heads": 6,
                                "num_key_value_heads": 3, "head_dim": 16, "vocab_size": 300} | kw))
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mis-padded one shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.5)
    return m


def _logits(m, ids):
    with torch.no_grad():
        return m(ids, use_cache=False).logits


def _rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("mistral", {"tie_word_embeddings": False}),
                                     ("qwen2", {}), ("qwen3", {})])
def test_padded_model_computes_the_same_logits(arch, kw):
    m = _model(arch, **kw)
    p = pad_model(m, 128)
    cfg = p.config
    shape = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert shape == (128, 8, 4, 16)
    assert cfg.rms_norm_eps == pytest.approx(m.config.rms_norm_eps * 96 / 128)
    assert p.model.layers[0].self_attn.o_proj.weight.shape == (128, 128)
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    assert _rel(_logits(m, ids), _logits(p, ids)) < 1e-4
    assert (p.lm_head.weight is p.model.embed_tokens.weight) == bool(m.config.tie_word_embeddings)


def test_padding_the_mlp_width_too():
    m = _model("llama")
    p = pad_model(m, 128, ffn_to=256)
    assert p.model.layers[1].mlp.down_proj.weight.shape == (128, 256)
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(2))
    assert _rel(_logits(m, ids), _logits(p, ids)) < 1e-4


def test_padded_channels_are_zero_and_source_counts_real_params():
    m = _model("llama")
    src = Source(m, None, ModelSpec.from_hf_config(m.config), {"kind": "hf", "path": "tiny", "name": "t"})
    ps = pad_source(src, 128)
    assert ps.spec.hidden == 128 and ps.spec.heads == 8 and ps.spec.kv_heads == 4
    assert ps.info["real_params"] == param_count(m) < param_count(ps.model)
    assert ps.info["name"] == "t-pad128"
    layer = ps.model.model.layers[0]
    assert not layer.input_layernorm.weight[96:].any()
    assert not layer.self_attn.q_proj.weight[96:].any() and not layer.self_attn.q_proj.weight[:, 96:].any()
    assert not layer.self_attn.k_proj.weight[48:].any()
    assert not layer.mlp.down_proj.weight[96:].any()
    assert m.config.hidden_size == 96  # the source model is untouched


def test_impossible_paddings_are_refused():
    m = _model("llama")
    with pytest.raises(D2Error, match="down to"):
        pad_model(m, 64)
    with pytest.raises(D2Error, match="fraction"):
        pad_shape(m.config, 100)  # 6 * 100 / 96 heads
    with pytest.raises(D2Error, match="group size"):
        pad_shape(m.config, 128, heads_to=7)  # kv groups of 2


@pytest.mark.slow
def test_padded_smollm2_alias_matches_the_original(smollm2_path):
    from d2quant.sources import load_source

    torch.set_num_threads(1)
    base = load_source("smollm2-135m")
    padded = load_source("smollm2-135m-pad768")
    spec = padded.spec
    assert (spec.hidden, spec.heads, spec.kv_heads, spec.head_dim) == (768, 12, 4, 64)
    assert padded.info["real_params"] == param_count(base.model)
    ids = base.tokenizer("The tower is 324 metres tall, about the same height as an 81-storey building.",
                         return_tensors="pt").input_ids
    assert _rel(_logits(base.model, ids), _logits(padded.model, ids)) < 1e-4
