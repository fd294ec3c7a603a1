"""How one quantized weight matrix becomes ONNX initializers and nodes, and how to read it back.

Layouts (the ``layout`` field of the per-tensor metadata the writer stores in the model), each
stored compactly and, where the runtime needs another form, widened by a constant subgraph that
onnxruntime folds once at session start (before MatMulNBits prepacks its weights):

* ``matmulnbits``: a uniform grid (q - z) * s as one ``com.microsoft.MatMulNBits``. 3-bit codes sit
  in the 4-bit container. 2-bit codes are stored 2-bit; with float activations (accuracy level
  < 4) they are widened to the 4-bit container, because onnxruntime's CPU MatMulNBits has
  float-activation kernels for 4 bits only and at 2 bits dequantizes the whole matrix on every call
  (about 50x slower here); with int8 activations (level 4) the native 2-bit kernel is fast.
* ``rbin``: DSQ's residual-binary grid, level = sum_t r_t * (+-1) with the sign of term t in bit t
  of the code u. Stored as u packed like MatMulNBits' B (2 terms: 2 bits, 3 terms: the 4-bit
  container) plus r [N, G, terms] in fp16. Two runtime forms (``dsq_layout``):
  ``planes``: each term is a MatMulNBits plane with 4-bit codes 1 + 2 b_t, zero point 2 and scale
  r_t, which decodes to r_t * (2 b_t - 1) exactly; the planes' outputs are summed (bias on the
  first). Quantized kernels, 0.5 byte per weight and term in memory.
  ``lut``: levels = r @ signs expanded per (row, group) and each weight's level gathered by its code:
  one float MatMul, standard ONNX ops only (any runtime), 4 bytes per weight in memory.
* ``float``: a float32 weight [N, K], for tensors kept in float.
* ``gather_block_quantized``: an embedding table on a uniform grid, for ``com.microsoft.
  GatherBlockQuantized`` (uint8 data packed along the hidden axis like MatMulNBits' B).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from converters.onnx.packing import (check_block_size, container_bits, dequantize_blocks,
                                     pack_codes, pack_zero_points, unpack_codes)
from converters.onnx.store import GraphStore
from d2quant.errors import D2Error
from d2quant.grids import ResidualBinaryGrid, UniformGrid
from d2quant.qmodel import QuantizedLinear

DSQ_LAYOUTS = ("planes", "lut")
MS = "com.microsoft"


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _per_row(p: np.ndarray, n: int) -> np.ndarray:
    """Grid params may be shared by rows ([1, G, ...]); MatMulNBits wants one per row."""
    return np.broadcast_to(p, (n, *p.shape[1:])) if p.shape[0] == 1 else p


def emit_linear(g: GraphStore, name: str, ql: QuantizedLinear, x: str, *, dsq_layout: str,
                accuracy_level: int, stored: UniformTable | None = None) -> tuple[str, dict]:
    """Nodes computing x @ W^T (+ bias) for the quantized linear ``name``; (output, metadata).
    ``stored``: the weight's initializers, already in the graph (a tied embedding's)."""
    if "col_scale" in ql.params:
        raise D2Error(f"{name}: the DSQ column scale is not folded into up_proj; ONNX export needs "
                      "the folded checkpoint that `d2export quantize` writes")
    bias = g.init(f"{name}.bias", to_numpy(ql.bias).astype(np.float32)) if ql.bias is not None else None
    if isinstance(ql.grid, UniformGrid):
        return _uniform(g, name, ql, x, bias, accuracy_level, stored)
    if isinstance(ql.grid, ResidualBinaryGrid):
        return _rbin(g, name, ql, x, bias, dsq_layout, accuracy_level)
    raise D2Error(f"{name}: grid {ql.grid!r} has no ONNX layout; ONNX export carries uniform grids "
                  "(MatMulNBits) and the DSQ residual-binary grid")


# ---- uniform grids ----------------------------------------------------------------------------
def _uniform_parts(name: str, ql: QuantizedLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """codes uint8 [N, K], scales float32 [N, G], integer zero points uint8 [N, G], container bits."""
    grid = ql.grid
    check_block_size(grid.group)
    n, _ = ql.shape
    scales = _per_row(to_numpy(ql.params["scale"]), n).astype(np.float32)
    zeros = _per_row(to_numpy(ql.params["zero"]), n)
    if not np.array_equal(zeros, np.round(zeros)) or zeros.min() < 0 or zeros.max() > grid.maxq:
        raise D2Error(f"{name}: zero points are not integers in 0..{grid.maxq}; MatMulNBits needs them so")
    return to_numpy(ql.codes).astype(np.uint8), scales, zeros.astype(np.uint8), container_bits(grid.bits)


@dataclass(frozen=True)
class UniformTable:
    """The stored initializers of one uniform-grid matrix in MatMulNBits' layout; a tied embedding
    Gather and the lm_head MatMul read the same ones."""

    b: str  # uint8 [N, blocks, block * bits / 8]
    scales: str  # as stored (fp16 where exact)
    scales_f32: str  # what the ops take
    zeros: str
    n: int
    k: int
    bits: int
    block: int


def store_uniform(g: GraphStore, name: str, ql: QuantizedLinear) -> UniformTable:
    codes, scales, zeros, bits = _uniform_parts(name, ql)
    n, k = codes.shape
    b = g.init(f"{name}.qweight", pack_codes(codes, bits, ql.grid.group, pad=zeros[:, -1]))
    s, s32 = _scales(g, name, scales)
    z = g.init(f"{name}.qzeros", pack_zero_points(zeros, bits))
    return UniformTable(b, s, s32, z, n, k, bits, ql.grid.group)


def _uniform(g: GraphStore, name: str, ql: QuantizedLinear, x: str, bias: str | None,
             accuracy_level: int, stored: UniformTable | None = None) -> tuple[str, dict]:
    t = stored or store_uniform(g, name, ql)
    b, s, s32, z, n, k, bits, block = t.b, t.scales, t.scales_f32, t.zeros, t.n, t.k, t.bits, t.block
    run_bits, run_b, run_z = bits, b, z
    if bits == 2 and accuracy_level < 4:
        n_blocks = -(-k // block)
        run_bits = 4
        run_b = _widen_to_4bit(g, f"{name}.qweight4", b, 2, lead_rank=2)
        run_z = _widen_to_4bit(g, f"{name}.qzeros4", z, 2, lead_rank=1, count=2 * -(-n_blocks // 2))
    out = _matmulnbits(g, name, x, run_b, s32, run_z, bias, n, k, run_bits, block, accuracy_level)
    meta = {"layout": "matmulnbits", "N": n, "K": k, "bits": bits, "block_size": block,
            "B": b, "scales": s, "zero_points": z, "bias": bias}
    return out, meta


def _matmulnbits(g: GraphStore, name: str, x: str, b: str, scales: str, zeros: str, bias: str | None,
                 n: int, k: int, bits: int, block: int, accuracy_level: int) -> str:
    return g.op("MatMulNBits", [x, b, scales, zeros, "", bias or ""], f"{name}/MatMulNBits",
                domain=MS, K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level)


def _scales(g: GraphStore, prefix: str, scales: np.ndarray) -> tuple[str, str]:
    """(stored initializer, float32 tensor for the op). fp16-exact scales (every grid here rounds
    them so) are stored in fp16 and cast in the graph, a constant folded at session start: only
    the file shrinks."""
    s16 = scales.astype(np.float16)
    if not np.array_equal(s16.astype(np.float32), scales):
        name = g.init(f"{prefix}.scales", np.ascontiguousarray(scales, dtype=np.float32))
        return name, name
    name = g.init(f"{prefix}.scales", s16)
    return name, g.op("Cast", [name], f"{prefix}/scales_float", to=TensorProto.FLOAT)


def _widen_to_4bit(g: GraphStore, prefix: str, packed: str, bits: int, lead_rank: int,
                   code_map: np.ndarray | None = None, count: int | None = None) -> str:
    """Packed ``bits``-bit codes uint8 [lead..., m] -> code_map[code] (default: the code itself)
    packed 4-bit: [lead..., m * (8 / bits) / 2], or the first ``count`` codes (even) of each row.

    A 256-entry table turns each stored byte into its output bytes: two ops (Cast, Gather), so
    folding allocates little besides the result.
    """
    per_byte = 8 // bits
    byte = np.arange(256)
    codes = (byte[:, None] >> (bits * np.arange(per_byte))) & ((1 << bits) - 1)  # [256, per_byte]
    if code_map is not None:
        codes = code_map[codes]
    table = g.const(codes[:, 0::2] | (codes[:, 1::2] << 4), np.uint8)  # [256, per_byte / 2]
    index = g.op("Cast", [packed], f"{prefix}/index", to=TensorProto.INT32)
    out = g.op("Gather", [table, index], f"{prefix}/lookup", axis=0)
    out = g.op("Reshape", [out, g.const([0] * lead_rank + [-1])], f"{prefix}/bytes")
    if count is not None:
        out = g.op("Slice", [out, g.const([0]), g.const([count // 2]), g.const([-1])], f"{prefix}/trim")
    return out


# ---- DSQ residual-binary ----------------------------------------------------------------------
def _signs(terms: int) -> np.ndarray:
    """signs[t, u] = +-1, the sign of term t in code u (bit t of u; 1 -> +1), as the grid defines."""
    u = np.arange(2**terms)
    return (((u[None, :] >> np.arange(terms)[:, None]) & 1) * 2 - 1).astype(np.float32)


def _rbin(g: GraphStore, name: str, ql: QuantizedLinear, x: str, bias: str | None, dsq_layout: str,
          accuracy_level: int) -> tuple[str, dict]:
    check_block_size(ql.grid.group)
    n, k = ql.shape
    r = _per_row(to_numpy(ql.params["r"]), n).astype(np.float32)  # [N, G, terms]
    if not np.array_equal(r.astype(np.float16).astype(np.float32), r):
        raise D2Error(f"{name}: residual-binary scales are not fp16; re-quantize with this d2export")
    terms, block = r.shape[-1], ql.grid.group
    bits = container_bits(terms)
    b = g.init(f"{name}.qweight", pack_codes(to_numpy(ql.codes).astype(np.uint8), bits, block))
    r16 = g.init(f"{name}.rscales", r.astype(np.float16))
    meta = {"layout": "rbin", "runtime": dsq_layout, "N": n, "K": k, "bits": bits,
            "block_size": block, "B": b, "r": r16, "bias": bias}
    if dsq_layout == "planes":
        return _rbin_planes(g, name, x, b, r16, bias, n, k, bits, block, terms, accuracy_level), meta
    return _rbin_lut(g, name, x, b, r16, bias, n, k, bits, block, terms), meta


def _rbin_planes(g: GraphStore, name: str, x: str, b: str, r16: str, bias: str | None, n: int,
                 k: int, bits: int, block: int, terms: int, accuracy_level: int) -> str:
    n_blocks = -(-k // block)
    # plane codes stay 1 or 3 around the 2-bit default zero point 2, given explicitly in 4 bits
    zeros = g.op("ConstantOfShape", [g.const([n, -(-n_blocks // 2)])], f"{name}.plane_zeros",
                 value=helper.make_tensor("value", TensorProto.UINT8, [1], [0x22]))
    out = None
    for t in range(terms):
        code_map = 1 + 2 * ((np.arange(1 << bits) >> t) & 1)
        plane = _widen_to_4bit(g, f"{name}.plane{t}.qweight4", b, bits, lead_rank=2, code_map=code_map)
        scale = g.op("Cast", [g.op("Gather", [r16, g.const(t)], f"{name}.plane{t}/r16", axis=-1)],
                     f"{name}.plane{t}.scales", to=TensorProto.FLOAT)
        y = _matmulnbits(g, f"{name}.plane{t}", x, plane, scale, zeros, bias if t == 0 else None,
                         n, k, 4, block, accuracy_level)
        out = y if out is None else g.op("Add", [out, y], f"{name}.plane{t}/Add")
    return out


def _rbin_lut(g: GraphStore, name: str, x: str, b: str, r16: str, bias: str | None, n: int, k: int,
              bits: int, block: int, terms: int) -> str:
    n_blocks = -(-k // block)
    rf = g.op("Cast", [r16], f"{name}/r_float", to=TensorProto.FLOAT)
    levels = g.op("MatMul", [rf, g.init(f"{name}.signs", _signs(terms))], f"{name}/levels")
    per_byte = 8 // bits
    u = g.op("BitShift", [g.op("Unsqueeze", [b, g.const([-1])], f"{name}/unsqueeze"),
                          g.const(np.arange(per_byte) * bits, np.uint8)],
             f"{name}/shift", direction="RIGHT")
    u = g.op("BitwiseAnd", [u, g.const((1 << bits) - 1, np.uint8)], f"{name}/codes")
    u = g.op("Reshape", [u, g.const([n, n_blocks, block])], f"{name}/codes_blocks")
    u = g.op("Cast", [u], f"{name}/codes_i32", to=TensorProto.INT32)
    w = g.op("GatherElements", [levels, u], f"{name}/weight_blocks", axis=2)
    w = g.op("Reshape", [w, g.const([n, n_blocks * block])], f"{name}/weight_padded")
    if n_blocks * block != k:
        w = g.op("Slice", [w, g.const([0]), g.const([k]), g.const([1])], f"{name}/weight")
    wt = g.op("Transpose", [w], f"{name}/weight_t", perm=[1, 0])
    out = g.op("MatMul", [x, wt], f"{name}/MatMul")
    return g.op("Add", [out, bias], f"{name}/bias_add") if bias else out


# ---- embeddings -------------------------------------------------------------------------------
def emit_embedding(g: GraphStore, name: str, ql: QuantizedLinear,
                   ids: str) -> tuple[str, dict, UniformTable]:
    """Embedding lookup on a quantized table: GatherBlockQuantized along the hidden axis, on the
    table stored in MatMulNBits' layout (a tied lm_head reuses it: one copy in the file)."""
    if not isinstance(ql.grid, UniformGrid):
        raise D2Error(f"{name}: grid {ql.grid!r} has no ONNX layout for embeddings; use a uniform grid")
    v, h = ql.shape
    if h % ql.grid.group:
        raise D2Error(f"{name}: hidden size {h} is not a multiple of the block size {ql.grid.group}; "
                      "keep the embeddings in float")
    t = store_uniform(g, name, ql)
    rows = g.op("Reshape", [t.b, g.const([v, -1])], f"{name}/rows")
    out = g.op("GatherBlockQuantized", [rows, ids, t.scales_f32, t.zeros], f"{name}/GatherBlockQuantized",
               domain=MS, bits=t.bits, block_size=t.block, gather_axis=0, quantize_axis=1)
    meta = {"layout": "gather_block_quantized", "N": v, "K": h, "bits": t.bits, "block_size": t.block,
            "B": t.b, "scales": t.scales, "zero_points": t.zeros, "bias": None}
    return out, meta, t


