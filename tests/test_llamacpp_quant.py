"""llama.cpp's quantizer as a baseline: its bytes, unpacked by our grids, written by our writer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from converters.gguf import preset_types, write_gguf
from d2quant.qmodel import ModelSpec
from d2quant.sources import Source
from tests.tiny_models import tiny_config

pytest.importorskip("llama_cpp")
from runtime_tests.libggml import quantize_rows  # noqa: E402
from runtime_tests.llamacpp import verify_gguf  # noqa: E402
from runtime_tests.llamacpp_quant import collect_importance, quantize_with_libggml  # noqa: E402
from tests.test_gguf_export import VOCAB, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def source():
    """A tiny llama with hidden 256 (every K-quant fits) and a tokenizer the writer can carry."""
    torch.manual_seed(0)
    cfg = tiny_config("llama", hidden_size=256, intermediate_size=512, head_dim=64, vocab_size=VOCAB,
                      initializer_range=0.05, bos_token_id=0, eos_token_id=2)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    return Source(m, tiny_tokenizer(), ModelSpec.from_hf_config(cfg), {"kind": "hf", "path": "tiny"})


@pytest.fixture(scope="module")
def importance(source):
    tokens = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(3))
    return collect_importance(source, tokens)


def test_importance_is_the_mean_squared_input_per_column(source, importance):
    assert set(importance) == {n for n, m in source.model.named_modules()
                               if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    tokens = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(3))
    seen = []
    layer = source.model.model.layers[1]
    h = layer.mlp.down_proj.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        source.model(tokens, use_cache=False)
    h.remove()
    want = (seen[0].reshape(-1, seen[0].shape[-1]).double() ** 2).mean(0).float()
    torch.testing.assert_close(importance["model.layers.1.mlp.down_proj"], want)
    torch.testing.assert_close(importance["model.layers.0.self_attn.q_proj"],
                               importance["model.layers.0.self_attn.v_proj"])  # one input, one vector


@pytest.mark.parametrize("preset", ["Q2_K", "Q3_K_S", "Q4_K_M"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_baseline_is_libggml_bytes_and_loads_in_llama_cpp(source, importance, preset, with_imatrix, tmp_path):
    imp = importance if with_imatrix else None
    qm = quantize_with_libggml(source, preset, imp)
    types = preset_types(preset, source.spec)
    for name, ql in qm.linears.items():
        assert ql.grid.kind == types[name]
        w = source.model.get_submodule(name).weight.detach().float().numpy()
        vec = None if imp is None or name not in imp else imp[name].numpy()
        assert ql.grid.pack(ql.codes, ql.params).tobytes() == quantize_rows(ql.grid.type_name, w, vec), name
    path = tmp_path / "base.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be dropped
        write_gguf(qm, path, preset=preset)
    res = verify_gguf(path, qm, n_windows=1, seq_len=48, n_threads=1)
    assert res["pass"], res
    assert res["weights"]["exact"] == res["weights"]["n_tensors"]


def test_imatrix_lowers_the_importance_weighted_error(source, importance):
    plain = quantize_with_libggml(source, "Q2_K", None)
    guided = quantize_with_libggml(source, "Q2_K", importance)
    wins = 0
    for name, imp in importance.items():
        w = source.model.get_submodule(name).weight.detach().float()
        errs = [float((((q.linears[name].weight() - w) ** 2) * imp).sum()) for q in (plain, guided)]
        wins += errs[1] < errs[0]
    assert wins >= 0.8 * len(importance)
    assert not np.array_equal(plain.linears["model.layers.0.mlp.up_proj"].codes,
                              guided.linears["model.layers.0.mlp.up_proj"].codes)
