"""Self-generated calibration text: seeded, full length, never end-of-text, the model left as it was."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from d2quant import data
from d2quant.data import CalibConfig, _draw, calibration_tokens, generator_id, sampling_precision


def test_self_generation_is_seeded_full_length_and_leaves_the_model_untouched(tiny_hf_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    attention = model.config._attn_implementation
    cfg = CalibConfig("self", nsamples=5, seqlen=40, seed=3)
    a = calibration_tokens(cfg, model, tok, torch.device("cpu"))
    assert a.shape == (5, 40) and a.dtype == torch.long
    assert (a[:, 0] == tok.bos_token_id).all()
    assert not (a[:, 2:] == tok.eos_token_id).any()  # end-of-text is never drawn
    assert torch.equal(a, calibration_tokens(cfg, model, tok, torch.device("cpu")))
    assert not torch.equal(a, calibration_tokens(CalibConfig("self", 5, 40, seed=4), model, tok, torch.device("cpu")))
    for n, p in model.named_parameters():  # sampled in bfloat16, restored exactly
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
    assert model.config._attn_implementation == attention  # restored after sampling


def test_a_mixture_is_its_sources_each_as_if_given_alone(tiny_hf_dir, tmp_path):
    """--calib notes.txt+self-chat: the samples split evenly, each source's rows exactly what that
    source alone gives for its share; a malformed mixture is refused before anything runs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    notes = tmp_path / "notes.txt"
    notes.write_text("The quick brown fox jumps over the lazy dog. " * 80)
    cpu = torch.device("cpu")
    mixed = CalibConfig(f"{notes}+self-chat", nsamples=5, seqlen=32, seed=1)
    assert mixed.generated and mixed.sources == [str(notes), "self-chat"]
    got = calibration_tokens(mixed, model, tok, cpu)
    assert got.shape == (5, 32)
    assert torch.equal(got[:3], calibration_tokens(CalibConfig(str(notes), 3, 32, 1), model, tok, cpu))
    assert torch.equal(got[3:], calibration_tokens(CalibConfig("self-chat", 2, 32, 1), model, tok, cpu))
    assert not CalibConfig(str(notes)).generated
    plus = tmp_path / "a+b.txt"  # an existing file whose name holds a '+' is one source
    plus.write_text("x")
    assert CalibConfig(str(plus)).sources == [str(plus)]
    with pytest.raises(Exception, match="empty part"):
        CalibConfig(f"{notes}++self")
    with pytest.raises(Exception, match="mixes 3 sources but --nsamples is 2"):
        CalibConfig(f"self+self-chat+{notes}", nsamples=2)
    with pytest.raises(Exception, match="missing.txt does not exist"):
        CalibConfig(f"self+{tmp_path}/missing.txt")


def test_draw_follows_the_distribution_and_never_picks_an_impossible_token():
    logits = torch.log(torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]])).expand(20000, 5).contiguous()
    got = _draw(logits, torch.Generator().manual_seed(0)).reshape(-1)
    freq = torch.bincount(got, minlength=5).float() / got.numel()
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]), atol=0.015)


@pytest.mark.parametrize("amx, bf16, kernel, dtype", [(True, True, "sdpa", torch.bfloat16),
                                                      (False, True, "eager", torch.bfloat16),
                                                      (False, False, "sdpa", torch.float32)])