# ---- reading back -----------------------------------------------------------------------------
def decode_weight(meta: dict, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The float32 [N, K] weight the file holds, from its stored initializers alone."""
    layout = meta["layout"]
    if layout == "float":
        return arrays[meta["W"]].astype(np.float32)
    n, k, bits, block = meta["N"], meta["K"], meta["bits"], meta["block_size"]
    n_blocks = -(-k // block)
    if layout in ("matmulnbits", "gather_block_quantized"):
        blob = arrays[meta["B"]].reshape(n, n_blocks, block * bits // 8)
        scales = arrays[meta["scales"]].astype(np.float32)
        return dequantize_blocks(blob, scales, arrays[meta["zero_points"]], bits, k)
    if layout == "rbin":
        r = arrays[meta["r"]].astype(np.float32)  # [N, G, terms]
        levels = r @ _signs(r.shape[-1])  # [N, G, 2^terms]
        blob = arrays[meta["B"]].reshape(n, n_blocks, -1)
        codes = unpack_codes(blob, bits, n_blocks * block).reshape(n, n_blocks, block)
        w = np.take_along_axis(levels, codes.astype(np.int64), axis=2)
        return w.reshape(n, -1)[:, :k]
    raise D2Error(f"unknown tensor layout {layout!r} in the model's metadata; was it written by a "
                  "newer d2export?")
