"""The decoder graph: one float32 graph for prefill and one-token decode with an explicit KV cache.

Interface (onnxruntime-genai / optimum convention): inputs ``input_ids`` [batch, seq], ``attention_mask``
[batch, total] (1 for real tokens), ``position_ids`` [batch, seq], ``past_key_values.{i}.key|value``
[batch, kv_heads, past, head_dim]; outputs ``logits`` [batch, seq, vocab] and ``present.{i}.key|value``
[batch, kv_heads, total, head_dim]. Start with past length 0.

Ops: RMSNorm is ``SimplifiedLayerNormalization`` (onnxruntime's RMSNorm kernel, the one its own
model builder emits); attention is ``com.microsoft.GroupQueryAttention`` with rotary embedding
inside (do_rotary, half-split layout as transformers' rotate_half) from cos/sin caches computed by
transformers' own rotary module, so any static RoPE scaling (linear, llama3, yarn) is reproduced
exactly. GQA appends the new keys/values to the past itself, handles kv-head sharing and the causal
mask, and is what onnxruntime-genai drives. Its CPU kernel supports batches whose sequences are
right-padded (the attention mask gives each sequence's length), not left padding.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

import numpy as np
import torch
from onnx import TensorProto, helper

from converters.onnx.layouts import MS, emit_embedding, emit_linear, to_numpy
from converters.onnx.store import GraphStore
from d2quant.errors import D2Error
from d2quant.qmodel import QuantizedModel

EMBED_MODES = ("float", "quantized")
_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}
_HF_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def rope_caches(qm: QuantizedModel) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_positions, head_dim / 2] exactly as transformers computes them."""
    spec = qm.spec
    cfg = spec.hf()
    rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in _STATIC_ROPE:
        raise D2Error(f"RoPE type {rope_type!r} changes with sequence length; the ONNX export supports "
                      f"{', '.join(sorted(_STATIC_ROPE))}")
    module = importlib.import_module(f"transformers.models.{cfg.model_type}.modeling_{cfg.model_type}")
    rotary = getattr(module, f"{_HF_PREFIX[spec.arch]}RotaryEmbedding")(config=cfg)
    pos = torch.arange(spec.max_positions)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    half = spec.head_dim // 2
    return to_numpy(cos[0, :, :half]), to_numpy(sin[0, :, :half])


def sliding_windows(qm: QuantizedModel) -> list[int | None]:
    """Per layer: the attention window (tokens a query sees, itself included) or None for full."""
    cfg, n = qm.spec.hf_config, qm.spec.layers
    window = cfg.get("sliding_window")
    if not window:
        return [None] * n
    types = cfg.get("layer_types")
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * n if qm.spec.arch == "mistral" else [None] * n


