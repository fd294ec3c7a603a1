"""Model families (d2quant.families) end to end on tiny random models: calibration reads each
family's module tree, and the GGUF file llama.cpp loads and the ONNX graph onnxruntime runs compute
the calibrated model. Gemma 3: (1 + w) norms on both branches, GELU-tanh, sliding and global layers
with their own RoPE bases; Phi-3: fused qkv_proj and gate_up_proj."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

from converters.gguf import plan_gguf, preset_grids, write_gguf
from d2quant import rotation
from d2quant.errors import D2Error
from d2quant.families import families, family, family_of_hf
from d2quant.grids import ResidualBinaryGrid
from d2quant.pipeline import QuantConfig, _causal_mask, quantize
from d2quant.qmodel import ModelSpec
from d2quant.sources import Source
from runtime_tests.llamacpp import verify_gguf
from tests.conftest import tiny_model
from tests.test_gguf_export import _TEXT, preset_model, tiny_tokenizer

CALIB = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(1))


def test_every_family_is_registered_once_with_consistent_facts():
    names = [f.name for f in families()]
    assert len(names) == len(set(names)) >= 6
    for fam in families():
        roles = [lin.role for lin in fam.layer_linears()]
        assert len(roles) == len(set(roles)) and fam.role_of(fam.down.path) == "ffn_down"
        assert fam.mlp_norm in fam.layer_norms() and fam.gguf_archs and fam.genai_type


def _mlp_norm_means(model, fam, calib):
    """Mean over tokens of layer 0's MLP-norm output (the DAC site), as the model computes it."""
    layer, x = model.model.layers[0], model.model.embed_tokens(calib)
    types = fam.layer_types(model.config.to_dict(), len(model.model.layers))
    window = fam.sliding_windows(model.config.to_dict(), len(model.model.layers))[0]
    pe = fam.position_embeddings(model.model, x, torch.arange(calib.shape[1])[None], types[0])
    attn = layer.self_attn(layer.get_submodule(fam.attn_norm)(x), position_embeddings=pe,
                           attention_mask=_causal_mask(calib.shape[1], "cpu", window))[0]
    if fam.attn_post_norm:
        attn = layer.get_submodule(fam.attn_post_norm)(attn)
    return layer.get_submodule(fam.mlp_norm)(x + attn).reshape(-1, x.shape[-1]).mean(0)


@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
def test_dac_cancels_the_mean_deviation_at_the_family_site(arch, tiny_source):
    src = tiny_source(arch)
    fam, fp = src.spec.family, copy.deepcopy(src.model)
    qm = quantize(src, CALIB, QuantConfig(method="d2quant", bits=2, group_size=32, batch=4, dsq=False))
    tm = qm.to_torch()
    with torch.no_grad():
        teacher, student = _mlp_norm_means(fp, fam, CALIB), _mlp_norm_means(tm, fam, CALIB)
    gate = tm.model.layers[0].get_submodule(fam.gate_up[0].path)  # bias = W_hat b: recover b
    b = torch.linalg.lstsq(gate.weight.double(), gate.bias.double()[:, None]).solution[:, 0].float()
    before, after = (teacher - student).abs().mean(), (teacher - student - b).abs().mean()
    assert after < 1e-3 * before + 1e-6, (before, after)


@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
def test_dsq_column_scale_folds_into_the_up_rows(arch, tiny_source):
    src = tiny_source(arch)
    fam = src.spec.family
    qm = quantize(src, CALIB, QuantConfig(method="d2quant", bits=2, group_size=32, dac=False, batch=4))
    assert isinstance(qm.linears[f"model.layers.0.{fam.down.path}"].grid, ResidualBinaryGrid)
    with torch.no_grad():  # the calibrated model in place and the rebuilt one: the same function
        assert torch.allclose(src.model(CALIB[:2]).logits, qm.to_torch()(CALIB[:2]).logits, atol=1e-5)


def test_rotation_applies_to_phi3_and_is_refused_for_gemma3(tiny_source):
    src = tiny_source("phi3")
    ref = copy.deepcopy(src.model)
    rotation.rotate(src.model)
    with torch.no_grad():
        a, b = ref(CALIB[:2]).logits, src.model(CALIB[:2]).logits
    assert ((a - b).abs().max() / a.abs().max()) < 1e-4
    with pytest.raises(D2Error, match="rotation does not apply to gemma3"):
        rotation.rotate(tiny_source("gemma3").model)


@pytest.mark.parametrize("arch,preset", [("gemma3", "Q4_K_M"), ("phi3", "Q3_K_M")])
def test_gguf_loads_in_llama_cpp_and_matches(arch, preset, tmp_path):
    qm = preset_model(arch, preset, tiny_tokenizer(), dac=False)
    assert plan_gguf(qm).layout.name == arch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = write_gguf(qm, tmp_path / "m.gguf", preset=preset)
    res = verify_gguf(path, qm, text=_TEXT, n_windows=2, seq_len=48, n_threads=1)
    w = res["weights"]
    assert w["arch"] == arch and w["exact"] == w["n_tensors"] and not w["missing"], w
    assert res["pass"], (res["logits"], res["vs_emulated"])


def test_gemma3_calibrated_with_gptq_to_gguf(tmp_path):
    """The whole path on the family with the most differences: calibrate, write, llama.cpp."""
    m = tiny_model("gemma3", hidden_size=256, intermediate_size=512, head_dim=64, vocab_size=512)
    spec = ModelSpec.from_hf_config(m.config)
    src = Source(m, tiny_tokenizer(), spec, {"kind": "hf", "path": "tiny-gemma3"})
    calib = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(2))
    qm = quantize(src, calib, QuantConfig(method="gptq", grids=preset_grids("Q4_K_M", spec), batch=2))
    path = write_gguf(qm, tmp_path / "g.gguf", preset="Q4_K_M")
    res = verify_gguf(path, qm, text=_TEXT, n_windows=2, seq_len=48, n_threads=1)
    assert res["pass"], (res["weights"], res["logits"], res["vs_emulated"])


@pytest.mark.parametrize("arch", ["gemma3", "phi3", "qwen3"])
def test_dac_biases_have_no_carrier_in_these_llama_cpp_architectures(arch):
    qm = preset_model(arch, "Q8_0", tiny_tokenizer(), dac=True)
    with pytest.raises(D2Error, match=r"DAC's ffn biases.*--no-dac"):
        plan_gguf(qm)


def test_unknown_family_lists_the_supported_ones():
    with pytest.raises(D2Error, match="known: .*gemma3.*phi3"):
        family("gpt2")
    with pytest.raises(D2Error, match="supported: LlamaForCausalLM.*Gemma3ForCausalLM"):
        family_of_hf(["GPT2LMHeadModel"])
    assert dataclasses.is_dataclass(family("phi3").qkv[0])
