"""Where a source's weights live while it is calibrated: in the model, or in its files.

Calibration asks for one module's weights at a time (``load``) and hands them back (``release``):

* ``ResidentWeights``: the model already holds them (a model loaded whole, a padded or rotated one);
  load moves the module to the calibration device, release keeps it;
* ``SafetensorsWeights``: a Hugging Face directory's (sharded) safetensors, read lazily with
  ``safe_open`` in the source dtype;
* ``GGUFWeights``: a .gguf file's tensors, each read from its offset and dequantized alone, then
  given transformers' own GGUF-to-HF rewrite (names, the llama q/k RoPE order, Gemma's norm
  offset), so a tensor equals the one a whole load gives.

For the last two the model is a skeleton whose parameters sit on the meta device, a module is
materialised in float32 on the device when it is calibrated, and put back on the meta device after.
RAM then holds about one layer, whatever the depth of the model.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from d2quant.errors import D2Error

META = torch.device("meta")


class ResidentWeights:
    streams = False

    def load(self, module: torch.nn.Module, prefix: str, device: torch.device) -> None:
        module.to(device)

    def release(self, module: torch.nn.Module) -> None:
        pass

    def row_blocks(self, module: torch.nn.Module, prefix: str):
        """(rows, float32 weight of those rows on the CPU), ROW_BLOCK rows at a time, that cover
        module's weight: here views of it (an edit of one is the module's). Every kind of weights
        gives the same blocks, so that what is computed block by block has the same bits."""
        w = module.weight.detach().float()
        for rows in _row_slices(w.shape[0]):
            yield rows, w[rows]


class _StreamedWeights:
    """Reads a module's parameters by name from files; subclasses say how one tensor is read."""

    streams = True

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor in float32 on the CPU."""
        return _checked(name, self._read(name))

    def load(self, module: torch.nn.Module, prefix: str, device: torch.device) -> None:
        for name, p in list(module.named_parameters()):
            t = _checked(prefix + name, self._read(prefix + name), tuple(p.shape))
            _set_parameter(module, name, t.to(device))
        module.to(device)  # its buffers (rotary tables, scales) follow

    def release(self, module: torch.nn.Module) -> None:
        for name, p in list(module.named_parameters()):
            _set_parameter(module, name, torch.empty_like(p, device=META))

    def _read_rows(self, name: str, rows: slice) -> torch.Tensor:
        """Those rows of one tensor in float32, without reading the rest."""
        raise NotImplementedError

    def row_blocks(self, module: torch.nn.Module, prefix: str):
        """As ResidentWeights.row_blocks, each block read alone: a vocabulary table is then never
        whole in float32 (only its rows' reading is asked of a kind, so a GGUF's per-tensor
        rewrites, which never move a table's rows, apply block by block)."""
        name, shape = prefix + "weight", tuple(module.weight.shape)
        for rows in _row_slices(shape[0]):
            yield rows, _checked(name, self._read_rows(name, rows), (rows.stop - rows.start, *shape[1:]))


class SafetensorsWeights(_StreamedWeights):
    """Tensors by name from a directory's ``model.safetensors`` or its sharded index."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                names = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise D2Error(f"{index} is unreadable ({e}); re-download the model")
            shards = sorted(set(names.values()))
        elif (folder / "model.safetensors").is_file():
            shards, names = ["model.safetensors"], None
        else:
            raise D2Error(f"{folder} has no model.safetensors nor model.safetensors.index.json; "
                          "--stream reads safetensors (drop --stream to load other formats whole)")
        # tensor name -> its shard; a shard is opened for each read and closed after, so its
        # memory-mapped pages leave the process with it (they would count as resident otherwise)
        self._shard: dict[str, Path] = {}
        for shard in shards:
            path = folder / shard
            if not path.is_file():
                raise D2Error(f"shard {path} listed by the index is missing; re-download the model")
            try:
                with safe_open(str(path), framework="pt") as handle:
                    keys = list(handle.keys())
            except Exception as e:  # a truncated or corrupt header
                raise D2Error(f"shard {path} is corrupt ({type(e).__name__}: {e}); re-download it")
            for name in keys:
                if names is None or names.get(name) == shard:
                    self._shard[name] = path

    def _read(self, name: str) -> torch.Tensor:
        return self._open(name, lambda handle: handle.get_tensor(name))

    def _read_rows(self, name: str, rows: slice) -> torch.Tensor:
        return self._open(name, lambda handle: handle.get_slice(name)[rows])

    def _open(self, name: str, take) -> torch.Tensor:
        """take(the shard's handle), in float32."""
        path = self._shard.get(name)
        if path is None:
            raise D2Error(f"the model's safetensors lack {name}; the download is incomplete")
        try:
            with safe_open(str(path), framework="pt") as handle:
                return take(handle).float()
        except Exception as e:  # a shard truncated after its header
            raise D2Error(f"cannot read {name} ({type(e).__name__}: {e}); the shard is truncated, re-download it")


# rows a vocabulary table is read (and rounded) at a time: Qwen2.5's 151 936 x 1 536 in float32 is
# 0.9 GB, and its bf16 copy was half as much again while it was converted
ROW_BLOCK = 16384


def _row_slices(n: int):
    return (slice(r, min(n, r + ROW_BLOCK)) for r in range(0, n, ROW_BLOCK))


def _checked(name: str, t: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if shape is not None and tuple(t.shape) != shape:
        raise D2Error(f"{name} has shape {tuple(t.shape)} in the model files but {shape} in its "
                      "config; the model files do not match")
    if not torch.isfinite(t).all():
        raise D2Error(f"the model has NaN/Inf values in {name}; the weights are corrupt")
    return t


def _gguf_arch(reader) -> str:
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def open_gguf(path: Path):
    """(GGUFReader, its general.architecture), or one line saying the file is corrupt."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        return reader, _gguf_arch(reader)
    except Exception as e:
        raise D2Error(f"{path} is a corrupt GGUF file ({type(e).__name__}: {e})")


class GGUFWeights(_StreamedWeights):
    """Tensors by transformers name from a .gguf file; ``model`` is the skeleton they fill and
    ``reader`` the file's GGUFReader when the caller has parsed the header already."""

    def __init__(self, path: Path, model: torch.nn.Module, reader=None):
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)

        reader, arch = open_gguf(path) if reader is None else (reader, _gguf_arch(reader))
        # where each tensor's bytes are, so that a read neither maps nor keeps the whole file
        self._at = {t.name: (t.tensor_type, t.data_offset, t.data.dtype, t.data.shape) for t in reader.tensors}
        del reader
        cfg = model.config
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config={
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads})
        self._gguf_name = {hf: g for g, hf in get_gguf_hf_weights_map(model, self._processor).items()}
        self._path = path

    def _read(self, name: str) -> torch.Tensor:
        return self._read_rows(name, slice(0, None))

    def _read_rows(self, name: str, rows: slice) -> torch.Tensor:
        g = self._gguf_name.get(name)
        if g is None or g not in self._at:
            raise D2Error(f"{self._path} lacks the tensor for {name}; the file is incomplete, re-download it")
        qtype, offset, dtype, shape = self._at[g]
        first, stop, _ = rows.indices(shape[0])
        row = int(np.prod(shape[1:]))  # a row's items (bytes, for a quantized type): rows lie one after another
        count = (stop - first) * row
        data = np.fromfile(self._path, dtype=dtype, count=count, offset=offset + first * row * np.dtype(dtype).itemsize)
        if data.size != count:
            raise D2Error(f"{self._path} is truncated inside {g}; re-download it")
        w = self._processor.process(weights=_dequantize_by_rows(data.reshape(stop - first, *shape[1:]), qtype),
                                    name=g).weights
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))


