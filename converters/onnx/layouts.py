"""How one quantized weight matrix becomes ONNX initializers and nodes, and how to read it back.

Layouts (the ``layout`` field of the per-tensor metadata the writer stores in the model):

* ``matmulnbits``: a uniform grid (q - z) * s as one ``com.microsoft.MatMulNBits``.
* ``rbin_planes``: DSQ's residual-binary grid, level = sum_t r_t * (+-1). Each term t is a plane of
  one bit b_t; as 2-bit MatMulNBits codes 1 + 2 b_t with the default zero point 2 and scale r_t it
  decodes to r_t * (2 b_t - 1) exactly. The planes' outputs are summed (bias on the first plane).
  Runs on the packed low-bit kernels; costs 2 bits per term and weight.
* ``rbin_lut``: the codes packed as in MatMulNBits (2 terms: 2 bits, 3 terms: the 4-bit container)
  plus r [N, G, terms] in fp16; the graph expands levels = r @ signs^T and gathers each weight's level,
  a float MatMul on a constant subgraph that onnxruntime folds once at session start. Smallest file
  (bits + 16 * terms / group per weight), float weights in memory.
* ``float``: a float32 weight [N, K] (a MatMul on its transpose), for tensors kept in float.
* ``gather_block_quantized``: an embedding table on a uniform grid, for ``com.microsoft.
  GatherBlockQuantized`` (uint8 data packed along the hidden axis like MatMulNBits' B).
"""

from __future__ import annotations

from collections.abc import Mapping

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


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _per_row(p: np.ndarray, n: int) -> np.ndarray:
    """Grid params may be shared by rows ([1, G, ...]); MatMulNBits wants one per row."""
    return np.broadcast_to(p, (n, *p.shape[1:])) if p.shape[0] == 1 else p


