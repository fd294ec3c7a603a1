"""Where llama.cpp's arithmetic departs from runtime_tests/ggml_activations.py, op by op.

Runs one window of wikitext-2 test through a GGUF in llama.cpp with an eval callback that copies
every float32 intermediate tensor, then recomputes each matmul and attention product from
llama.cpp's *own* inputs, with the weights decoded from the file by gguf-py:

* matmul: the emulation's rounding of the activation (Q8_K / Q8_0 / Q8_1 for the weight type) times
  the decoded weight, against llama.cpp's output; also without rounding, for scale;
* attention: q.k with q and k (after RoPE) in fp16 against llama.cpp's scores, and softmax
  probabilities times V with both in fp16 against its context.

Prints the relative error of layer 0 and the largest of the other layers per op. No torch model
is involved, so it works for any GGUF llama.cpp loads (LLaMA-arch graph tensor names).

    python bench/llamacpp_trace.py out/parity_floor/smollm2-135m-Q8_0-llamacpp.gguf
"""

from __future__ import annotations

import argparse
import ctypes
import json

import gguf
import llama_cpp as lc
import numpy as np
import torch

from d2quant.data import read_text, wikitext_dir
from runtime_tests.ggml_activations import round_activations
from runtime_tests.libggml import _ggml

# (input tensor, output tensor, weight) per matmul; the output's first capture is before any bias
MATMULS = (("attn_norm", "Qcur", "attn_q"), ("attn_norm", "Kcur", "attn_k"),
           ("attn_norm", "Vcur", "attn_v"), ("kqv_out", "attn_out", "attn_output"),
           ("ffn_norm", "ffn_gate", "ffn_gate"), ("ffn_norm", "ffn_up", "ffn_up"),
           ("ffn_swiglu", "ffn_out", "ffn_down"))


class _TensorHead(ctypes.Structure):
    """The leading fields of struct ggml_tensor (ggml.h): type, buffer, ne[4], nb[4]."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


def capture(path: str, ids: list[int]) -> dict[str, list[np.ndarray]]:
    """Every contiguous F32 tensor llama.cpp computes for ``ids``, by graph name, in order."""
    g = _ggml()
    for fn, res in (("ggml_get_name", ctypes.c_char_p), ("ggml_get_data", ctypes.c_void_p),
                    ("ggml_is_contiguous", ctypes.c_bool)):
        getattr(g, fn).restype, getattr(g, fn).argtypes = res, [ctypes.c_void_p]
    caps: dict[str, list[np.ndarray]] = {}

    def on_tensor(t, ask, _user):
        if ask:
            return True
        head = _TensorHead.from_address(t)
        if head.type == 0 and g.ggml_is_contiguous(t):  # GGML_TYPE_F32
            ne = list(head.ne)
            buf = (ctypes.c_float * int(np.prod(ne))).from_address(g.ggml_get_data(t))
            caps.setdefault(g.ggml_get_name(t).decode(), []).append(
                np.ctypeslib.as_array(buf).copy().reshape(ne[::-1]).squeeze())
        return True

    callback = lc.ggml_backend_sched_eval_callback(on_tensor)  # kept referenced while it runs
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
    cp = lc.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(64, len(ids))
    cp.n_threads = cp.n_threads_batch = 1
    cp.cb_eval, cp.cb_eval_user_data = callback, None
    cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED  # what runtime_tests.llamacpp runs
    ctx = lc.llama_init_from_model(model, cp)
    try:
        tokens = (lc.llama_token * len(ids))(*ids)
        if lc.llama_decode(ctx, lc.llama_batch_get_one(tokens, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
    finally:
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return caps


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _f16(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, np.float32)).half().float()


def trace(path: str, n_tokens: int) -> dict[str, dict[str, float]]:
    reader = gguf.GGUFReader(path)
    weights = {t.name: t for t in reader.tensors}
    n_layers = int(reader.fields["llama.block_count"].parts[-1][0])
    text = read_text(wikitext_dir() / "test.txt")[:20000]
    ids = lc.Llama(model_path=path, vocab_only=True, verbose=False).tokenize(
        text.encode(), add_bos=False, special=False)[:n_tokens]
    caps = capture(path, ids)
    t = len(ids)
    out: dict[str, dict[str, float]] = {}

    def record(op: str, layer: int, err: float) -> None:
        row = out.setdefault(op, {"layer0": float("nan"), "max_other_layers": 0.0})
        if layer == 0:
            row["layer0"] = err
        else:
            row["max_other_layers"] = max(row["max_other_layers"], err)

    for i in range(n_layers - 1):  # the last layer computes only the positions whose logits are read
        for src, dst, wname in MATMULS:
            w = weights.get(f"blk.{i}.{wname}.weight")
            if w is None or f"{src}-{i}" not in caps or f"{dst}-{i}" not in caps:
                continue
            wt = torch.from_numpy(gguf.quants.dequantize(w.data, w.tensor_type).astype(np.float32))
            x = torch.from_numpy(caps[f"{src}-{i}"][0].reshape(t, -1))
            y = caps[f"{dst}-{i}"][0].reshape(t, -1)
            record(f"{wname} (8-bit activations)", i, _rel(y, round_activations(x, w.tensor_type.name) @ wt.T))
            record(f"{wname} (float activations)", i, _rel(y, x @ wt.T))
        q, k = caps[f"Qcur-{i}"][-1], caps[f"Kcur-{i}"][-1]  # [t, heads, head_dim] after RoPE
        v = caps[f"Vcur-{i}"][0].reshape(t, k.shape[1], -1)
        rep = q.shape[1] // k.shape[1]
        scores = torch.einsum("thd,shd->hts", _f16(q), _f16(k).repeat_interleave(rep, 1))
        record("q.k, fp16 after RoPE", i, _rel(caps[f"kq-{i}"][0][:, :, :t], scores))
        probs = caps[f"kq_soft_max-{i}"][0][:, :, :t]
        ctx = torch.einsum("hts,shd->htd", _f16(probs), _f16(v).repeat_interleave(rep, 1))
        record("probs.V, fp16", i, _rel(caps[f"kqv-{i}"][0], ctx))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    for op, row in trace(a.gguf, a.tokens).items():
        print(json.dumps({"op": op, **{k: float(f"{v:.3g}") for k, v in row.items()}}))


if __name__ == "__main__":
    main()
