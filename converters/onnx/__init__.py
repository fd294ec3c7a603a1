"""QuantizedModel -> ONNX decoder for stock onnxruntime (MatMulNBits, GroupQueryAttention, KV cache)."""

from converters.onnx.layouts import DSQ_LAYOUTS, decode_weight
from converters.onnx.target import ATTENTION_MODES, EMBED_MODES, ONNXOptions, ONNXTarget, check_grid
from converters.onnx.writer import DATA_FILE, MODEL_FILE, read_metadata, write_onnx

__all__ = ["ATTENTION_MODES", "DATA_FILE", "DSQ_LAYOUTS", "EMBED_MODES", "MODEL_FILE", "ONNXOptions", "ONNXTarget",
           "check_grid",
           "decode_weight", "read_metadata", "write_onnx"]
