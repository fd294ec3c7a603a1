"""A quantized linear as GGML block bytes, through the GGML grids' packers (one per type).

Native GGML grids pack as they are. A uniform asymmetric grid with an integer zero point sits
exactly in a symmetric 32-block type when its group is a multiple of 32: (q - z) * s is
d * level with d = s and level = q - z, which spans -7..7 at 3 bits or less (Q4_0, levels -8..7)
and -15..15 at 4 bits (Q5_0, levels -16..15). Anything else (a DSQ column scale that was not
folded, the residual-binary grid, 8-bit uniform) has no exact GGML form and is refused.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from d2quant.errors import D2Error
from d2quant.grids import DualScaleGrid, Grid, Params, ResidualBinaryGrid, UniformGrid
from d2quant.grids.ggml import ggml_grid
from d2quant.qmodel import QuantizedLinear

_UNIFORM_CONTAINER = {2: "Q4_0", 3: "Q4_0", 4: "Q5_0"}


def ggml_form(name: str, grid: Grid, codes: torch.Tensor,
              params: Params) -> tuple[Grid, torch.Tensor, Params]:
    """(GGML grid, its codes, its params) holding exactly the same weights."""
    if grid.kind.upper() in gguf.GGMLQuantizationType.__members__:  # a native GGML grid
        return grid, codes, params
    if "col_scale" in params:
        raise D2Error(f"{name} still carries a DSQ column scale, which GGUF cannot store; fold it "
                      "into up_proj (the pipeline does) before exporting")
    if isinstance(grid, DualScaleGrid):  # column scale folded away: only the base grid is left
        return ggml_form(name, grid.base, codes, params)
    if isinstance(grid, UniformGrid):
        return _uniform_in_block32(name, grid, codes, params)
    if isinstance(grid, ResidualBinaryGrid):
        raise D2Error(f"{name} is on the residual-binary DSQ grid, whose non-uniform levels no GGML "
                      "type holds; quantize for GGUF with --dsq-form dual or a native --type")
    raise D2Error(f"{name} is on grid {grid!r}, which has no GGML form")


def _uniform_in_block32(name: str, grid: UniformGrid, codes: torch.Tensor, params: Params):
    container = _UNIFORM_CONTAINER.get(grid.bits)
    if container is None or grid.group % 32:
        raise D2Error(f"{name}: a {grid.bits}-bit uniform grid with group {grid.group} has no exact "
                      "GGML form; use 2-4 bits with a group that is a multiple of 32, or a native --type")
    target = ggml_grid(container)
    offset = -int(target.levels.lo)  # code of level 0
    per = grid.group // 32
    zero = params["zero"].repeat_interleave(grid.group, 1)[:, :codes.shape[1]]
    u = (codes.float() - zero + offset).to(torch.int16)
    d = params["scale"].repeat_interleave(per, 1)[:, :codes.shape[1] // 32]
    return target, u, {"d": d}


def pack_linear(name: str, ql: QuantizedLinear) -> tuple[str, np.ndarray]:
    """(GGML type name, bytes [N, row_bytes]) of a quantized linear's weight."""
    grid, codes, params = ggml_form(name, ql.grid, ql.codes, ql.params)
    grid.check_shape(*codes.shape)
    return grid.type_name, grid.pack(codes, params)