def _uniform_parts(name: str, ql: QuantizedLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """codes uint8 [N, K], scales float32 [N, G], integer zero points uint8 [N, G], container bits."""
    grid = ql.grid
    check_block_size(grid.group)
    n, _ = ql.shape
    scales = _per_row(_np(ql.params["scale"]), n).astype(np.float32)
    zeros = _per_row(_np(ql.params["zero"]), n)
    if not np.array_equal(zeros, np.round(zeros)) or zeros.min() < 0 or zeros.max() > grid.maxq:
        raise D2Error(f"{name}: zero points are not integers in 0..{grid.maxq}; MatMulNBits needs them so")
    return _np(ql.codes).astype(np.uint8), scales, zeros.astype(np.uint8), container_bits(grid.bits)


def _matmulnbits(g: GraphStore, prefix: str, x: str, codes: np.ndarray, scales: np.ndarray,
                 zeros: np.ndarray | None, bits: int, block: int, bias: str | None,
                 accuracy_level: int) -> tuple[str, dict]:
    n, k = codes.shape
    pad = zeros[:, -1] if zeros is not None else 1 << (bits - 1)
    b = g.init(f"{prefix}.qweight", pack_codes(codes, bits, block, pad))
    s, s32 = _scales(g, prefix, scales)
    z = g.init(f"{prefix}.qzeros", pack_zero_points(zeros, bits)) if zeros is not None else None
    run_bits, run_b, run_z = bits, b, z
    if bits == 2 and accuracy_level < 4:  # see _repack_2_to_4
        n_blocks = -(-k // block)
        run_bits, run_b = 4, _repack_2_to_4(g, f"{prefix}.qweight4", b, lead_rank=2)
        if z:
            run_z = _repack_2_to_4(g, f"{prefix}.qzeros4", z, lead_rank=1,
                                   count=2 * -(-n_blocks // 2))
        else:  # keep the 2-bit default zero point (2), not the 4-bit one (8)
            run_z = g.op("ConstantOfShape", [g.const([n, -(-n_blocks // 2)])], f"{prefix}.qzeros4",
                         value=helper.make_tensor("v", TensorProto.UINT8, [1], [0x22]))
    out = g.op("MatMulNBits", [x, run_b, s32, run_z or "", "", bias or ""], f"{prefix}/MatMulNBits",
               domain=MS, K=k, N=n, bits=run_bits, block_size=block, accuracy_level=accuracy_level)
    meta = {"layout": "matmulnbits", "N": n, "K": k, "bits": bits, "block_size": block,
            "B": b, "scales": s, "zero_points": z, "bias": bias}
    if run_bits != bits:
        meta["runtime_bits"] = run_bits
    return out, meta


def _unpack_in_graph(g: GraphStore, prefix: str, packed: str, bits: int) -> str:
    """uint8 [..., m] packed LSB first -> codes uint8 [..., m, 8 / bits]."""
    per_byte = 8 // bits
    split = g.op("BitShift", [g.op("Unsqueeze", [packed, g.const([-1])], f"{prefix}/unsqueeze"),
                              g.const(np.arange(per_byte) * bits, np.uint8)],
                 f"{prefix}/shift", direction="RIGHT")
    return g.op("BitwiseAnd", [split, g.const((1 << bits) - 1, np.uint8)], f"{prefix}/mask")


def _repack_2_to_4(g: GraphStore, prefix: str, packed: str, lead_rank: int,
                   count: int | None = None) -> str:
    """2-bit packed uint8 [lead..., m] -> its first ``count`` (even; default all) codes 4-bit packed.

    onnxruntime's CPU MatMulNBits has float-activation kernels for 4 bits only; at 2 bits (and 8)
    it dequantizes the whole matrix on every call (50x slower here). The file keeps 2 bits; this
    constant subgraph is folded at session start, before MatMulNBits prepacks its 4-bit weights.
    One byte of 4 codes becomes two bytes of 2 codes through a 256-entry table: two ops, so the
    folding allocates little (1.5 bytes per packed byte) besides the result.
    """
    byte = np.arange(256)
    codes = (byte[:, None] >> (2 * np.arange(4))) & 3  # [256, 4]
    table = g.const(codes[:, 0::2] | (codes[:, 1::2] << 4), np.uint8)  # [256, 2]
    index = g.op("Cast", [packed], f"{prefix}/index", to=TensorProto.INT32)
    pairs = g.op("Gather", [table, index], f"{prefix}/pairs", axis=0)  # [lead..., m, 2]
    out = g.op("Reshape", [pairs, g.const([0] * lead_rank + [-1])], f"{prefix}/bytes")
    if count is not None:
        out = g.op("Slice", [out, g.const([0]), g.const([count // 2]), g.const([-1])], f"{prefix}/trim")
    return out


def _scales(g: GraphStore, prefix: str, scales: np.ndarray) -> tuple[str, str]:
    """(stored initializer, float32 tensor for the op). fp16-exact scales (every grid here rounds
    them so) are stored in fp16 and cast in the graph: a constant that onnxruntime folds at
    session start, before MatMulNBits prepacks its weights, so only the file shrinks."""
    s16 = scales.astype(np.float16)
    if not np.array_equal(s16.astype(np.float32), scales):
        name = g.init(f"{prefix}.scales", np.ascontiguousarray(scales, dtype=np.float32))
        return name, name
    name = g.init(f"{prefix}.scales", s16)
    return name, g.op("Cast", [name], f"{prefix}/scales_float", to=1)


def emit_linear(g: GraphStore, name: str, ql: QuantizedLinear, x: str, *, dsq_layout: str,
                accuracy_level: int) -> tuple[str, dict]:
    """Nodes computing x @ W^T (+ bias) for the quantized linear ``name``; (output, metadata)."""
    if "col_scale" in ql.params:
        raise D2Error(f"{name}: the DSQ column scale is not folded into up_proj; ONNX export needs "
                      "the folded checkpoint that `d2export quantize` writes")
    bias = g.init(f"{name}.bias", _np(ql.bias).astype(np.float32)) if ql.bias is not None else None
    if isinstance(ql.grid, UniformGrid):
        codes, scales, zeros, bits = _uniform_parts(name, ql)
        return _matmulnbits(g, name, x, codes, scales, zeros, bits, ql.grid.group, bias, accuracy_level)
    if isinstance(ql.grid, ResidualBinaryGrid):
        if dsq_layout == "planes":
            return _rbin_planes(g, name, ql, x, bias, accuracy_level)
        if dsq_layout == "lut":
            return _rbin_lut(g, name, ql, x, bias)
        raise D2Error(f"unknown DSQ layout {dsq_layout!r}; choose one of {', '.join(DSQ_LAYOUTS)}")
    raise D2Error(f"{name}: grid {ql.grid!r} has no ONNX layout; ONNX export carries uniform grids "
                  "(MatMulNBits) and the DSQ residual-binary grid")


def _rbin_parts(name: str, ql: QuantizedLinear) -> tuple[np.ndarray, np.ndarray]:
    """codes uint8 [N, K] and r float32 [N, G, terms] (fp16-exact)."""
    check_block_size(ql.grid.group)
    n, _ = ql.shape
    r = _per_row(_np(ql.params["r"]), n).astype(np.float32)
    if not np.array_equal(r.astype(np.float16).astype(np.float32), r):
        raise D2Error(f"{name}: residual-binary scales are not fp16; re-quantize with this d2export")
    return _np(ql.codes).astype(np.uint8), r


def _rbin_planes(g: GraphStore, name: str, ql: QuantizedLinear, x: str, bias: str | None,
                 accuracy_level: int) -> tuple[str, dict]:
    codes, r = _rbin_parts(name, ql)
    planes, out = [], None
    for t in range(r.shape[-1]):
        plane_codes = 1 + 2 * ((codes >> t) & 1)  # decodes to (code - 2) * r_t = +-r_t
        y, meta = _matmulnbits(g, f"{name}.plane{t}", x, plane_codes, r[..., t], None, 2,
                               ql.grid.group, bias if t == 0 else None, accuracy_level)
        planes.append(meta)
        out = y if out is None else g.op("Add", [out, y], f"{name}.plane{t}/Add")
    return out, {"layout": "rbin_planes", "N": ql.shape[0], "K": ql.shape[1], "planes": planes,
                 "bias": bias}


def _signs(terms: int) -> np.ndarray:
    """signs[t, u] = +-1, the sign of term t in code u (bit t of u; 1 -> +1), as the grid defines."""
    u = np.arange(2**terms)
    return (((u[None, :] >> np.arange(terms)[:, None]) & 1) * 2 - 1).astype(np.float32)


def _rbin_lut(g: GraphStore, name: str, ql: QuantizedLinear, x: str,
              bias: str | None) -> tuple[str, dict]:
    codes, r = _rbin_parts(name, ql)
    n, k = codes.shape
    terms, block = r.shape[-1], ql.grid.group
    bits = container_bits(terms)
    n_blocks = r.shape[1]
    b = g.init(f"{name}.qweight", pack_codes(codes, bits, block))
    r16 = g.init(f"{name}.rscales", r.astype(np.float16))
    signs = g.init(f"{name}.signs", _signs(terms))
    # levels [N, G, 2^terms] = r @ signs, then each weight's level by its code
    rf = g.op("Cast", [r16], f"{name}/r_float", to=1)
    levels = g.op("MatMul", [rf, signs], f"{name}/levels")
    u = _unpack_in_graph(g, f"{name}/codes", b, bits)
    u = g.op("Reshape", [u, g.const([n, n_blocks, block])], f"{name}/codes_blocks")
    u = g.op("Cast", [u], f"{name}/codes_i32", to=TensorProto.INT32)
    w = g.op("GatherElements", [levels, u], f"{name}/weight_blocks", axis=2)
    w = g.op("Reshape", [w, g.const([n, n_blocks * block])], f"{name}/weight_padded")
    if n_blocks * block != k:
        w = g.op("Slice", [w, g.const([0]), g.const([k]), g.const([1])], f"{name}/weight")
    wt = g.op("Transpose", [w], f"{name}/weight_t", perm=[1, 0])
    out = g.op("MatMul", [x, wt], f"{name}/MatMul")
    if bias:
        out = g.op("Add", [out, bias], f"{name}/bias_add")
    return out, {"layout": "rbin_lut", "N": n, "K": k, "bits": bits, "block_size": block, "B": b,
                 "r": r16, "bias": bias}


def emit_embedding(g: GraphStore, name: str, ql: QuantizedLinear, ids: str) -> tuple[str, dict]:
    """Embedding lookup on a quantized table: GatherBlockQuantized along the hidden axis."""
    if not isinstance(ql.grid, UniformGrid):
        raise D2Error(f"{name}: grid {ql.grid!r} has no ONNX layout for embeddings; use a uniform grid")
    codes, scales, zeros, bits = _uniform_parts(name, ql)
    v, h = codes.shape
    if h % ql.grid.group:
        raise D2Error(f"{name}: hidden size {h} is not a multiple of the block size {ql.grid.group}; "
                      "keep the embeddings in float")
    data = g.init(f"{name}.qweight", pack_codes(codes, bits, ql.grid.group).reshape(v, -1))
    s, s32 = _scales(g, name, scales)
    z = g.init(f"{name}.qzeros", pack_zero_points(zeros, bits))
    out = g.op("GatherBlockQuantized", [data, ids, s32, z], f"{name}/GatherBlockQuantized", domain=MS,
               bits=bits, block_size=ql.grid.group, gather_axis=0, quantize_axis=1)
    return out, {"layout": "gather_block_quantized", "N": v, "K": h, "bits": bits,
                 "block_size": ql.grid.group, "B": data, "scales": s, "zero_points": z, "bias": None}


def decode_weight(meta: dict, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The float32 [N, K] weight a runtime computes with, from the stored initializers alone."""
    if meta["layout"] == "float":
        return arrays[meta["W"]].astype(np.float32)
    layout, n, k = meta["layout"], meta["N"], meta["K"]
    if layout in ("matmulnbits", "gather_block_quantized"):
        bits, block = meta["bits"], meta["block_size"]
        blob = arrays[meta["B"]].reshape(n, -(-k // block), block * bits // 8)
        z = meta["zero_points"]
        zp = arrays[z] if z else pack_zero_points(
            np.full((n, blob.shape[1]), 1 << (bits - 1), np.uint8), bits)
        return dequantize_blocks(blob, arrays[meta["scales"]].astype(np.float32), zp, bits, k)
    if layout == "rbin_planes":
        w = decode_weight(meta["planes"][0], arrays)
        for plane in meta["planes"][1:]:
            w = w + decode_weight(plane, arrays)
        return w
    if layout == "rbin_lut":
        block = meta["block_size"]
        r = arrays[meta["r"]].astype(np.float32)  # [N, G, terms]
        levels = r @ _signs(r.shape[-1])  # [N, G, L]
        blob = arrays[meta["B"]].reshape(n, r.shape[1], -1)
        codes = unpack_codes(blob, meta["bits"], r.shape[1] * block).reshape(n, r.shape[1], block)
        w = np.take_along_axis(levels, codes.astype(np.int64), axis=2)
        return w.reshape(n, -1)[:, :k]
    raise D2Error(f"unknown tensor layout {layout!r} in the model's metadata; was it written by a "
                  "newer d2export?")
