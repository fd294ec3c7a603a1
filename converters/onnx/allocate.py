"""The MatMulNBits side of --target-bpw / --target-size (converters.allocation chooses): the bits
each matrix may take and their bytes.

* Options: 2, 4 and 8 bits at the export's block size (3-bit codes take the 4-bit container, so
  they cost a 4-bit matrix's bytes for more error), or float32 (Gemm), which always fits.
* The embedding table is not chosen: it stays what ``--embed`` asks (float32, or RTN at 4 / 8 bits)
  and its bytes are fixed, like the norms' (float32) and the graph's RoPE tables (float32 cos and
  sin for every position), so the file meets the size. A tied lm_head reads the embedding table; an
  untied one is chosen like the decoder's matrices.
"""

from __future__ import annotations

from converters.allocation import Option
from converters.onnx.graph import rope_cache_nbytes
from converters.onnx.packing import matmulnbits_nbytes
from d2quant.grids import UniformGrid
from d2quant.qmodel import ModelSpec

BITS = (2, 4, 8)
FLOAT = "float"
EMBEDDING = "model.embed_tokens"


def options(spec: ModelSpec, block_size: int) -> dict[str, list[Option]]:
    """Matrix name -> the MatMulNBits widths (and float32) it may be stored as, with their bytes."""
    return {name: [*(Option(f"int{b}", UniformGrid(b, block_size).spec(), matmulnbits_nbytes(n, k, b, block_size))
                     for b in BITS), Option(FLOAT, None, 4 * n * k)]
            for name, (n, k) in spec.matrix_shapes().items() if name != EMBEDDING}


def fixed_bytes(spec: ModelSpec, block_size: int, embed_bits: int | None) -> int:
    """The norms in float32, the embedding table as --embed stores it and the RoPE tables."""
    v, h = spec.matrix_shapes()[EMBEDDING]
    table = 4 * v * h if embed_bits is None else matmulnbits_nbytes(v, h, embed_bits, block_size)
    return 4 * spec.family.norm_count(spec) + table + rope_cache_nbytes(spec)
