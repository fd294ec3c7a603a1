"""Greedy text streaming from any target, so a user can try the model they made."""

from __future__ import annotations

from typing import Iterable, Iterator

from runtime_tests.parity import torch_greedy
from runtime_tests.targets import target_kind


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _detokenize(tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Text pieces as tokens arrive (decoding the whole tail keeps multi-byte characters whole)."""
    done, text = [], ""
    for t in ids:
        done.append(t)
        new = tokenizer.decode(done, skip_special_tokens=True)
        if not new.endswith("\ufffd"):
            yield new[len(text):]
            text = new


def stream(target: str | None, prompt: str, max_new_tokens: int, chat: bool = True) -> Iterator[str]:
    kind = target_kind(target)
    if kind == "gguf":
        from runtime_tests.llamacpp import LlamaCppDecoder

        dec = LlamaCppDecoder(target, n_ctx=2048)
        try:
            yield from dec.complete(prompt, max_new_tokens, chat)
        finally:
            dec.close()
        return
    if kind == "onnx":
        from runtime_tests.onnxrt import OrtDecoder

        dec = OrtDecoder(target)
        tok = dec.tokenizer
        try:
            yield from _detokenize(tok, dec.generate(_prompt_ids(tok, prompt, chat), max_new_tokens,
                                                     tok.eos_token_id))
        finally:
            dec.close()
        return
    if kind == "checkpoint":
        from d2quant.qmodel import QuantizedModel

        qm = QuantizedModel.load(target)
        model, tok = qm.to_torch(), qm.tokenizer
    else:
        from d2quant.sources import load_source

        src = load_source(target)
        model, tok = src.model, src.tokenizer
    yield from _detokenize(tok, (t for t, _ in torch_greedy(model, _prompt_ids(tok, prompt, chat),
                                                             max_new_tokens, tok.eos_token_id)))
