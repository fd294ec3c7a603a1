"""Perplexity and KL divergence from a reference, for any backend that maps token ids to logits.

Every backend (torch here, llama.cpp and onnxruntime in runtime_tests) is scored by these functions
on the same windows, so numbers are comparable across runtimes: each window of ``ctx`` tokens is
evaluated from scratch and its tokens 1..ctx-1 are scored.

KL divergence is what ``llama-perplexity --kl-divergence`` reports: per scored token,
KL(P_ref || P_test) over the whole vocabulary, with P the softmax of the logits at that position;
the summary gives its mean, median, 99th percentile and maximum, and the share of positions where
both models put the same token first.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from d2quant.errors import D2Error


class LogitsBackend(Protocol):
    name: str

    def tokenize(self, text: str) -> list[int]: ...

    def logits(self, ids: list[int]) -> np.ndarray:  # [T, vocab] float32
        ...


@dataclass
class Perplexity:
    ppl: float
    nll: float
    tokens: int
    windows: int
    backend: str


@dataclass
class Divergence:
    """KL(reference || test) per scored token, summarised; top1 = share of equal argmaxes."""

    mean_kl: float
    median_kl: float
    p99_kl: float
    max_kl: float
    top1: float
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def check_windows(ctx: int, max_windows: int | None) -> None:
    """Refuse window settings that score nothing (a window predicts ctx - 1 tokens)."""
    if ctx < 2:
        raise D2Error(f"--ctx {ctx}: a window needs at least 2 tokens; use --ctx 512 as llama.cpp does")
    if max_windows is not None and max_windows < 1:
        raise D2Error(f"--max-windows {max_windows}: give at least 1, or leave it out for every window")


def windows(ids: list[int], ctx: int, max_windows: int | None, spread: bool = False) -> list[list[int]]:
    """Non-overlapping windows of ``ctx`` tokens: the first ``max_windows``, or (``spread``) that
    many spaced evenly over the whole text, so a corpus of several documents is sampled throughout."""
    check_windows(ctx, max_windows)
    n = len(ids) // ctx
    if n == 0:
        raise D2Error(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}; "
                      "give a longer text or a smaller --ctx")
    take = n if max_windows is None else min(n, max_windows)
    starts = [(i * n // take) * ctx for i in range(take)] if spread else [i * ctx for i in range(take)]
    return [ids[s:s + ctx] for s in starts]


def log_probs(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def log_softmax_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Summed NLL of ids[1:] under logits[:-1] (float64 for a stable sum)."""
    lg = torch.from_numpy(np.asarray(logits[:-1], dtype=np.float32)).double()
    tgt = torch.tensor(ids[1:])
    return float(-torch.log_softmax(lg, -1).gather(1, tgt[:, None]).sum())


def token_kl(ref_logprobs: np.ndarray, test_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position: KL(P_ref || P_test) and whether both argmaxes agree. ``ref_logprobs`` are
    log-probabilities (any float dtype), ``test_logits`` raw logits, both [T, V]."""
    if ref_logprobs.shape != test_logits.shape:
        raise D2Error(f"reference logits {tuple(ref_logprobs.shape)} and test logits "
                      f"{tuple(test_logits.shape)} differ in shape: the models have other vocabularies")
    # float32 elementwise, float64 sums: KL(P||Q) = sum p (lp - x) + logsumexp(x) sum p. To 1e-6 of
    # the float64 formula on 262144-token vocabularies (Gemma 3), 3x faster; the argmax of the
    # logits is that of their log-softmax
    lp = torch.from_numpy(np.asarray(ref_logprobs, dtype=np.float32))
    x = torch.from_numpy(np.asarray(test_logits, dtype=np.float32))
    m = x.max(-1, keepdim=True).values
    lse = m.squeeze(-1).double() + torch.exp(x - m).sum(-1, dtype=torch.float64).log()
    p = lp.exp()
    kl = (p * (lp - x)).sum(-1, dtype=torch.float64) + lse * p.sum(-1, dtype=torch.float64)
    return np.maximum(kl.numpy(), 0.0), (lp.argmax(-1) == x.argmax(-1)).numpy()


def summarize_kl(kl: np.ndarray, agree: np.ndarray) -> Divergence:
    kl = np.asarray(kl, dtype=np.float64)
    return Divergence(mean_kl=float(kl.mean()), median_kl=float(np.median(kl)),
                      p99_kl=float(np.percentile(kl, 99)), max_kl=float(kl.max()),
                      top1=float(np.asarray(agree).mean()), tokens=int(kl.size))


def _scored(wins: list[list[int]], logits_of: Callable[[list[int]], np.ndarray],
            on_window: Callable[[int, int], None] | None) -> Iterator[tuple[list[int], np.ndarray]]:
    for i, w in enumerate(wins):
        yield w, logits_of(w)
        if on_window:
            on_window(i + 1, len(wins))


def perplexity(backend: LogitsBackend, text: str, ctx: int = 512, max_windows: int | None = None,
               on_window: Callable[[int, int], None] | None = None, spread: bool = False) -> Perplexity:
    wins = windows(backend.tokenize(text), ctx, max_windows, spread)
    nll, count = 0.0, 0
    for w, lg in _scored(wins, backend.logits, on_window):
        nll += log_softmax_nll(lg, w)
        count += len(w) - 1
    return Perplexity(ppl=math.exp(nll / count), nll=nll / count, tokens=count, windows=len(wins),
                      backend=backend.name)


def check_same_tokens(reference: LogitsBackend, backend: LogitsBackend, text: str) -> list[int]:
    """The token ids both backends give ``text`` (KLD compares positions, so they must agree)."""
    ids, ref_ids = backend.tokenize(text), reference.tokenize(text)
    if ids != ref_ids:
        first = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
        raise D2Error(f"the reference ({reference.name}) tokenizes the text differently from "
                      f"{backend.name} (first difference at token {first}); KL divergence needs "
                      "the same tokenizer: compare models of one family")
    return ids


def divergence(reference: LogitsBackend, backend: LogitsBackend, text: str, ctx: int = 512,
               max_windows: int | None = None, spread: bool = False,
               on_window: Callable[[int, int], None] | None = None) -> tuple[Perplexity, Perplexity, Divergence]:
    """(reference perplexity, backend perplexity, KL(reference || backend)) on the same windows."""
    wins = windows(check_same_tokens(reference, backend, text), ctx, max_windows, spread)
    kls, agrees, nll_ref, nll, count = [], [], 0.0, 0.0, 0
    for w, lg in _scored(wins, backend.logits, on_window):
        ref = reference.logits(w)
        kl, agree = token_kl(log_probs(ref[:-1]), lg[:-1])
        kls.append(kl)
        agrees.append(agree)
        nll_ref += log_softmax_nll(ref, w)
        nll += log_softmax_nll(lg, w)
        count += len(w) - 1
    ppl = lambda total, name: Perplexity(math.exp(total / count), total / count, count, len(wins), name)  # noqa: E731
    return (ppl(nll_ref, reference.name), ppl(nll, backend.name),
            summarize_kl(np.concatenate(kls), np.concatenate(agrees)))


class TorchBackend:
    """A transformers model (full precision source, or QuantizedModel.to_torch())."""

    name = "torch"

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu"):
        self.model, self.tokenizer, self.device = model.to(device).eval(), tokenizer, device

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def logits(self, ids: list[int]) -> np.ndarray:
        x = torch.tensor([ids], device=self.device)
        return self.model(input_ids=x, use_cache=False).logits[0].float().cpu().numpy()
