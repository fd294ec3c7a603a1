"""The evaluation protocol of every quality benchmark: what calibrates, what scores, and how.

A quality claim names its domain. Calibrating and scoring on one corpus flatters every method that
fits its calibration text, so each benchmark row is calibrated on one of CALIBRATIONS and scored on
every set of EVAL_SETS, and every method of a row (ours, llama.cpp's importance matrix) gets the
very same calibration tokens:

  calibrations  wiki   random windows of wikitext-2 valid (seed 0)
                self   text the float model samples itself (``--calib self``, seed 0), generated
                       from the unpadded model so a padded twin gets the same tokens; kept under
                       out/calib as token ids and as text, so llama-imatrix can read the same text
                mix    half of each
  eval sets     wiki-test  wikitext-2 test, the first N windows (in-domain for ``wiki``)
                gutenberg  literature (bench/corpora.py), N windows spread over the text
                pydocs     Python documentation prose (bench/corpora.py), N windows spread

``domain(calib, set)`` labels a score: in-domain (wiki -> wiki-test), cross (self or mix -> any
set), out-of-domain (wiki -> a corpus). Per set a row has the perplexity and the KL divergence from
the float model in the same runtime (mean, median, p99, max, same top-1), as llama-perplexity
--kl-divergence reports it. The float model's log-probabilities are computed once per (model, set,
windows, runtime) and kept on disk in float16 (out/reference).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from corpora import corpus_path  # bench/ is on sys.path when run as a script
from d2quant.data import CalibConfig, calibration_tokens, read_text, wikitext_dir
from d2quant.errors import D2Error
from d2quant.evaluate import (LogitsBackend, log_probs, log_softmax_nll, summarize_kl, token_kl,
                              windows)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out"
CALIBRATIONS = ("wiki", "self", "mix")
EVAL_SETS = ("wiki-test", "gutenberg", "pydocs")
_PADDED_SUFFIX = "-pad"


def domain(calib: str, eval_set: str) -> str:
    if calib != "wiki":
        return "cross"
    return "in-domain" if eval_set == "wiki-test" else "out-of-domain"


def eval_text(eval_set: str) -> str:
    if eval_set == "wiki-test":
        return read_text(wikitext_dir() / "test.txt")
    if eval_set in ("gutenberg", "pydocs"):
        return read_text(corpus_path(eval_set))
    raise D2Error(f"unknown eval set {eval_set!r}; known: {', '.join(EVAL_SETS)}")


def eval_windows(tokenizer, eval_set: str, n: int, ctx: int) -> list[list[int]]:
    """Token windows of a set: wikitext's first n (as every earlier table), a corpus's n spread."""
    ids = tokenizer(eval_text(eval_set), add_special_tokens=False)["input_ids"]
    return windows(ids, ctx, n, spread=eval_set != "wiki-test")


# ---- calibration tokens -----------------------------------------------------------------------

def _base_name(model: str) -> str:
    head, sep, tail = model.rpartition(_PADDED_SUFFIX)
    return head if sep and tail.isdigit() else model


def calib_tokens(calib: str, model_name: str, model, tokenizer, nsamples: int, seqlen: int,
                 base_model: Callable[[], tuple] | None = None) -> torch.Tensor:
    """[nsamples, seqlen] calibration ids. ``base_model`` gives (model, tokenizer) of the unpadded
    model for self-generation (so a padded twin is calibrated on the same text)."""
    if calib not in CALIBRATIONS:
        raise D2Error(f"unknown calibration {calib!r}; known: {', '.join(CALIBRATIONS)}")
    if calib == "wiki":
        cfg = CalibConfig(str(wikitext_dir() / "valid.txt"), nsamples, seqlen, 0)
        return calibration_tokens(cfg, model, tokenizer, torch.device("cpu"))
    if calib == "mix":
        half = nsamples // 2
        return torch.cat([calib_tokens("wiki", model_name, model, tokenizer, half, seqlen),
                          calib_tokens("self", model_name, model, tokenizer, nsamples - half, seqlen,
                                       base_model)])
    path = OUT / "calib" / f"{_base_name(model_name)}-self-{nsamples}x{seqlen}-seed0.pt"
    if path.is_file():
        return torch.load(path)
    gen_model, gen_tok = base_model() if base_model else (model, tokenizer)
    ids = calibration_tokens(CalibConfig("self", nsamples, seqlen, 0), gen_model, gen_tok, torch.device("cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids, path)
    path.with_suffix(".txt").write_text("\n\n".join(gen_tok.decode(r) for r in ids.tolist()))
    return ids


# ---- scoring ----------------------------------------------------------------------------------

@dataclass
class EvalSet:
    name: str
    windows: list[list[int]]
    reference: np.memmap  # float16 log-probs of the float model [n_windows, ctx - 1, vocab]


def _reference_file(key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return OUT / "reference" / f"{key['model']}-{key['set']}-{digest}.f16"


def reference_logprobs(key: dict, wins: list[list[int]], vocab: int,
                       float_backend: Callable[[], LogitsBackend]) -> np.memmap:
    """The float model's log-probabilities on ``wins``, computed once and kept on disk."""
    path = _reference_file(key)
    shape = (len(wins), len(wins[0]) - 1, vocab)
    if path.is_file() and path.stat().st_size == int(np.prod(shape)) * 2:
        return np.memmap(path, dtype=np.float16, mode="r", shape=shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    out = np.memmap(tmp, dtype=np.float16, mode="w+", shape=shape)
    backend = float_backend()
    try:
        for i, w in enumerate(wins):
            out[i] = log_probs(backend.logits(w)[:-1]).astype(np.float16)
    finally:
        getattr(backend, "close", lambda: None)()
    out.flush()
    del out
    tmp.replace(path)
    return np.memmap(path, dtype=np.float16, mode="r", shape=shape)


def eval_sets(model: str, tokenizer, vocab: int, n_windows: int, ctx: int, runtime: str,
              float_backend: Callable[[], LogitsBackend], sets=EVAL_SETS) -> list[EvalSet]:
    out = []
    for name in sets:
        wins = eval_windows(tokenizer, name, n_windows, ctx)
        key = {"model": model, "set": name, "windows": len(wins), "ctx": ctx, "runtime": runtime,
               "first": wins[0][:8], "last": wins[-1][-8:]}
        out.append(EvalSet(name, wins, reference_logprobs(key, wins, vocab, float_backend)))
    return out


def score(backend: LogitsBackend, sets: list[EvalSet]) -> dict[str, dict]:
    """Per set: perplexity and KL divergence from the float model, over the same windows."""
    result = {}
    for s in sets:
        nll, count, kls, agrees = 0.0, 0, [], []
        for w, ref in zip(s.windows, s.reference):
            lg = backend.logits(w)
            nll += log_softmax_nll(lg, w)
            count += len(w) - 1
            kl, agree = token_kl(ref, lg[:-1])
            kls.append(kl)
            agrees.append(agree)
        kld = summarize_kl(np.concatenate(kls), np.concatenate(agrees))
        result[s.name] = {"ppl": round(float(np.exp(nll / count)), 4), "tokens": count,
                          "windows": len(s.windows), **{k: round(v, 6) if isinstance(v, float) else v
                                                        for k, v in kld.as_dict().items() if k != "tokens"}}
    return result
