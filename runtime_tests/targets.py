"""Open any d2export target as a logits backend: source model, checkpoint, .gguf or ONNX folder."""

from __future__ import annotations

from pathlib import Path

from d2quant.errors import D2Error
from d2quant.evaluate import LogitsBackend, TorchBackend
from d2quant.qmodel import QuantizedModel, is_checkpoint

BACKENDS = ("auto", "torch", "llamacpp", "onnxruntime")


def target_kind(target: str | None) -> str:
    """'checkpoint' | 'gguf' | 'onnx' | 'source'."""
    if target is None:
        return "source"
    p = Path(target)
    if is_checkpoint(p):
        return "checkpoint"
    if p.is_dir() and any(p.glob("*.onnx")):
        return "onnx"
    if p.suffix == ".gguf":
        return "gguf"
    return "source"


def open_backend(target: str | None, backend: str = "auto", device: str = "cpu",
                 ctx: int = 512) -> LogitsBackend:
    if backend not in BACKENDS:
        raise D2Error(f"unknown --backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    kind = target_kind(target)
    if backend == "auto":
        backend = {"gguf": "llamacpp", "onnx": "onnxruntime"}.get(kind, "torch")
    if backend == "llamacpp":
        if kind != "gguf":
            raise D2Error(f"--backend llamacpp needs a .gguf file, got {target}")
        from runtime_tests.llamacpp import LlamaCppDecoder
        return LlamaCppDecoder(target, n_ctx=ctx)
    if backend == "onnxruntime":
        if kind != "onnx":
            raise D2Error(f"--backend onnxruntime needs an ONNX output folder, got {target}")
        from runtime_tests.onnxrt import OrtDecoder
        return OrtDecoder(target)
    if kind == "onnx":
        raise D2Error("an ONNX folder runs only on --backend onnxruntime")
    if kind == "checkpoint":
        qm = QuantizedModel.load(target)
        return TorchBackend(qm.to_torch(), qm.tokenizer, device)
    from d2quant.sources import load_source
    src = load_source(target)
    return TorchBackend(src.model, src.tokenizer, device)
