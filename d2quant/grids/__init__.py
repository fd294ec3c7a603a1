"""The grid registry: one class per grid family, used by the solver, the checkpoint and both writers."""

from d2quant.grids.base import (Grid, Params, grid_from_spec, group_params, registered_kinds,
                                round_to_fp16, row_params, stack_params)
from d2quant.grids.dsq import DualScaleGrid, ResidualBinaryGrid, strip_col_scale
from d2quant.grids.ggml import ggml_grid  # registers the native GGML types (q4_0 ... q6_k)
from d2quant.grids import iq  # noqa: F401  (registers the codebook types iq2_xxs ... iq3_s)
from d2quant.grids.uniform import UniformGrid

__all__ = ["Grid", "Params", "grid_from_spec", "group_params", "registered_kinds", "round_to_fp16",
           "row_params", "stack_params", "DualScaleGrid", "ResidualBinaryGrid", "strip_col_scale", "UniformGrid"]
