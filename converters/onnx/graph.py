"""The decoder graph: one float32 graph for prefill and one-token decode with an explicit KV cache.

Interface (onnxruntime-genai / optimum convention): inputs ``input_ids`` [batch, seq], ``attention_mask``
[batch, total] (1 for real tokens), ``position_ids`` [batch, seq], ``past_key_values.{i}.key|value``
[batch, kv_heads, past, head_dim]; outputs ``logits`` [batch, seq, vocab] and ``present.{i}.key|value``
[batch, kv_heads, total, head_dim]. Start with past length 0.

Ops: RMSNorm is ``SimplifiedLayerNormalization`` (onnxruntime's RMSNorm kernel, the one its own
model builder emits); attention (``attention="gqa"``, the default) is ``com.microsoft.GroupQueryAttention`` with rotary embedding
inside (do_rotary, half-split layout as transformers' rotate_half) from cos/sin caches computed by
transformers' own rotary module, so any static RoPE scaling (linear, llama3, yarn) is reproduced
exactly. GQA appends the new keys/values to the past itself, handles kv-head sharing and the causal
mask, and is what onnxruntime-genai drives. Its CPU kernel supports batches whose sequences are
right-padded (the attention mask gives each sequence's length), not left padding.
``attention="ops"`` builds the same attention from standard ONNX ops (Gather'd RoPE tables, MatMul,
Softmax with an additive causal / padding / sliding-window mask, Concat for the cache), for
runtimes without the contrib op; BENCHMARKS.md compares their speed.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import torch
from onnx import TensorProto, helper

from converters.onnx.layouts import MS, UniformTable, emit_embedding, emit_linear, to_numpy
from converters.onnx.store import GraphStore
from d2quant.errors import D2Error
from d2quant.qmodel import QuantizedModel

_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}


class _Rotary:
    """The model's own rotary module (transformers'), where a family's position_embeddings finds it."""

    def __init__(self, qm: QuantizedModel):
        from transformers import AutoModelForCausalLM

        cfg = qm.spec.hf()
        cls = AutoModelForCausalLM._model_mapping[type(cfg)]
        prefix = qm.spec.family.hf_classes[0].removesuffix("ForCausalLM")
        self.rotary_emb = getattr(sys.modules[cls.__module__], f"{prefix}RotaryEmbedding")(config=cfg)