DEQUANTIZE_ROWS = 16384  # rows per gguf-py dequantize call


def _dequantize_by_rows(data: np.ndarray, qtype) -> np.ndarray:
    """gguf-py's dequantize, DEQUANTIZE_ROWS rows at a time (its blocks lie along a row): over a whole
    151 936-row vocabulary table its temporaries are 1 GB more than the table."""
    from gguf.quants import dequantize

    n = DEQUANTIZE_ROWS
    if data.ndim < 2 or data.shape[0] <= n:
        return dequantize(data, qtype)
    out = None
    for r in range(0, data.shape[0], n):
        part = dequantize(data[r:r + n], qtype)
        if out is None:
            out = np.empty((data.shape[0], *part.shape[1:]), part.dtype)
        out[r:r + n] = part
    return out


def _set_parameter(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, attr, torch.nn.Parameter(value, requires_grad=False))


@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device and their buffers for real
    (rotary tables, embedding scales are computed at construction and not stored in the files)."""
    register = torch.nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None and not param.is_meta:  # a meta one is shared (tied embeddings): kept
            self._parameters[name] = torch.nn.Parameter(param.to(META), requires_grad=False)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def skeleton(config) -> torch.nn.Module:
    """A transformers model of ``config`` whose parameters are all on the meta device."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