def test_sampling_kernel_and_dtype_follow_the_cpu_and_are_named_by_the_generator(tiny_hf_dir, monkeypatch,
                                                                                amx, bf16, kernel, dtype):
    from d2quant import cpu as cpuinfo

    monkeypatch.setattr(data, "has_amx", lambda: amx)
    monkeypatch.setattr(cpuinfo, "has_bf16_matmul", lambda: bf16)
    cpu = torch.device("cpu")
    assert generator_id(cpu) == f"{data.GENERATOR_VERSION}-{kernel}" + ("" if bf16 else "-float32")
    assert data.sampling_attention(torch.device("cuda")) == "sdpa"
    assert data.sampling_dtype(torch.device("cuda")) == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    kept = [p.data_ptr() for p in model.parameters()]
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    with sampling_precision(model, cpu):
        assert model.config._attn_implementation == {"eager": data.GROUPED_EAGER}.get(kernel, kernel)
        assert {p.dtype for p in model.parameters()} == {dtype}
    assert [p.data_ptr() for p in model.parameters()] == kept  # the float32 weights themselves
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = calibration_tokens(CalibConfig("self", nsamples=3, seqlen=24, seed=1), model, tok, cpu)
    assert ids.shape == (3, 24) and not (ids[:, 2:] == tok.eos_token_id).any()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_cache_filled_in_place_samples_what_transformers_cache_samples(arch, tiny_source, tiny_hf_dir,
                                                                           monkeypatch):
    """Self-generation's KV cache writes into a buffer of the final length instead of growing by
    torch.cat: the same tokens (gemma3's sliding-window layers keep transformers' own)."""
    model, tok = tiny_source(arch).model, AutoTokenizer.from_pretrained(tiny_hf_dir)  # one vocabulary
    cfg, cpu = CalibConfig("self", nsamples=4, seqlen=48, seed=1), torch.device("cpu")
    made = []
    real = data._kv_cache
    monkeypatch.setattr(data, "_kv_cache", lambda m, n: made.append(real(m, n)) or made[-1])
    ours = calibration_tokens(cfg, model, tok, cpu)
    assert any(isinstance(layer, data._FilledInPlace) for layer in made[0].layers)
    assert made[0].get_seq_length() == cfg.seqlen - 1  # the last token is drawn, never fed
    monkeypatch.setattr(data, "_kv_cache", lambda m, n: data.DynamicCache(config=m.config))
    assert torch.equal(ours, calibration_tokens(cfg, model, tok, cpu))


@pytest.mark.parametrize("heads, kv_heads, queries, softcap", [(9, 3, 1, None), (4, 4, 5, None), (8, 2, 6, 30.0)])
def test_grouped_eager_attention_is_eager_attention_bit_for_bit_in_bfloat16(heads, kv_heads, queries, softcap):
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    gen = torch.Generator().manual_seed(0)
    b, d, keys = 3, 16, 37
    dtype = torch.bfloat16  # what sampling runs in (in float32 one query's products may be summed otherwise)
    q = torch.randn(b, queries, heads, d, generator=gen).to(dtype).transpose(1, 2)  # as the layers make it
    k = torch.randn(b, kv_heads, keys + 9, d, generator=gen).to(dtype)[:, :, :keys]  # a view, as the cache gives
    v = torch.randn(b, kv_heads, keys, d, generator=gen).to(dtype)
    mask = torch.zeros(b, 1, queries, keys, dtype=dtype)
    mask[..., -queries:] = torch.triu(torch.full((queries, queries), float("-inf")), 1).to(dtype)
    mask[1, ..., :4] = float("-inf")  # a padded row
    module = torch.nn.Module().eval()
    module.num_key_value_groups, module.head_dim = heads // kv_heads, d
    for m in (mask, None):
        want = eager_attention_forward(module, q, k, v, m, scaling=d ** -0.5, softcap=softcap)
        got = data._grouped_eager(module, q, k, v, m, scaling=d ** -0.5, softcap=softcap)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_sampling_with_grouped_eager_attention_draws_what_eager_draws(arch, tiny_source, tiny_hf_dir, monkeypatch):
    monkeypatch.setattr(data, "has_amx", lambda: False)
    model, tok = tiny_source(arch).model, AutoTokenizer.from_pretrained(tiny_hf_dir)
    cfg, cpu = CalibConfig("self", nsamples=4, seqlen=48, seed=2), torch.device("cpu")
    ours = calibration_tokens(cfg, model, tok, cpu)
    monkeypatch.setattr(data, "GROUPED_EAGER", "eager")
    assert torch.equal(ours, calibration_tokens(cfg, model, tok, cpu))
