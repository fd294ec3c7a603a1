"""An exported decoder in an onnxruntime session (batch 1), inside the worker process.

The KV cache stays here: only logits rows and token ids cross the pipe to the caller.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from d2quant.errors import D2Error

REINSTALL = "pip install --force-reinstall onnxruntime"


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise D2Error(f"onnxruntime does not import ({str(e).splitlines()[0]}); reinstall it: `{REINSTALL}`") from None
    return ort


def _providers(ort, providers: list[str] | None) -> list[str]:
    if providers:
        return providers
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtModel:
    def __init__(self, path: str, accuracy_level: int | None = None,
                 providers: list[str] | None = None, threads: int | None = None):
        ort = _ort()
        path = Path(path)
        self.model_dir = path.parent
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        t0 = time.perf_counter()
        try:
            if accuracy_level is None:
                self.session = ort.InferenceSession(str(path), so, providers=_providers(ort, providers))
            else:
                self.session = self._with_accuracy_level(ort, path, so, accuracy_level, providers)
        except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / ... types
            if isinstance(e, D2Error):
                raise
            raise D2Error(f"onnxruntime cannot load {path} ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200]}); the file is corrupt or not a "
                          "graph it supports") from None
        self.load_seconds = time.perf_counter() - t0
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        self.input_names = set(inputs)  # other exporters leave position_ids out
        if not self.past_names:
            raise D2Error(f"{path} has no past_key_values inputs; it is not a decoder with a KV cache")
        _, self.kv_heads, _, self.head_dim = inputs[self.past_names[0]]
        if not isinstance(self.head_dim, int):  # symbolic in onnxruntime-genai's builder output
            self.head_dim = self._genai_decoder_config().get("head_size")
            if not isinstance(self.head_dim, int):
                raise D2Error(f"{self.model_dir}: the KV cache's head size is neither in the graph nor in "
                              "genai_config.json")

    @staticmethod
    def _with_accuracy_level(ort, path: Path, so, level: int, providers):
        import onnx

        # the level is a MatMulNBits attribute: rewrite it in memory, weights stay in the file
        model = onnx.load(str(path), load_external_data=False)
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                for a in node.attribute:
                    if a.name == "accuracy_level":
                        a.i = level
        # and for graphs where onnxruntime fuses DequantizeLinear+MatMul into MatMulNBits
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
        so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                    str(path.parent))
        return ort.InferenceSession(model.SerializeToString(), so, providers=_providers(ort, providers))

    def _genai_decoder_config(self) -> dict:
        try:
            return json.loads((self.model_dir / "genai_config.json").read_text())["model"]["decoder"]
        except (OSError, ValueError, KeyError):
            return {}

    def describe(self) -> dict:
        return {"load_seconds": self.load_seconds, "input_names": sorted(self.input_names)}

    def empty_cache(self) -> list[np.ndarray]:
        return [np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.past_names]

    def forward(self, ids, cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [S, V] of tokens ``ids`` after the cached ones, and the grown cache."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        past = cache[0].shape[2]
        feeds = {"input_ids": ids,
                 "attention_mask": np.ones((1, past + ids.shape[1]), np.int64),
                 "position_ids": np.arange(past, past + ids.shape[1], dtype=np.int64)[None]}
        feeds.update(zip(self.past_names, cache))
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        out = self.session.run(["logits", *self.present_names], feeds)
        return out[0][0], out[1:]

    def logits(self, ids) -> np.ndarray:
        """Full-sequence logits [S, V] from one prefill."""
        return self.forward(ids, self.empty_cache())[0]

    def prefill_seconds(self, ids) -> float:
        """Wall time of one prefill of ``ids``, measured here (no transfer of the logits)."""
        t = time.perf_counter()
        self.forward(ids, self.empty_cache())
        return time.perf_counter() - t

    def logits_incremental(self, ids) -> np.ndarray:
        """Logits [S, V] decoding one token at a time through the KV cache."""
        cache, rows = self.empty_cache(), []
        for t in ids:
            row, cache = self.forward([t], cache)
            rows.append(row[0])
        return np.stack(rows)

    def generate(self, prompt_ids, max_new_tokens: int, eos_id: int | None = None):
        """Greedy continuation (token ids), yielding each new token as it is decoded."""
        logits, cache = self.forward(prompt_ids, self.empty_cache())
        for _ in range(max_new_tokens):
            token = int(logits[-1].argmax())
            yield token
            if token == eos_id:
                return
            logits, cache = self.forward([token], cache)
