"""What `d2export onnx` makes, validated once (before any calibration, and by the writer itself):
the MatMulNBits container a grid needs, and the graph's options."""

from __future__ import annotations

from dataclasses import dataclass

from converters.onnx.layouts import DSQ_LAYOUTS
from converters.onnx.packing import check_block_size, container_bits
from d2quant.errors import D2Error

ACCURACY_LEVELS = (0, 1, 2, 3, 4)
EMBED_MODES = ("float", "quantized")
ATTENTION_MODES = ("gqa", "ops")  # contrib GroupQueryAttention | standard ONNX ops


def check_grid(bits: int, block_size: int) -> None:
    """A uniform grid of ``bits`` and group ``block_size`` has a MatMulNBits form."""
    container_bits(bits)
    check_block_size(block_size)


@dataclass(frozen=True)
class ONNXOptions:
    dsq_layout: str = "planes"  # how DSQ's residual-binary down_proj is carried (layouts.py)
    accuracy_level: int = 0  # MatMulNBits: 0 float activations (exact), 4 int8 activations (faster)
    embed: str = "float"  # float (Gather) | quantized (GatherBlockQuantized)
    attention: str = "gqa"

    def __post_init__(self):
        for name, value, allowed in (("--dsq-layout", self.dsq_layout, DSQ_LAYOUTS),
                                     ("--accuracy-level", self.accuracy_level, ACCURACY_LEVELS),
                                     ("embedding mode", self.embed, EMBED_MODES),
                                     ("--attention", self.attention, ATTENTION_MODES)):
            if value not in allowed:
                raise D2Error(f"unknown {name} {value!r}; choose one of {', '.join(map(str, allowed))}")
