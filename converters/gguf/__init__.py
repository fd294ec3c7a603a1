"""QuantizedModel -> GGUF for stock llama.cpp: presets, architecture mapping, block bytes, tokenizer."""

from converters.gguf.presets import (PRESETS, file_bits_per_weight, preset_grids, preset_size,
                                     preset_types)
from converters.gguf.target import GGUFTarget
from converters.gguf.writer import GGUFPlan, plan_gguf, write_gguf

__all__ = ["PRESETS", "GGUFPlan", "GGUFTarget", "file_bits_per_weight", "plan_gguf", "preset_grids", "preset_size",
           "preset_types", "write_gguf"]