class DecoderBuilder:
    """Builds the graph of ``qm`` into a GraphStore; ``meta`` maps every weight to its initializers."""

    def __init__(self, qm: QuantizedModel, g: GraphStore, *, embed: str, dsq_layout: str,
                 accuracy_level: int):
        if embed not in EMBED_MODES:
            raise D2Error(f"unknown embedding mode {embed!r}; choose one of {', '.join(EMBED_MODES)}")
        act = qm.spec.hf_config.get("hidden_act", "silu")
        if act != "silu":
            raise D2Error(f"activation {act!r} is not supported by the ONNX export (SwiGLU/silu only)")
        self.qm, self.g, self.spec = qm, g, qm.spec
        self.embed, self.dsq_layout, self.accuracy_level = embed, dsq_layout, accuracy_level
        self.meta: dict = {"linears": {}, "tensors": {}}
        self.shapes: dict[str, tuple[int, ...]] = {}  # of float initializers

    # ---- weights -------------------------------------------------------------------------
    def tensor(self, name: str) -> str:
        """A float tensor of the model by its transformers name, stored once."""
        if name not in self.meta["tensors"]:
            self.store_float(name, to_numpy(self.qm.tensors[name]))
        return self.meta["tensors"][name]

    def store_float(self, name: str, array: np.ndarray) -> str:
        self.meta["tensors"][name] = self.g.init(name, array.astype(np.float32))
        self.shapes[self.meta["tensors"][name]] = array.shape
        return self.meta["tensors"][name]

    def linear(self, name: str, x: str, source: str | None = None) -> str:
        """x @ W^T + b for the linear ``name``: quantized (from ``source``, default name) or float."""
        source = source or name
        ql = self.qm.linears.get(source)
        if ql is not None:
            if ql.bias is None and f"{name}.bias" in self.qm.tensors:  # lm_head's DAC shift
                ql = replace(ql, bias=self.qm.tensors[f"{name}.bias"])
            out, meta = emit_linear(self.g, name, ql, x, dsq_layout=self.dsq_layout,
                                    accuracy_level=self.accuracy_level)
        else:
            w = self.tensor(f"{source}.weight")
            bias = self.tensor(f"{name}.bias") if f"{name}.bias" in self.qm.tensors else None
            out = self.float_linear(name, x, w, bias)
            meta = {"layout": "float", "W": w, "bias": bias}
        meta["source"] = source
        self.meta["linears"][name] = meta
        return out

    def float_linear(self, name: str, x: str, w: str, bias: str | None) -> str:
        """x [B, S, K] @ W^T with W [N, K] as stored: Gemm(transB) on [B*S, K] reads W in place, so
        a table shared with the embedding Gather is not duplicated by a folded Transpose."""
        g, (n, k) = self.g, self.shapes[w]
        rows = g.op("Reshape", [x, g.const([-1, k])], f"{name}/rows")
        y = g.op("Gemm", [rows, w, *([bias] if bias else [])], f"{name}/Gemm", transB=1)
        lead = g.op("Slice", [g.op("Shape", [x], f"{name}/in_shape"), g.const([0]), g.const([-1])],
                    f"{name}/lead_dims")
        shape = g.op("Concat", [lead, g.const([n])], f"{name}/out_shape", axis=0)
        return g.op("Reshape", [y, shape], f"{name}/out")

    def rms_norm(self, name: str, x: str) -> str:
        return self.g.op("SimplifiedLayerNormalization", [x, self.tensor(f"{name}.weight")],
                         f"{name}/RMSNorm", axis=-1, epsilon=self.spec.rms_eps)

    # ---- graph ---------------------------------------------------------------------------
    def build(self) -> tuple[list, list]:
        spec, g = self.spec, self.g
        kv_shape = lambda s: ["batch", spec.kv_heads, s, spec.head_dim]  # noqa: E731
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                 ["batch", "sequence", spec.vocab])]
        for i in range(spec.layers):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}",
                                                            TensorProto.FLOAT, kv_shape("past")))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT,
                                                             kv_shape("total")))
        # GQA's view of the mask: per-sequence length - 1, and the longest total length
        mask_len = g.op("ReduceSum", ["attention_mask", g.const([1])], "attn/mask_sum", keepdims=0)
        seqlens = g.op("Cast", [g.op("Sub", [mask_len, g.const(1)], "attn/mask_sub")],
                       "attn/seqlens_k", to=TensorProto.INT32)
        total = g.op("Gather", [g.op("Shape", ["attention_mask"], "attn/mask_shape"), g.const(1)],
                     "attn/total_len_i64", axis=0)
        total = g.op("Cast", [total], "attn/total_len", to=TensorProto.INT32)
        cos, sin = rope_caches(self.qm)
        cos, sin = g.init("rope.cos_cache", cos), g.init("rope.sin_cache", sin)

        x = self.embedding()
        for i, window in enumerate(sliding_windows(self.qm)):
            x = self.layer(i, x, seqlens, total, cos, sin, window)
        x = self.rms_norm("model.norm", x)
        lm_source = self.lm_head_source()
        logits = self.linear("lm_head", x, lm_source)
        g.op("Identity", [logits], "logits/Identity", outputs=["logits"])
        return inputs, outputs

    def embedding(self) -> str:
        ql = self.qm.linears.get("model.embed_tokens")
        if self.embed == "quantized":
            if ql is None:
                raise D2Error("the model's embeddings are not quantized; quantize them in the "
                              "calibration step or export with float embeddings")
            out, meta = emit_embedding(self.g, "model.embed_tokens", ql, "input_ids")
            meta["source"] = "model.embed_tokens"
            self.meta["linears"]["model.embed_tokens"] = meta
            return out
        if ql is not None:  # keep the quantized table's exact values, in float
            self.store_float("model.embed_tokens.weight", ql.weight().numpy())
        return self.g.op("Gather", [self.tensor("model.embed_tokens.weight"), "input_ids"],
                         "model.embed_tokens/Gather", axis=0)

    def lm_head_source(self) -> str:
        if "lm_head" in self.qm.linears or "lm_head.weight" in self.qm.tensors:
            return "lm_head"
        if not self.spec.tie_embeddings:
            raise D2Error("the model has neither an lm_head nor tied embeddings; the checkpoint is incomplete")
        return "model.embed_tokens"

    def layer(self, i: int, x: str, seqlens: str, total: str, cos: str, sin: str,
              window: int | None) -> str:
        g, spec, p = self.g, self.spec, f"model.layers.{i}"
        h = self.rms_norm(f"{p}.input_layernorm", x)
        q = self.linear(f"{p}.self_attn.q_proj", h)
        k = self.linear(f"{p}.self_attn.k_proj", h)
        v = self.linear(f"{p}.self_attn.v_proj", h)
        if f"{p}.self_attn.q_norm.weight" in self.qm.tensors:  # Qwen3: RMSNorm per head before RoPE
            q = self.head_norm(f"{p}.self_attn.q_norm", q, spec.heads)
            k = self.head_norm(f"{p}.self_attn.k_norm", k, spec.kv_heads)
        attn = g.op("GroupQueryAttention",
                    [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens,
                     total, cos, sin, "position_ids"],
                    f"{p}.self_attn/GroupQueryAttention", domain=MS,
                    outputs=[f"{p}.self_attn/attn", f"present.{i}.key", f"present.{i}.value"],
                    num_heads=spec.heads, kv_num_heads=spec.kv_heads, do_rotary=1,
                    rotary_interleaved=0, scale=float(spec.head_dim ** -0.5),
                    local_window_size=window)
        x = g.op("Add", [x, self.linear(f"{p}.self_attn.o_proj", attn[0])], f"{p}/attn_residual")
        h = self.rms_norm(f"{p}.post_attention_layernorm", x)
        gate = self.linear(f"{p}.mlp.gate_proj", h)
        up = self.linear(f"{p}.mlp.up_proj", h)
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}.mlp/sigmoid")], f"{p}.mlp/silu")
        down = self.linear(f"{p}.mlp.down_proj", g.op("Mul", [act, up], f"{p}.mlp/swiglu"))
        return g.op("Add", [x, down], f"{p}/mlp_residual")

    def head_norm(self, name: str, x: str, heads: int) -> str:
        g = self.g
        per_head = g.op("Reshape", [x, g.const([0, 0, heads, self.spec.head_dim])], f"{name}/split_heads")
        y = self.rms_norm(name, per_head)
        return g.op("Reshape", [y, g.const([0, 0, heads * self.spec.head_dim])], f"{name}/merge_heads")
