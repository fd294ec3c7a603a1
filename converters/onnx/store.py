"""Initializers and nodes of the graph being built, with the tensor bytes inline or in one external file.

External data is written as each initializer is added, so a model larger than protobuf's 2 GB limit
never exists as one message in memory. Offsets are page-aligned for large tensors so onnxruntime can
memory-map them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

_PAGE = 4096
_INLINE_BELOW = 1024  # bytes; tiny tensors (shapes, axes) stay in the graph for readability


class GraphStore:
    """Collects nodes and initializers; names are unique (a clash is a writer bug)."""

    def __init__(self, data_path: Path | None):
        self.nodes: list = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._counter = 0
        self._data_path = data_path
        self._data = open(data_path, "wb") if data_path else None

    def close(self) -> None:
        if self._data:
            self._data.close()
            self._data = None

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise RuntimeError(f"duplicate tensor name {name}")
        self._names.add(name)
        return name

    def init(self, name: str, array: np.ndarray) -> str:
        """Add an initializer holding ``array`` (dtype kept) and return its name."""
        array = np.array(array, order="C", copy=None)  # (ascontiguousarray makes scalars 1-d)
        tensor = numpy_helper.from_array(array, self._claim(name))
        if self._data is not None and array.nbytes >= _INLINE_BELOW:
            align = _PAGE if array.nbytes >= _PAGE else 64
            offset = -(-self._data.tell() // align) * align
            self._data.seek(offset)
            self._data.write(tensor.raw_data)
            set_external_data(tensor, location=self._data_path.name, offset=offset,
                              length=array.nbytes)
            tensor.data_location = TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
        self.initializers.append(tensor)
        return name

    def const(self, array, dtype=np.int64) -> str:
        """An anonymous small constant (shapes, axes, masks)."""
        self._counter += 1
        return self.init(f"const_{self._counter}", np.asarray(array, dtype=dtype))

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs) -> str | list[str]:
        """Add a node named ``name``; its outputs are ``outputs`` or ``name`` (one) / ``name:i``."""
        if outputs is None:
            outputs = [name] if n_out == 1 else [f"{name}:{i}" for i in range(n_out)]
        outs = [self._claim(o) for o in outputs]
        n_out = len(outs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None,
                                           **attrs))
        return outs[0] if n_out == 1 else outs
