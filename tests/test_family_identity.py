"""The model-family adapters moved LLaMA, Mistral, Qwen2 and Qwen3 without changing a byte.

The fingerprints below were computed by this same function with the code before the adapters
(commit 5ec3527): tiny random models of each family through the pipeline's RTN path onto uniform
grids without a clipping search (min/max only, so the integers are the same on any IEEE machine),
written to GGUF (every tensor's bytes and type, every metadata field but the recipe) and to ONNX
(every initializer's bytes, every node). The calibrated paths (GPTQ, D²Quant) were compared the
same way once, on this machine, against that commit: identical for all four families, except that
Mistral's calibration now applies its sliding window (the replay ignored it before); their floats
depend on the CPU's BLAS, so they are not pinned here.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

BEFORE = {
    "llama-gguf-tensors": "32a2ae1c7a21b23f",
    "llama-gguf-fields": "6009b347daeb69cd",
    "llama-onnx-initializers": "ebf6f150c27a3477",
    "llama-onnx-nodes": "2d5f8e0c64fb51d0",
    "mistral-gguf-tensors": "32a2ae1c7a21b23f",
    "mistral-gguf-fields": "1a25210c978ebe63",
    "mistral-onnx-initializers": "ebf6f150c27a3477",
    "mistral-onnx-nodes": "e45b70bba7703967",
    "qwen2-gguf-tensors": "2ff0cc09bda314ca",
    "qwen2-gguf-fields": "d70d570a711d388b",
    "qwen2-onnx-initializers": "e5d0a9fbfc1038d0",
    "qwen2-onnx-nodes": "840d374d9045b310",
    "qwen3-gguf-tensors": "3cf85bbe69de10f5",
    "qwen3-gguf-fields": "21ae1a15e992cb92",
    "qwen3-onnx-initializers": "50373534a1387c04",
    "qwen3-onnx-nodes": "0595b77bee26f675",
}


def fingerprints(tmp: Path) -> dict:
    import gguf, onnx
    from converters.gguf import write_gguf
    from converters.onnx import write_onnx
    from d2quant.pipeline import QuantConfig, quantize
    from d2quant.qmodel import ModelSpec
    from d2quant.sources import Source
    from tests.conftest import tiny_model
    from tests.test_gguf_export import tiny_tokenizer

    h = lambda b: hashlib.sha256(b).hexdigest()[:16]
    out = {}
    for arch in ("llama", "mistral", "qwen2", "qwen3"):
        m = tiny_model(arch, seed=0, hidden_size=256, intermediate_size=512, head_dim=64, vocab_size=512)
        spec = ModelSpec.from_hf_config(m.config)
        grid = {"kind": "uniform", "bits": 3, "group": 64, "clip_search": False}
        names = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
        qm = quantize(Source(m, tiny_tokenizer(), spec, {"kind": "hf", "path": f"tiny-{arch}"}), None,
                      QuantConfig(method="rtn", grids={n: grid for n in names}))
        path = tmp / f"{arch}.gguf"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_gguf(qm, path)
        r = gguf.GGUFReader(str(path))
        out[f"{arch}-gguf-tensors"] = h(json.dumps({t.name: h(bytes(t.data)) + t.tensor_type.name
                                                    for t in r.tensors}, sort_keys=True).encode())
        out[f"{arch}-gguf-fields"] = h(json.dumps({k: str(v.contents()) for k, v in r.fields.items()
                                                   if k != "d2export.recipe"}).encode())
        model = onnx.load(str(write_onnx(qm, tmp / f"{arch}-onnx") / "model.onnx"))
        out[f"{arch}-onnx-initializers"] = h(json.dumps({i.name: h(onnx.numpy_helper.to_array(i).tobytes())
                                                         for i in model.graph.initializer}).encode())
        out[f"{arch}-onnx-nodes"] = h(json.dumps([(n.op_type, list(n.input), list(n.output), str(n.attribute))
                                                  for n in model.graph.node]).encode())
    return out


def test_families_write_the_bytes_they_wrote_before_the_adapters(tmp_path):
    assert fingerprints(tmp_path) == BEFORE
