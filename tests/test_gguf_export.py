"""GGUF export: tiny random models per architecture, quantized RTN onto a preset's native grids,
written, loaded by llama.cpp and checked for weight and logit parity."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import gguf
import numpy as np
import pytest
import torch

from converters.gguf import file_bits_per_weight, plan_gguf, preset_grids, preset_types, write_gguf
from converters.gguf.arch import rope_permutation
from converters.gguf.presets import preset_size
from d2quant.errors import D2Error
from d2quant.grids import UniformGrid, grid_from_spec
from d2quant.qmodel import ModelSpec, QuantizedLinear, QuantizedModel
from tests.tiny_models import tiny_config

from runtime_tests.llamacpp import LlamaCppDecoder, verify_gguf

HIDDEN, FFN, VOCAB = 256, 512, 512  # 256 so every K-quant fits the rows
_TEXT = ("The quick brown fox jumps over the lazy dog. A tiny model reads tiny text, and the "
         "tokenizer learns which pairs of bytes come together most often. 12345 67890! ") * 8
_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    """A gpt2-style byte-level BPE tokenizer trained on a paragraph (ids < VOCAB)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", chat_template=_CHAT)


def preset_model(arch: str, preset: str, tokenizer, *, dac: bool = True, lm_bias: bool = False,
                 seed: int = 0, **overrides) -> QuantizedModel:
    """A tiny random model quantized RTN onto the preset's grids, with fake DAC ffn biases."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = dict(hidden_size=HIDDEN, intermediate_size=FFN, head_dim=64, vocab_size=VOCAB,
              initializer_range=0.05, bos_token_id=0, eos_token_id=2)
    if arch == "mistral":
        kw["sliding_window"] = 4096
    if arch == "qwen3":  # as in real Qwen3, heads * head_dim != hidden
        kw["head_dim"] = 128
    cfg = tiny_config(arch, **(kw | overrides))
    model = AutoModelForCausalLM.from_config(cfg).eval()
    spec = ModelSpec.from_hf_config(cfg)
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    linears = {}
    for name, gspec in preset_grids(preset, spec).items():
        grid = grid_from_spec(gspec)
        codes, params = grid.quantize_matrix(sd.pop(f"{name}.weight"))
        linears[name] = QuantizedLinear(grid, codes, params, sd.pop(f"{name}.bias", None))
    sd.pop("lm_head.weight", None)  # tied: token_embd serves as output
    for k in [k for k in sd if "norm" in k]:  # norms other than 1 so a misplaced one shows
        sd[k] = 1 + 0.3 * torch.randn(sd[k].shape, generator=gen)
    if dac:
        for i in range(spec.layers):
            shift = 0.1 * torch.randn(HIDDEN, generator=gen)
            for lin in spec.family.gate_up:
                ql = linears[f"model.layers.{i}.{lin.path}"]
                ql.bias = ql.weight() @ shift
    if lm_bias:
        sd["lm_head.bias"] = 0.5 * torch.randn(VOCAB, generator=gen)
    return QuantizedModel(spec=spec, linears=linears, tensors=sd, recipe={"method": "rtn", "type": preset},
                          source={"kind": "hf", "path": _model_name(arch)}, tokenizer=tokenizer)


def _model_name(arch: str) -> str:
    # llama.cpp applies the real Phi-3 vocabulary's rules (its <s>, </s>, <unk>) to any model whose
    # name says phi3; the tiny tokenizer has none of those tokens
    return "tiny-fused-qkv" if arch == "phi3" else f"tiny-{arch}"


def cached_model(arch: str, preset: str, *, dac: bool = True, lm_bias: bool = False,
                 tied: bool = True) -> QuantizedModel:
    """Shared across tests (quantizing is the slow part); tests copy it before changing it."""
    return _cached_model(arch, preset, dac, lm_bias, tied)


@functools.lru_cache(maxsize=None)
def _cached_model(arch, preset, dac, lm_bias, tied):
    return preset_model(arch, preset, tiny_tokenizer(), dac=dac, lm_bias=lm_bias,
                        tie_word_embeddings=tied)


def _export(qm, tmp_path, name="m.gguf", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_gguf(qm, tmp_path / name, **kw)


@pytest.mark.parametrize("arch,preset,expect_arch", [  # mistral also covers untied embeddings
    ("llama", "Q3_K_M", "llama"),
    ("mistral", "Q2_K", "llama"),
    ("qwen2", "Q4_K_M", "llama"),  # DAC's ffn biases need the llama architecture
    ("qwen3", "Q4_0", "qwen3"),
])
def test_export_loads_and_matches(arch, preset, expect_arch, tmp_path):
    qm = cached_model(arch, preset, dac=arch != "qwen3", tied=arch != "mistral")
    path = _export(qm, tmp_path, preset=preset)
    res = verify_gguf(path, qm, text=_TEXT, n_windows=2, seq_len=48, n_threads=1)
    w, lg = res["weights"], res["logits"]
    assert w["arch"] == expect_arch
    assert w["exact"] == w["n_tensors"] and not w["mismatched"] and not w["missing"], w
    assert res["tokenizer"]["pass"] and res["tokenizer"]["tokens"] > 100, res["tokenizer"]
    assert res["pass"], lg
    # the bound scales with what 8-bit activation rounding does to this model in torch
    rounding = res["activation_rounding"]["mean_kl"]
    assert 0 < rounding < 1e-2 and lg["mean_kl"] <= 1e-3 + 2 * rounding
    # and llama.cpp sits on the emulation of that rounding within what a one-ulp nudge does to it
    assert res["vs_emulated"]["pass"] and res["rounding_chaos"]["mean_kl"] > 0, res["rounding_chaos"]


def test_logit_gate_catches_a_file_without_the_dac_biases(tmp_path):
    """Left out of the file, the DAC ffn biases move llama.cpp far beyond the rounding noise."""
    qm = cached_model("llama", "Q3_K_M")
    unbiased = dataclasses.replace(qm, linears={
        n: dataclasses.replace(ql, bias=None) if n.endswith(("gate_proj", "up_proj")) else ql
        for n, ql in qm.linears.items()})
    res = verify_gguf(_export(unbiased, tmp_path), qm, text=_TEXT, n_windows=2, seq_len=48,
                      n_threads=1)
    assert res["weights"]["missing"] and not res["logits"]["pass"], res["logits"]
    assert not res["vs_emulated"]["pass"] and not res["pass"]


def test_qwen2_without_ffn_bias_keeps_lm_head_bias(tmp_path):
    qm = cached_model("qwen2", "Q6_K", dac=False, lm_bias=True)
    plan = plan_gguf(qm)
    assert plan.layout.name == "qwen2" and "output.bias" in plan.sources and not plan.dropped
    res = verify_gguf(_export(qm, tmp_path), qm, n_windows=1, seq_len=32, n_threads=1)
    assert res["pass"] and "dropped_cost" not in res, res["logits"]


def test_llama_drops_lm_head_bias_with_warning_and_costs_it(tmp_path):
    qm = cached_model("llama", "Q8_0", lm_bias=True)
    with pytest.warns(UserWarning, match="lm_head.bias"):
        path = write_gguf(qm, tmp_path / "m.gguf")
    res = verify_gguf(path, qm, n_windows=1, seq_len=32, n_threads=1)
    assert "lm_head.bias" in res["weights"]["dropped"]
    assert res["pass"]  # the file matches the model without the bias...
    assert res["dropped_cost"]["mean_kl"] > 1e-3  # ...and the bias mattered


def test_llama_drops_a_quantized_heads_bias_too(tmp_path):
    """An untied head that the preset quantizes carries the final-norm shift on its linear (as
    Qwen2.5 at Q2_K does); under llama it is dropped and costed the same way."""
    qm = cached_model("mistral", "Q2_K", tied=False)
    head = qm.linears["lm_head"]
    bias = 0.5 * torch.randn(head.shape[0], generator=torch.Generator().manual_seed(3))
    qm = dataclasses.replace(qm, linears=qm.linears | {"lm_head": dataclasses.replace(head, bias=bias)})
    with pytest.warns(UserWarning, match="lm_head.bias"):
        path = write_gguf(qm, tmp_path / "m.gguf")
    res = verify_gguf(path, qm, n_windows=1, seq_len=32, n_threads=1)
    assert "lm_head.bias" in res["weights"]["dropped"] and res["pass"]
    assert res["dropped_cost"]["mean_kl"] > 1e-3


def test_uniform_grids_sit_exactly_in_q4_0_and_q5_0_and_float_embeddings(tmp_path):
    base = cached_model("llama", "Q8_0", lm_bias=True)
    linears = dict(base.linears)
    for name, ql in base.linears.items():
        if ".layers." in name:
            grid = UniformGrid(3 if "mlp" in name else 4, 64)
            codes, params = grid.quantize_matrix(ql.weight())
            linears[name] = QuantizedLinear(grid, codes, params, ql.bias)
    # a float embedding that fp16 holds exactly is written as F16
    embed = linears.pop("model.embed_tokens").weight().half().float()
    qm = dataclasses.replace(base, linears=linears,
                             tensors=base.tensors | {"model.embed_tokens.weight": embed})
    plan = plan_gguf(qm)
    assert plan.types["blk.0.ffn_down.weight"] == "Q4_0" and plan.types["blk.0.attn_q.weight"] == "Q5_0"
    assert plan.types["token_embd.weight"] == "F16" and plan.types["blk.0.attn_norm.weight"] == "F32"
    res = verify_gguf(_export(qm, tmp_path), qm, n_windows=1, seq_len=32, n_threads=1)
    assert res["weights"]["exact"] == res["weights"]["n_tensors"] and res["pass"], res


def test_a_file_that_tokenizes_differently_fails_parity(tmp_path):
    """The weights and logits may all match while the file's tokenizer splits text otherwise."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    qm = cached_model("llama", "Q8_0")
    path = _export(qm, tmp_path, preset="Q8_0")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["other text entirely, trained elsewhere " * 50], trainers.BpeTrainer(
        vocab_size=400, show_progress=False, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = dataclasses.replace(qm, tokenizer=PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"))
    res = verify_gguf(path, other, text=_TEXT, n_windows=1, seq_len=32, n_threads=1)
    assert res["weights"]["pass"] and res["logits"]["pass"], res["logits"]
    assert res["tokenizer"]["first_difference"] is not None and not res["pass"]


def test_file_type_is_what_the_tensors_hold(tmp_path):
    qm = cached_model("llama", "Q3_K_M")
    path = _export(qm, tmp_path, "a.gguf")  # no preset named: derived from the tensors
    assert gguf.GGUFReader(str(path)).fields["general.file_type"].contents() == \
        gguf.LlamaFileType.MOSTLY_Q3_K_M
    with pytest.raises(D2Error, match="do not follow the Q2_K preset .*Q3_K_M"):
        _export(qm, tmp_path, "b.gguf", preset="Q2_K")
    assert not (tmp_path / "b.gguf").exists() and not list(tmp_path.glob(".b.gguf*"))
    uniform = dataclasses.replace(qm, linears={
        n: QuantizedLinear(UniformGrid(3, 64), *UniformGrid(3, 64).quantize_matrix(ql.weight()), ql.bias)
        if ".layers." in n else ql for n, ql in qm.linears.items()})
    path = _export(uniform, tmp_path, "c.gguf")
    assert gguf.GGUFReader(str(path)).fields["general.file_type"].contents() == \
        gguf.LlamaFileType.MOSTLY_Q4_0  # 3-bit uniform codes sit in Q4_0 blocks


def test_file_metadata_tokenizer_and_chat_template(tmp_path):
    qm = cached_model("llama", "Q8_0", lm_bias=True)
    path = _export(qm, tmp_path, preset="Q8_0")
    assert 8.5 < file_bits_per_weight(path) < 9.0  # Q8_0 blocks plus F32 norms and biases
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.token")}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert f["llama.rope.dimension_count"] == 64 and f["llama.attention.head_count_kv"] == 2
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.bos_token_id"] == 0 and f["tokenizer.ggml.eos_token_id"] == 2
    assert f["tokenizer.chat_template"] == _CHAT
    assert f["tokenizer.ggml.add_bos_token"] is False  # as the HF tokenizer: no BOS added
    assert len(r.fields["tokenizer.ggml.tokens"].data) == VOCAB


def test_gguf_source_copies_tokenizer_fields(tmp_path):
    first = _export(cached_model("llama", "Q8_0", lm_bias=True), tmp_path, "a.gguf")
    qm = dataclasses.replace(cached_model("llama", "Q3_K_M"), tokenizer=None,
                             source={"kind": "gguf", "path": str(first)})
    second = _export(qm, tmp_path, "b.gguf")
    fa, fb = gguf.GGUFReader(str(first)).fields, gguf.GGUFReader(str(second)).fields
    for key in [k for k in fa if k.startswith("tokenizer.")]:
        assert fa[key].contents() == fb[key].contents(), key
    dec = LlamaCppDecoder(second, n_ctx=64)
    try:
        assert dec.tokenize(_TEXT[:200], add_bos=False) == tiny_tokenizer().encode(_TEXT[:200])
    finally:
        dec.close()


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},  # travels as the rope_freqs tensor
    {"rope_type": "linear", "factor": 4.0},
])
def test_rope_scaling_reaches_llama_cpp(rope, tmp_path):
    qm = cached_model("llama", "Q3_K_M")
    spec = dataclasses.replace(qm.spec, hf_config=qm.spec.hf_config | {
        "rope_parameters": {"rope_theta": qm.spec.rope_theta, **rope}})
    qm = dataclasses.replace(qm, spec=spec)
    res = verify_gguf(_export(qm, tmp_path), qm, text=_TEXT, n_windows=2, seq_len=48, n_threads=1)
    assert res["pass"], res["logits"]  # unscaled RoPE costs KL ~0.05 here