def rope_caches(qm: QuantizedModel) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer type: cos, sin [max_positions, head_dim / 2] exactly as transformers computes them."""
    spec, fam = qm.spec, qm.spec.family
    for params in _rope_parameter_sets(spec.hf_config):
        if params.get("rope_type", "default") not in _STATIC_ROPE:
            raise D2Error(f"RoPE type {params['rope_type']!r} changes with sequence length; the ONNX "
                          f"export supports {', '.join(sorted(_STATIC_ROPE))}")
    if spec.hf_config.get("partial_rotary_factor", 1.0) != 1.0:
        raise D2Error("partial rotary embeddings are not supported by the ONNX export")
    holder, pos, half = _Rotary(qm), torch.arange(spec.max_positions)[None], spec.head_dim // 2
    out = {}
    for layer_type in dict.fromkeys(fam.layer_types(spec.hf_config, spec.layers)):
        cos, sin = fam.position_embeddings(holder, torch.zeros(1, dtype=torch.float32), pos, layer_type)
        out[layer_type] = (to_numpy(cos[0, :, :half]), to_numpy(sin[0, :, :half]))
    return out


def rope_cache_nbytes(spec) -> int:
    """File bytes of the tables rope_caches gives: float32 cos and sin per layer type."""
    n_types = len(dict.fromkeys(spec.family.layer_types(spec.hf_config, spec.layers)))
    return n_types * 2 * spec.max_positions * (spec.head_dim // 2) * 4


def _rope_parameter_sets(cfg: dict) -> list[dict]:
    rp = cfg.get("rope_parameters") or {}
    nested = [v for v in rp.values() if isinstance(v, dict)]  # per layer type (Gemma 3)
    return nested or [rp]


class DecoderBuilder:
    """Builds the graph of ``qm`` into a GraphStore; ``meta`` maps every weight to its initializers."""

    def __init__(self, qm: QuantizedModel, g: GraphStore, *, embed: str, dsq_layout: str,
                 accuracy_level: int, attention: str = "gqa"):
        self.attention = attention
        self._masks: dict[int | None, str] = {}  # standard-ops attention: additive mask per window
        self._total: str | None = None
        self._tables: dict[str, UniformTable] = {}  # quantized tables a tied lm_head reuses
        self.qm, self.g, self.spec, self.family = qm, g, qm.spec, qm.spec.family
        if qm.spec.hf_config.get("attn_logit_softcapping") or qm.spec.hf_config.get("final_logit_softcapping"):
            raise D2Error("logit softcapping is not supported by the ONNX export")
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
                                    accuracy_level=self.accuracy_level,
                                    stored=self._tables.get(source))
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
        """RMSNorm; a family's weight offset (Gemma: x * (1 + w)) is added to the stored weight."""
        key, offset = f"{name}.weight", self.family.norm_offset
        if offset and key not in self.meta["tensors"]:
            self.store_float(key, to_numpy(self.qm.tensors[key]) + np.float32(offset))
            self.meta.setdefault("offsets", {})[key] = offset
        return self.g.op("SimplifiedLayerNormalization", [x, self.tensor(key)],
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
        seqlens = total = None
        if self.attention == "gqa":  # GQA's view of the mask: per-sequence length - 1, longest total
            mask_len = g.op("ReduceSum", ["attention_mask", g.const([1])], "attn/mask_sum", keepdims=0)
            seqlens = g.op("Cast", [g.op("Sub", [mask_len, g.const(1)], "attn/mask_sub")],
                           "attn/seqlens_k", to=TensorProto.INT32)
            total = g.op("Cast", [self._total_len()], "attn/total_len", to=TensorProto.INT32)
        tables = {}
        for n, (layer_type, (cos, sin)) in enumerate(rope_caches(self.qm).items()):
            tag = "" if n == 0 else f"_{layer_type}"  # the first (often only) table keeps the plain name
            cos, sin = g.init(f"rope.cos_cache{tag}", cos), g.init(f"rope.sin_cache{tag}", sin)
            if self.attention == "ops":  # [B, 1, S, D] tables at the tokens' positions
                cos, sin = self._rope_at_positions(cos, f"cos{tag}"), self._rope_at_positions(sin, f"sin{tag}")
            tables[layer_type] = (cos, sin)

        x = self.embedding()
        fam, cfg = self.family, spec.hf_config
        types, windows = fam.layer_types(cfg, spec.layers), fam.sliding_windows(cfg, spec.layers)
        for i, (layer_type, window) in enumerate(zip(types, windows)):
            x = self.layer(i, x, seqlens, total, *tables[layer_type], window)
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
            out, meta, self._tables["model.embed_tokens"] = emit_embedding(
                self.g, "model.embed_tokens", ql, "input_ids")
            meta["source"] = "model.embed_tokens"
            self.meta["linears"]["model.embed_tokens"] = meta
            return self._scaled(out)
        if ql is not None:  # keep the quantized table's exact values, in float
            self.store_float("model.embed_tokens.weight", ql.weight().numpy())
        return self._scaled(self.g.op("Gather", [self.tensor("model.embed_tokens.weight"), "input_ids"],
                                      "model.embed_tokens/Gather", axis=0))

    def _scaled(self, x: str) -> str:
        """The family's embedding scale (Gemma: sqrt(hidden), in float32 as transformers has it)."""
        scale = self.family.embed_scale(self.spec)
        if scale == 1.0:
            return x
        return self.g.op("Mul", [x, self.g.const(np.float32(scale), np.float32)], "model.embed_tokens/scale")

    def lm_head_source(self) -> str:
        if "lm_head" in self.qm.linears or "lm_head.weight" in self.qm.tensors:
            return "lm_head"
        if not self.spec.tie_embeddings:
            raise D2Error("the model has neither an lm_head nor tied embeddings; the checkpoint is incomplete")
        return "model.embed_tokens"

    def layer(self, i: int, x: str, seqlens: str, total: str, cos: str, sin: str,
              window: int | None) -> str:
        g, spec, fam, p = self.g, self.spec, self.family, f"model.layers.{i}"
        h = self.rms_norm(f"{p}.{fam.attn_norm}", x)
        q_size, kv_size = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        qkv = [self.linear(f"{p}.{lin.path}", h) for lin in fam.qkv]
        q, k, v = qkv if len(qkv) == 3 else self._split(qkv[0], [q_size, kv_size, kv_size], f"{p}.{fam.qkv[0].path}")
        if fam.qk_norms:  # RMSNorm per head before RoPE (Qwen3, Gemma 3)
            q = self.head_norm(f"{p}.{fam.qk_norms[0]}", q, spec.heads)
            k = self.head_norm(f"{p}.{fam.qk_norms[1]}", k, spec.kv_heads)
        if self.attention == "ops":
            attn = self.ops_attention(i, q, k, v, cos, sin, window)
        else:
            attn = g.op("GroupQueryAttention",
                        [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens,
                         total, cos, sin, "position_ids"],
                        f"{p}.self_attn/GroupQueryAttention", domain=MS,
                        outputs=[f"{p}.self_attn/attn", f"present.{i}.key", f"present.{i}.value"],
                        num_heads=spec.heads, kv_num_heads=spec.kv_heads, do_rotary=1,
                        rotary_interleaved=0, scale=float(fam.attention_scale(spec)),
                        local_window_size=window)[0]
        out = self.linear(f"{p}.{fam.o.path}", attn)
        if fam.attn_post_norm:
            out = self.rms_norm(f"{p}.{fam.attn_post_norm}", out)
        x = g.op("Add", [x, out], f"{p}/attn_residual")
        h = self.rms_norm(f"{p}.{fam.mlp_norm}", x)
        gate_up = [self.linear(f"{p}.{lin.path}", h) for lin in fam.gate_up]
        gate, up = gate_up if len(gate_up) == 2 else self._split(gate_up[0], [spec.ffn, spec.ffn],
                                                                 f"{p}.{fam.gate_up[0].path}")
        gated = g.op("Mul", [self._activation(gate, f"{p}.mlp"), up],
                     f"{p}.mlp/swiglu" if fam.activation == "silu" else f"{p}.mlp/gated")
        down = self.linear(f"{p}.{fam.down.path}", gated)
        if fam.mlp_post_norm:
            down = self.rms_norm(f"{p}.{fam.mlp_post_norm}", down)
        return g.op("Add", [x, down], f"{p}/mlp_residual")

    def _split(self, x: str, sizes: list[int], name: str) -> list[str]:
        """A fused linear's output cut along the features (q, k, v or gate, up)."""
        return self.g.op("Split", [x, self.g.const(sizes)], f"{name}/split", axis=-1,
                         outputs=[f"{name}/part{j}" for j in range(len(sizes))])

    def _activation(self, gate: str, name: str) -> str:
        g, act = self.g, self.family.activation
        if act == "silu":
            return g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{name}/sigmoid")], f"{name}/silu")
        if act == "gelu_tanh":
            return g.op("Gelu", [gate], f"{name}/gelu_tanh", approximate="tanh")
        raise D2Error(f"activation {act!r} is not supported by the ONNX export")

    # ---- attention in standard ONNX ops -----------------------------------------------------
    def _total_len(self) -> str:
        """Past + new tokens, as the attention mask's length (int64 scalar), made once."""
        if self._total is None:
            g = self.g
            self._total = g.op("Gather", [g.op("Shape", ["attention_mask"], "attn/mask_shape"),
                                          g.const(1)], "attn/total_len_i64", axis=0)
        return self._total

    def _rope_at_positions(self, table: str, name: str) -> str:
        """A [max_positions, D/2] cos or sin table -> [B, 1, S, D] at position_ids (halves repeated,
        the rotate_half form)."""
        g = self.g
        half = g.op("Gather", [table, "position_ids"], f"rope/{name}_at_positions", axis=0)
        full = g.op("Concat", [half, half], f"rope/{name}_full", axis=-1)
        return g.op("Unsqueeze", [full, g.const([1])], f"rope/{name}_per_head")

    def _heads(self, name: str, x: str, heads: int) -> str:
        """[B, S, heads * D] -> [B, heads, S, D]."""
        g = self.g
        split = g.op("Reshape", [x, g.const([0, 0, heads, self.spec.head_dim])], f"{name}/split_heads")
        return g.op("Transpose", [split], f"{name}/heads_first", perm=[0, 2, 1, 3])

    def _rotate(self, name: str, x: str, cos: str, sin: str) -> str:
        """RoPE on [B, heads, S, D]: x * cos + rotate_half(x) * sin."""
        g, half = self.g, self.spec.head_dim // 2
        x1 = g.op("Slice", [x, g.const([0]), g.const([half]), g.const([3])], f"{name}/first_half")
        x2 = g.op("Slice", [x, g.const([half]), g.const([2 * half]), g.const([3])], f"{name}/second_half")
        rot = g.op("Concat", [g.op("Neg", [x2], f"{name}/neg_second_half"), x1], f"{name}/rotate_half",
                   axis=3)
        return g.op("Add", [g.op("Mul", [x, cos], f"{name}/x_cos"), g.op("Mul", [rot, sin], f"{name}/rot_sin")],
                    f"{name}/rope")

    def _mask(self, window: int | None) -> str:
        """Additive mask [B, 1, 1, S, T]: 0 where a query may see a key; float32's lowest value for
        keys after its position, padding (attention_mask 0) and keys beyond a sliding window."""
        if window in self._masks:
            return self._masks[window]
        g, n = self.g, f"attn_mask_w{window or 0}"
        keys = g.op("Range", [g.const(0), self._total_len(), g.const(1)], f"{n}/key_index")
        pos = g.op("Unsqueeze", ["position_ids", g.const([2])], f"{n}/query_position")  # [B, S, 1]
        blocked = g.op("Greater", [keys, pos], f"{n}/future")  # [B, S, T]
        pad = g.op("Unsqueeze", [g.op("Equal", ["attention_mask", g.const(0)], f"{n}/is_padding"),
                                 g.const([1])], f"{n}/padding")  # [B, 1, T]
        blocked = g.op("Or", [blocked, pad], f"{n}/future_or_padding")
        if window:  # a query sees `window` tokens, itself included
            start = g.op("Sub", [pos, g.const(window - 1)], f"{n}/window_start")
            blocked = g.op("Or", [blocked, g.op("Less", [keys, start], f"{n}/before_window")],
                           f"{n}/blocked")
        bias = g.op("Where", [blocked, g.const(np.finfo(np.float32).min, np.float32),
                              g.const(0.0, np.float32)], f"{n}/additive")
        self._masks[window] = g.op("Unsqueeze", [bias, g.const([1, 2])], f"{n}/per_group")
        return self._masks[window]

    def ops_attention(self, i: int, q: str, k: str, v: str, cos: str, sin: str,
                      window: int | None) -> str:
        """Grouped-query attention with the KV cache in standard ops (what GQA does, unfused)."""
        g, spec, n = self.g, self.spec, f"model.layers.{i}.self_attn"
        kvh, d = spec.kv_heads, spec.head_dim
        qh = self._rotate(f"{n}/q", self._heads(f"{n}/q", q, spec.heads), cos, sin)
        kh = self._rotate(f"{n}/k", self._heads(f"{n}/k", k, kvh), cos, sin)
        keys = g.op("Concat", [f"past_key_values.{i}.key", kh], f"{n}/present_key",
                    outputs=[f"present.{i}.key"], axis=2)  # [B, KV, T, D]
        values = g.op("Concat", [f"past_key_values.{i}.value", self._heads(f"{n}/v", v, kvh)],
                      f"{n}/present_value", outputs=[f"present.{i}.value"], axis=2)
        # heads are kv-major (head h reads kv head h // group): [B, KV, group, S, D]
        qg = g.op("Reshape", [qh, g.const([0, kvh, spec.heads // kvh, -1, d])], f"{n}/q_groups")
        kt = g.op("Unsqueeze", [g.op("Transpose", [keys], f"{n}/keys_t", perm=[0, 1, 3, 2]),
                                g.const([2])], f"{n}/keys_t_per_group")
        scores = g.op("Mul", [g.op("MatMul", [qg, kt], f"{n}/qk"),
                              g.const(self.family.attention_scale(spec), np.float32)], f"{n}/scaled_qk")
        probs = g.op("Softmax", [g.op("Add", [scores, self._mask(window)], f"{n}/masked_qk")],
                     f"{n}/probs", axis=-1)
        ctx = g.op("MatMul", [probs, g.op("Unsqueeze", [values, g.const([2])], f"{n}/values_per_group")],
                   f"{n}/context_groups")  # [B, KV, group, S, D]
        ctx = g.op("Reshape", [ctx, g.const([0, spec.heads, -1, d])], f"{n}/context_heads")
        ctx = g.op("Transpose", [ctx], f"{n}/context_tokens_first", perm=[0, 2, 1, 3])
        return g.op("Reshape", [ctx, g.const([0, 0, spec.heads * d])], f"{n}/attn")

    def head_norm(self, name: str, x: str, heads: int) -> str:
        g = self.g
        per_head = g.op("Reshape", [x, g.const([0, 0, heads, self.spec.head_dim])], f"{name}/split_heads")
        y = self.rms_norm(name, per_head)
        return g.op("Reshape", [y, g.const([0, 0, heads * self.spec.head_dim])], f"{name}/merge_heads")
