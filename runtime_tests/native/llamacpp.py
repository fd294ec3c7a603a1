"""A GGUF loaded in llama.cpp (llama-cpp-python), inside the worker process."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from d2quant.errors import D2Error
from runtime_tests.llamacpp_build import rebuild_command


def _llama_class():
    try:
        from llama_cpp import Llama
    except ImportError:
        raise D2Error("llama-cpp-python is not installed; install it with "
                      f"`{rebuild_command()}` (or `pip install 'd2export[llamacpp]'`)") from None
    except OSError as e:  # the package is there but libllama / libggml do not load
        raise D2Error(f"llama-cpp-python's libraries fail to load ({str(e).splitlines()[0]}); "
                      f"reinstall them: {rebuild_command()}") from None
    return Llama


class LlamaCppModel:
    def __init__(self, path: str, n_ctx: int = 512, n_threads: int | None = None):
        Llama = _llama_class()
        self.path, self.n_ctx = Path(path), n_ctx
        if not self.path.is_file():
            raise D2Error(f"GGUF file {self.path} does not exist")
        try:
            self.llm = Llama(model_path=str(self.path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx,
                             n_threads=n_threads, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise D2Error(f"llama.cpp cannot load {self.path} ({e}); the file is corrupt or not a "
                          "model it supports") from None

    def describe(self) -> dict:
        return {"n_vocab": self.llm.n_vocab()}

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        # special tokens written in the text (a literal "<unk>") are parsed, as transformers does
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        """[T, V] float32 logits at every position of ``ids`` (a fresh context each call)."""
        if len(ids) > self.n_ctx:
            raise D2Error(f"window of {len(ids)} tokens exceeds the context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32, copy=True)

    def complete(self, prompt: str, max_tokens: int, chat: bool) -> Iterator[str]:
        """Greedy text pieces: through the file's chat template, or a raw continuation."""
        if chat:
            for part in self.llm.create_chat_completion([{"role": "user", "content": prompt}],
                                                        max_tokens=max_tokens, temperature=0,
                                                        stream=True):
                yield part["choices"][0]["delta"].get("content", "")
        else:
            for part in self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0,
                                                   stream=True):
                yield part["choices"][0]["text"]

    def close(self) -> None:
        self.llm.close()
