"""MatMulNBits byte layout: integer codes packed LSB-first along K inside blocks of ``block_size``.

B is uint8 [N, k_blocks, block_size * bits / 8]: within a byte the first code sits in the lowest bits.
Zero points are packed the same way along the block axis: uint8 [N, ceil(k_blocks * bits / 8)].
A last partial block is padded with codes the caller chooses (the block's zero point, so the padded
weights decode to exactly 0). onnxruntime's CPU kernels run 2, 4 and 8 bits; a 3-bit grid sits in
the 4-bit container unchanged (its codes and zero points are < 8).
"""

from __future__ import annotations

import numpy as np

from d2quant.errors import D2Error

CONTAINER_BITS = {2: 2, 3: 4, 4: 4, 8: 8}
BLOCK_SIZES = (16, 32, 64, 128, 256)


def container_bits(bits: int) -> int:
    """The MatMulNBits ``bits`` attribute that holds a ``bits``-bit grid exactly."""
    if bits not in CONTAINER_BITS:
        raise D2Error(f"MatMulNBits carries 2, 3, 4 or 8-bit grids, got {bits} bits")
    return CONTAINER_BITS[bits]


def check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise D2Error(f"MatMulNBits needs a power-of-two block size >= 16 (16, 32, 64, 128, 256); "
                      f"got group size {block_size}: quantize with --group-size 256 or less "
                      "(or --block-size for `d2export onnx`)")


def matmulnbits_nbytes(n: int, k: int, bits: int, block_size: int) -> int:
    """File bytes of an [N, K] matrix in MatMulNBits' layout: B, fp16 scales (every grid here rounds
    them to fp16) and packed zero points, as pack_codes / pack_zero_points / layouts._scales store them."""
    cb = container_bits(bits)
    n_blocks = -(-k // block_size)
    return n * (n_blocks * block_size * cb // 8 + 2 * n_blocks + -(-n_blocks * cb // 8))


def _pack_last_axis(values: np.ndarray, bits: int) -> np.ndarray:
    """[..., n] small ints (n a multiple of 8 / bits) -> uint8 [..., n * bits / 8], LSB first."""
    per_byte = 8 // bits
    v = values.astype(np.uint8).reshape(*values.shape[:-1], -1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(v << shifts, axis=-1).astype(np.uint8)


def _unpack_last_axis(packed: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    v = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return v.reshape(*packed.shape[:-1], -1)


def pack_codes(codes: np.ndarray, bits: int, block_size: int,
               pad: np.ndarray | int = 0) -> np.ndarray:
    """codes [N, K] (0 <= code < 2**bits) -> B uint8 [N, k_blocks, block_size * bits / 8].

    pad: value for the columns after K in a last partial block, a scalar or one per row [N].
    """
    n, k = codes.shape
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise D2Error(f"codes out of range for a {bits}-bit container")
    n_blocks = -(-k // block_size)
    full = np.empty((n, n_blocks * block_size), dtype=np.uint8)
    full[:, :k] = codes
    full[:, k:] = np.asarray(pad, dtype=np.uint8).reshape(-1, 1) if np.ndim(pad) else pad
    return _pack_last_axis(full.reshape(n, n_blocks, block_size), bits)


def unpack_codes(blob: np.ndarray, bits: int, k: int) -> np.ndarray:
    """B uint8 [N, k_blocks, blob] -> codes uint8 [N, K] (the padding dropped)."""
    return _unpack_last_axis(blob, bits).reshape(blob.shape[0], -1)[:, :k]


def pack_zero_points(zeros: np.ndarray, bits: int) -> np.ndarray:
    """zero points [N, k_blocks] -> uint8 [N, ceil(k_blocks * bits / 8)], unused high bits 0."""
    n, n_blocks = zeros.shape
    per_byte = 8 // bits
    padded = np.zeros((n, -(-n_blocks // per_byte) * per_byte), dtype=np.uint8)
    padded[:, :n_blocks] = zeros
    return _pack_last_axis(padded, bits)


def unpack_zero_points(packed: np.ndarray, bits: int, n_blocks: int) -> np.ndarray:
    return _unpack_last_axis(packed, bits)[:, :n_blocks]


def dequantize_blocks(blob: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int,
                      k: int) -> np.ndarray:
    """What MatMulNBits decodes: float32 [N, K] = (code - zero) * scale per block."""
    n, n_blocks, _ = blob.shape
    codes = _unpack_last_axis(blob, bits).astype(np.float32)  # [N, k_blocks, block]
    z = unpack_zero_points(zero_points, bits, n_blocks).astype(np.float32)
    w = (codes - z[..., None]) * scales.reshape(n, n_blocks, 1).astype(np.float32)
    return w.reshape(n, -1)[:, :k]
