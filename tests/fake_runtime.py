"""Stand-ins for a native runtime that dies the way a miscompiled llama.cpp does (SIGILL).

The workers of runtime_tests.isolation build these in their child process, so a test can prove
that the crash stays there and becomes one clear error line.
"""

from __future__ import annotations

import os
import signal


def _die(sig: int = signal.SIGILL) -> None:
    os.kill(os.getpid(), sig)


class CrashingLlama:
    """Loads, answers ``tokenize``, dies with SIGILL in ``logits`` and ``complete``."""

    def __init__(self, path: str, n_ctx: int = 512, n_threads: int | None = None):
        self.path = path

    def describe(self) -> dict:
        return {"n_vocab": 512}

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return [ord(c) % 512 for c in text]

    def logits(self, ids):
        _die()

    def complete(self, prompt: str, max_tokens: int, chat: bool):
        yield "first piece"
        _die()

    def close(self) -> None:
        pass


class CrashingOrt:
    """An onnxruntime session whose first run dies with SIGSEGV."""

    def __init__(self, path: str, **kw):
        pass

    def describe(self) -> dict:
        return {"load_seconds": 0.0, "input_names": ["input_ids"]}

    def logits(self, ids):
        _die(signal.SIGSEGV)

    generate = logits_incremental = logits


class CrashingAtLoad:
    def __init__(self, *a, **kw):
        _die()
