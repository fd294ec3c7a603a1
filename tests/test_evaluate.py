"""Perplexity windows and KL divergence from a reference (what llama-perplexity --kl-divergence
reports), checked against hand-computed values and on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from d2quant.errors import D2Error
from d2quant.evaluate import (TorchBackend, divergence, log_probs, perplexity, summarize_kl,
                              token_kl, windows)
from tests.conftest import tiny_model


class CharTokenizer:
    """One token per character (ids < 256), no special tokens."""

    def __init__(self, shift: int = 0):
        self.shift = shift

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [(ord(c) + self.shift) % 256 for c in text]}


def test_token_kl_by_hand():
    p = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    q_logits = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]])) + 3.0  # logits, any offset
    kl, agree = token_kl(p, q_logits)
    # 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0.25 ln(1) = 0.25 ln 2; identical rows give 0
    np.testing.assert_allclose(kl, [0.25 * math.log(2), 0.0], atol=1e-7)
    assert agree.tolist() == [False, True]
    # float32 terms with float64 sums: the float64 formula's value on a large vocabulary
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 100_000)) * 3).astype(np.float32)
    ref = log_probs(x + rng.standard_normal(x.shape).astype(np.float32)).astype(np.float16)
    lp, lq = ref.astype(np.float64), log_probs(x)
    np.testing.assert_allclose(token_kl(ref, x)[0], (np.exp(lp) * (lp - lq)).sum(-1), atol=1e-6)
    s = summarize_kl(np.array([0.0, 1.0, 2.0, 3.0]), np.array([True, True, False, True]))
    assert (s.mean_kl, s.median_kl, s.max_kl, s.top1) == (1.5, 1.5, 3.0, 0.75)
    assert s.p99_kl == pytest.approx(2.97)


def test_divergence_on_a_tiny_model_equals_torch_kl():
    ref_model = tiny_model("llama", seed=0, vocab_size=256)
    test_model = tiny_model("llama", seed=0, vocab_size=256)
    with torch.no_grad():
        for p in test_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tok = CharTokenizer()
    text = "the quick brown fox jumps over the lazy dog, " * 20
    ref, test = TorchBackend(ref_model, tok), TorchBackend(test_model, tok)
    ppl_ref, ppl_test, kld = divergence(ref, test, text, ctx=64, max_windows=3)
    ids = tok(text)["input_ids"]
    want, top = [], []
    with torch.no_grad():
        for w in windows(ids, 64, 3):
            lp = torch.log_softmax(ref_model(torch.tensor([w])).logits[0, :-1].double(), -1)
            lq = torch.log_softmax(test_model(torch.tensor([w])).logits[0, :-1].double(), -1)
            want.append((lp.exp() * (lp - lq)).sum(-1))
            top.append(lp.argmax(-1) == lq.argmax(-1))
    want = torch.cat(want)
    assert kld.tokens == 3 * 63 and kld.mean_kl > 0
    assert kld.mean_kl == pytest.approx(float(want.mean()), rel=1e-4)
    assert kld.max_kl == pytest.approx(float(want.max()), rel=1e-4)
    assert kld.top1 == pytest.approx(float(torch.cat(top).double().mean()))
    assert ppl_ref.ppl == pytest.approx(perplexity(ref, text, 64, 3).ppl)
    assert ppl_test.ppl == pytest.approx(perplexity(test, text, 64, 3).ppl)
    _, _, self_kld = divergence(ref, ref, text, ctx=64, max_windows=2)
    assert self_kld.max_kl < 1e-6 and self_kld.top1 == 1.0  # zero to float32 rounding


def test_a_reference_with_another_tokenizer_or_vocabulary_is_refused():
    text = "abcdefgh" * 40
    ref = TorchBackend(tiny_model("llama", vocab_size=256), CharTokenizer())
    with pytest.raises(D2Error, match="tokenizes the text differently"):
        divergence(ref, TorchBackend(tiny_model("llama", vocab_size=256), CharTokenizer(1)), text, ctx=32)
    with pytest.raises(D2Error, match="other vocabularies"):
        divergence(ref, TorchBackend(tiny_model("llama", vocab_size=300), CharTokenizer()), text, ctx=32)


def test_windows_first_or_spread_over_the_text():
    ids = list(range(100))
    assert [w[0] for w in windows(ids, 10, 3)] == [0, 10, 20]
    assert [w[0] for w in windows(ids, 10, 3, spread=True)] == [0, 30, 60]
    assert len(windows(ids, 10, None, spread=True)) == 10
    with pytest.raises(D2Error, match="fewer than one window"):
        windows(ids[:5], 10, 3)
    assert np.allclose(np.exp(log_probs(np.array([[1.0, 2.0, 3.0]]))).sum(), 1.0)
