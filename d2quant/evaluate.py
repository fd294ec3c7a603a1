"""Perplexity over non-overlapping windows, for any backend that maps token ids to logits.

Every backend (torch here, llama.cpp and onnxruntime in runtime_tests) is scored by this one
function on the same windows, so numbers are comparable across runtimes: each window of ``ctx``
tokens is evaluated from scratch and its tokens 1..ctx-1 are scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

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


def windows(ids: list[int], ctx: int, max_windows: int | None) -> list[list[int]]:
    n = len(ids) // ctx
    if n == 0:
        raise D2Error(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    n = n if max_windows is None else min(n, max_windows)
    return [ids[i * ctx:(i + 1) * ctx] for i in range(n)]


def log_softmax_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Summed NLL of ids[1:] under logits[:-1] (float64 for a stable sum)."""
    lg = torch.from_numpy(np.asarray(logits[:-1], dtype=np.float32)).double()
    tgt = torch.tensor(ids[1:])
    return float(-torch.log_softmax(lg, -1).gather(1, tgt[:, None]).sum())


def perplexity(backend: LogitsBackend, text: str, ctx: int = 512, max_windows: int | None = None,
               on_window: Callable[[int, int], None] | None = None) -> Perplexity:
    wins = windows(backend.tokenize(text), ctx, max_windows)
    nll, count = 0.0, 0
    for i, w in enumerate(wins):
        nll += log_softmax_nll(backend.logits(w), w)
        count += len(w) - 1
        if on_window:
            on_window(i + 1, len(wins))
    return Perplexity(ppl=math.exp(nll / count), nll=nll / count, tokens=count, windows=len(wins),
                      backend=backend.name)


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
