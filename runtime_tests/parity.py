"""What both runtime parity harnesses share: the token windows, torch's logits and greedy tokens,
and one comparison of two runs' logits."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from d2quant.evaluate import log_probs

# A flip of the best token only counts where the reference's best logit leads the runner-up by this
# many nats (on flat random-weight models about 5% of all positions are near-ties).
TOP1_MARGIN = 1.0


def parity_windows(ids: list[int] | None, n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` windows of ``length`` consecutive ids (the text repeated if short), or random tokens
    when there is no text: they exercise every weight just as well."""
    if ids:
        ids = (ids * -(-n * length // len(ids)))[:n * length]
        return [ids[i * length:(i + 1) * length] for i in range(n)]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, length).tolist() for _ in range(n)]


@torch.no_grad()
def torch_logits(model, windows: list[list[int]]) -> list[np.ndarray]:
    return [model(torch.tensor([w]), use_cache=False).logits[0].float().numpy() for w in windows]


@torch.no_grad()
def torch_greedy(model, ids: list[int], n: int, eos: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """Greedy tokens through the model's KV cache, each with the logits row it was chosen from."""
    out = model(input_ids=torch.tensor([list(ids)]), use_cache=True)
    for _ in range(n):
        row = out.logits[0, -1].float().numpy()
        token = int(row.argmax())
        yield token, row
        if token == eos:
            return
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)


def compare_logits(ref: list[np.ndarray], test: list[np.ndarray], windows: list[list[int]],
                   tie: float | None = None) -> dict:
    """KL(ref || test) per position, top-1 agreement (all positions and decisive ones), max |diff|
    (also relative to the reference's range, worst window), next-token perplexities and, given
    ``tie``, the top-1 flips where the reference's two best logits are ``tie`` or more apart."""
    kl, top1, decisive, flips, nll_ref, nll_test = [], [], [], 0, [], []
    max_abs, rel = 0.0, 0.0
    for r, t, ids in zip(ref, test, windows):
        lr, lt = log_probs(r), log_probs(t)
        kl.append((np.exp(lr) * (lr - lt)).sum(-1))
        agree = r.argmax(-1) == t.argmax(-1)
        top1.append(agree)
        top2 = np.partition(r, r.shape[-1] - 2, -1)[:, -2:]  # the two best, in order (a sort took 2 s)
        gap = top2[:, 1] - top2[:, 0]
        decisive.append(gap >= TOP1_MARGIN)
        if tie is not None:
            flips += int((~agree & (gap >= tie)).sum())
        diff = float(np.abs(r - t).max())
        max_abs, rel = max(max_abs, diff), max(rel, diff / max(1.0, float(np.abs(r).max())))
        nxt = np.asarray(ids[1:])
        nll_ref.append(-lr[np.arange(len(nxt)), nxt])
        nll_test.append(-lt[np.arange(len(nxt)), nxt])
    kl, top1, decisive = np.concatenate(kl), np.concatenate(top1), np.concatenate(decisive)
    ppl_ref, ppl_test = (math.exp(float(np.concatenate(x).mean())) for x in (nll_ref, nll_test))
    out = {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "top1_agreement": float(top1.mean()),
           "top1_decisive": float(top1[decisive].mean()) if decisive.any() else None,
           "n_decisive": int(decisive.sum()), "n_tokens": int(top1.size), "max_abs_diff": max_abs,
           "rel_max_abs_diff": rel, "ppl_reference": ppl_ref, "ppl_test": ppl_test,
           "ppl_ratio": ppl_test / ppl_ref}
    if tie is not None:
        out["top1_flips_not_near_tie"] = flips
    return out
