"""ctypes access to the libggml that llama-cpp-python installs: llama.cpp's own quantizer and decoder.

Used as the reference for our GGML packers (their decode must equal libggml's bit for bit) and as the
llama-quantize baseline (``ggml_quantize_chunk`` with an importance vector is what an imatrix does).

    quantize_rows("Q4_K", x, importance)            -> GGML bytes of the rows of x
    dequantize_rows("Q4_K", raw, n_rows, n_per_row) -> float32 [n_rows, n_per_row]
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np

from d2quant.errors import D2Error

_INSTALL = "pip install llama-cpp-python==0.3.36"

_to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """struct ggml_type_traits (ggml.h of the llama.cpp vendored by llama-cpp-python 0.3.36)."""

    _fields_ = [("type_name", ctypes.c_char_p),
                ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool),
                ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


def _lib_dirs() -> list[Path]:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise D2Error(f"llama-cpp-python is not installed (needed for libggml); run `{_INSTALL}`")
    pkg = Path(spec.origin).parent
    return [pkg / "lib", pkg]


@functools.cache
def _ggml() -> ctypes.CDLL:
    """The shared library that exports ggml_quantize_chunk (libggml-base, or libggml in older builds)."""
    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    tried = []
    for d in _lib_dirs():
        for stem in ("libggml-base", "ggml-base", "libggml", "ggml"):
            path = d / f"{stem}{suffix}"
            if not path.is_file():
                continue
            tried.append(str(path))
            lib = ctypes.CDLL(str(path))
            if hasattr(lib, "ggml_quantize_chunk") and hasattr(lib, "ggml_get_type_traits"):
                _declare(lib)
                return lib
    raise D2Error(f"no libggml with ggml_quantize_chunk found in the llama_cpp package (looked at "
                  f"{', '.join(tried) or 'nothing'}); reinstall with `{_INSTALL}`")


def _declare(lib: ctypes.CDLL) -> None:
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.POINTER(ctypes.c_float)]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]


def _type_id(type_name: str) -> int:
    from gguf import GGMLQuantizationType
    try:
        return int(GGMLQuantizationType[type_name.upper()])
    except KeyError:
        raise D2Error(f"unknown GGML type {type_name!r}") from None


def _float_ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def row_size(type_name: str, n_per_row: int) -> int:
    """Bytes of one row of n_per_row weights in this type."""
    return int(_ggml().ggml_row_size(_type_id(type_name), n_per_row))


def _check_row(type_name: str, n_per_row: int) -> int:
    tid = _type_id(type_name)
    block = _ggml().ggml_get_type_traits(tid).contents.blck_size
    if n_per_row % block:
        raise D2Error(f"{type_name} needs rows of a multiple of {block} weights, got {n_per_row}")
    return tid


def quantize_rows(type_name: str, x: np.ndarray, importance: np.ndarray | None = None) -> bytes:
    """llama.cpp's quantization of the rows of x [n_rows, n_per_row] (importance: [n_per_row] or None)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise D2Error(f"quantize_rows needs a 2-D array, got shape {x.shape}")
    n_rows, n_per_row = x.shape
    tid = _check_row(type_name, n_per_row)
    lib = _ggml()
    imp = None
    if importance is not None:
        imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if imp.size != n_per_row:
            raise D2Error(f"importance has {imp.size} values for rows of {n_per_row}")
    elif lib.ggml_quantize_requires_imatrix(tid):
        raise D2Error(f"{type_name} cannot be quantized without an importance vector")
    dst = np.zeros(n_rows * lib.ggml_row_size(tid, n_per_row), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(tid, _float_ptr(x), dst.ctypes.data_as(ctypes.c_void_p), 0,
                                      n_rows, n_per_row, None if imp is None else _float_ptr(imp))
    if written != dst.size:
        raise D2Error(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.size}")
    return dst.tobytes()


def dequantize_rows(type_name: str, raw, n_rows: int, n_per_row: int) -> np.ndarray:
    """libggml's decode (the type's to_float) of GGML bytes -> float32 [n_rows, n_per_row]."""
    tid = _check_row(type_name, n_per_row)
    lib = _ggml()
    src = np.frombuffer(bytes(raw), dtype=np.uint8) if not isinstance(raw, np.ndarray) \
        else np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if src.size != n_rows * lib.ggml_row_size(tid, n_per_row):
        raise D2Error(f"{type_name} data of {src.size} bytes does not fit [{n_rows}, {n_per_row}]")
    traits = lib.ggml_get_type_traits(tid).contents
    if not traits.to_float:
        raise D2Error(f"libggml has no decoder for {type_name}")
    to_float = _to_float_t(traits.to_float)
    out = np.empty((n_rows, n_per_row), dtype=np.float32)
    to_float(src.ctypes.data_as(ctypes.c_void_p), _float_ptr(out), n_rows * n_per_row)
    return out