def test_sliding_window_beyond_context_is_reported():
    qm = cached_model("mistral", "Q2_K", tied=False)
    assert not plan_gguf(qm).notes
    spec = dataclasses.replace(qm.spec, hf_config=qm.spec.hf_config | {"sliding_window": 24})
    assert "24-token sliding window" in plan_gguf(dataclasses.replace(qm, spec=spec)).notes[0]


def test_rope_permutation_matches_convert_hf_to_gguf():
    n_head, hd = 3, 8
    w = torch.arange(n_head * hd * 2, dtype=torch.float32).reshape(n_head * hd, 2)
    # convert_hf_to_gguf's LLaMA permute, restated: split each head's rows in halves, interleave them
    ref = w.reshape(n_head, 2, hd // 2, 2).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(w[rope_permutation(n_head * hd, n_head)], ref)


@pytest.mark.filterwarnings("ignore:dropped lm_head.bias")
def test_bad_inputs(tmp_path):
    qwen3 = cached_model("qwen3", "Q4_0", dac=False)
    gate = "model.layers.1.mlp.gate_proj"
    with_bias = dataclasses.replace(qwen3.linears[gate], bias=torch.zeros(FFN))
    with pytest.raises(D2Error, match="qwen3.*ffn_gate.bias"):
        write_gguf(dataclasses.replace(qwen3, linears=qwen3.linears | {gate: with_bias}), tmp_path / "q.gguf")
    assert not list(tmp_path.iterdir())  # no partial output

    qm = cached_model("llama", "Q8_0", lm_bias=True)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(D2Error, match="exists"):
        write_gguf(qm, out)
    assert out.read_bytes() == b"old"
    _export(qm, tmp_path, force=True)  # (warns: lm_head.bias dropped)
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "llama"

    with pytest.raises(D2Error, match="does not exist"):
        write_gguf(qm, tmp_path / "nope" / "m.gguf")
    with pytest.raises(D2Error, match="unknown GGUF type"):
        preset_types("Q3_K_XL", qm.spec)
    qm = dataclasses.replace(qm, source={"kind": "gguf", "path": str(tmp_path / "missing.gguf")})
    with pytest.raises(D2Error, match="cannot read the source GGUF"):
        write_gguf(qm, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and len(list(tmp_path.iterdir())) == 1


# ---- presets ------------------------------------------------------------------------------------

def _smollm2_spec(hidden=576, heads=9, kv=3) -> ModelSpec:
    return ModelSpec(arch="llama", hidden=hidden, layers=30, heads=heads, kv_heads=kv, head_dim=64,
                     ffn=1536, vocab=49152, rope_theta=1e5, rms_eps=1e-5, tie_embeddings=True,
                     max_positions=8192, hf_config={})


def test_presets_on_smollm2_follow_llama_quant_rules():
    spec = _smollm2_spec()
    t = preset_types("Q4_K_M", spec)
    # 576-wide rows fit no 256-block: Q4_K falls back to Q5_0, Q6_K to Q8_0 (llama.cpp: 180 of
    # SmolLM2's tensors fall back); ffn_down reads 1536-wide rows and keeps K-quants
    assert t["model.layers.5.self_attn.q_proj"] == "q5_0"
    assert t["model.layers.0.self_attn.v_proj"] == "q8_0"  # Q6_K (use_more_bits) -> Q8_0
    assert t["model.layers.0.mlp.down_proj"] == "q6_k" and t["model.layers.4.mlp.down_proj"] == "q4_k"
    assert t["model.embed_tokens"] == "q8_0"  # tied output, rows not a multiple of 256
    q2 = preset_types("Q2_K", spec)
    assert q2["model.layers.3.self_attn.q_proj"] == "q4_0" and q2["model.layers.3.mlp.down_proj"] == "q3_k"
    assert sum(v in ("q4_0", "q5_0", "q5_1", "q8_0") for k, v in q2.items() if "layers" in k) == 180
    m = preset_types("Q3_K_M", spec)
    assert m["model.layers.0.self_attn.v_proj"] == "q5_1" and m["model.layers.2.self_attn.v_proj"] == "q5_0"
    assert m["model.layers.0.mlp.down_proj"] == "q5_k" and m["model.layers.2.mlp.down_proj"] == "q4_k"


def test_presets_on_padded_smollm2_and_bits_per_weight():
    spec = _smollm2_spec(768, 12, 4)
    t = preset_types("Q2_K", spec)
    assert t["model.layers.3.self_attn.q_proj"] == "q2_k" and t["model.layers.3.self_attn.v_proj"] == "q3_k"
    assert t["model.layers.3.self_attn.o_proj"] == "q3_k" and t["model.embed_tokens"] == "q6_k"
    assert preset_types("Q2_K", _smollm2_spec(768, 12, 3))["model.layers.0.self_attn.v_proj"] == "q4_k"
    assert preset_types("Q4_K_S", spec)["model.layers.3.self_attn.v_proj"] == "q5_k"
    assert preset_types("Q4_K_S", spec)["model.layers.4.self_attn.v_proj"] == "q4_k"
    q8 = preset_size("Q8_0", spec)
    assert q8.bits_per_weight == pytest.approx(8.5, abs=0.05)  # 34 bytes / 32 weights, norms F32
    real = _smollm2_spec().n_params
    padded_bpw = preset_size("Q2_K", spec).bits_per_weight
    assert preset_size("Q2_K", spec, real_params=real).bits_per_weight > padded_bpw


def test_untied_embeddings_keep_base_type_and_output_gets_q6_k():
    spec = _smollm2_spec(768, 12, 4)
    spec.tie_embeddings = False
    t = preset_types("Q3_K_S", spec)
    assert t["model.embed_tokens"] == "q3_k" and t["lm_head"] == "q6_k"
    assert preset_types("Q8_0", spec)["lm_head"] == "q8_0"
    assert preset_grids("Q3_K_S", spec)["lm_head"] == {"kind": "q6_k"}
    assert np.isclose(preset_size("Q6_K", spec).bits_per_weight, 6.5625, atol=0.01)


@pytest.mark.parametrize("preset", ["IQ1_M", "IQ2_XXS", "IQ2_M", "IQ3_XXS", "IQ3_S", "IQ4_XS"])
def test_codebook_presets_load_in_llama_cpp_and_match(preset, tmp_path):
    """llama.cpp's IQ types (codebook grids) carried bit for bit, and run by llama.cpp."""
    qm = cached_model("llama", preset)
    kinds = {ql.grid.kind for ql in qm.linears.values()}
    assert _BASE_KIND[preset] in kinds
    res = verify_gguf(_export(qm, tmp_path, preset=preset), qm, text=_TEXT, n_windows=2, seq_len=48,
                      n_threads=1)
    assert res["weights"]["exact"] == res["weights"]["n_tensors"], res["weights"]
    assert res["pass"], (res["logits"], res["vs_emulated"])


_BASE_KIND = {"IQ1_M": "iq1_m", "IQ2_XXS": "iq2_xxs", "IQ2_M": "iq2_s", "IQ3_XXS": "iq3_xxs", "IQ3_S": "iq3_s", "IQ4_XS": "iq4_xs"}


def test_rtn_onto_types_llama_cpp_needs_an_imatrix_for_asks_for_force():
    from converters.gguf import GGUFTarget
    from d2quant.pipeline import QuantConfig
    from d2quant.sources import Source

    src = Source(None, None, cached_model("llama", "Q8_0").spec, {})
    with pytest.raises(D2Error, match="IQ2_XXS without any importance.*--force"):
        GGUFTarget("IQ2_XXS").quant_config(QuantConfig(method="rtn"), src, None)
    assert GGUFTarget("IQ2_XXS", force=True).quant_config(QuantConfig(method="rtn"), src, None).grids
    assert GGUFTarget("IQ2_XXS").quant_config(QuantConfig(method="gptq"), src, None).grids


def test_dac_is_refused_up_front_where_llama_cpp_cannot_hold_its_biases():
    """qwen3 / gemma3 / phi3's llama.cpp architectures take no ffn biases: D²Quant with DAC is
    refused once the model is loaded, before any calibration token is made; --no-dac passes."""
    from types import SimpleNamespace

    from converters.gguf import GGUFTarget
    from d2quant.pipeline import QuantConfig
    from d2quant.qmodel import ModelSpec
    from tests.conftest import tiny_model

    for arch in ("qwen3", "gemma3", "phi3"):
        src = SimpleNamespace(spec=ModelSpec.from_hf_config(tiny_model(arch).config))
        with pytest.raises(D2Error, match="cannot hold DAC's ffn biases; pass --no-dac"):
            GGUFTarget("Q4_K_M").check(QuantConfig(method="d2quant"), src)
        GGUFTarget("Q4_K_M").check(QuantConfig(method="d2quant", dac=False), src)
    llama = SimpleNamespace(spec=ModelSpec.from_hf_config(tiny_model("llama").config))
    GGUFTarget("Q4_K_M").check(QuantConfig(method="d2quant"), llama)
