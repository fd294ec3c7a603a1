"""The checkpoint on disk, written layer by layer as calibration goes and resumable.

Layout (version 2): ``layers/NNNNN.safetensors`` per decoder layer (its codes, grid parameters,
biases and float tensors), ``top.safetensors`` (embeddings, final norm, lm_head), ``manifest.json``
(which file holds each entry, the grids, the recipe and the report) and ``tokenizer/``.

While calibration runs, the checkpoint grows in ``OUT.partial/``: each finished layer's file, then
``stream-RANK-LAYER.pt`` (each process's activations entering the next layer) and ``progress.json``
(how many layers are done, under which fingerprint of the options and the calibration tokens).
Rank 0 writes the checkpoint's files; with several processes every rank keeps its own stream. ``--resume`` continues
from the last complete layer and gives the same files as an uninterrupted run; the finished
checkpoint is renamed into place at the end. Version 1 (one ``model.safetensors``) still loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from d2quant.distributed import SINGLE, Group
from d2quant.errors import D2Error
from d2quant.grids import grid_from_spec

FORMAT = "d2export-checkpoint"
VERSION = 2
READS = (1, 2)
TOP = "top.safetensors"


def layer_file(i: int) -> str:
    return f"layers/{i:05d}.safetensors"


def _flatten(linears: dict, tensors: dict) -> tuple[dict[str, torch.Tensor], dict]:
    flat, meta = {}, {}
    for name, ql in linears.items():
        flat[f"{name}.codes"] = ql.codes.to(torch.uint8)
        for k, v in ql.params.items():
            flat[f"{name}.{k}"] = v.float()
        if ql.bias is not None:
            flat[f"{name}.bias"] = ql.bias.float()
        meta[name] = {"grid": ql.grid.spec(), "params": sorted(ql.params), "bias": ql.bias is not None}
    for k, v in tensors.items():
        flat[k] = v.float()
    return {k: v.contiguous() for k, v in flat.items()}, meta


def _save(flat: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(flat, str(tmp))
    os.replace(tmp, path)


def _write_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def fingerprint(recipe: dict, spec, source: dict, tokens: torch.Tensor | None) -> str:
    """What must match for a partial checkpoint to be resumed: every option that changes a number
    (not where activations or weights are kept), the model and the calibration tokens."""
    recipe = {k: v for k, v in recipe.items() if k not in ("offload", "stream")}
    h = hashlib.sha256(json.dumps([recipe, asdict(spec), source.get("path")], sort_keys=True,
                                  default=str).encode())
    if tokens is not None:
        h.update(tokens.cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:24]


class CheckpointWriter:
    """Writes a checkpoint as its layers are finished; resumable from ``OUT.partial``."""

    def __init__(self, out: str | Path, fp: str, *, resume: bool = False, force: bool = False,
                 group: Group = SINGLE):
        self.out, self.group = Path(out), group
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.fp, self.meta, self.files, self.layers = fp, {}, {}, []
        progress = self.partial / "progress.json"
        refused = None
        if group.writes:
            try:
                self._open(progress, resume, force)
            except D2Error as e:
                refused = str(e)
        refused = group.share(refused, 0)  # every rank stops on rank 0's refusal, with its words
        if refused:
            raise D2Error(refused)
        if resume and not group.writes:
            self._load_state(progress)

    def _load_state(self, progress: Path) -> str:
        """The written layers' entries from ``progress``; returns the fingerprint they were made under."""
        state = json.loads(progress.read_text())
        self.meta, self.files, self.layers = state["linears"], state["files"], state["layers"]
        return state["fingerprint"]

    def _open(self, progress: Path, resume: bool, force: bool) -> None:
        if resume:
            if not progress.is_file():
                raise D2Error(f"--resume: there is no interrupted run at {self.partial}; drop --resume")
            if self._load_state(progress) != self.fp:
                raise D2Error(f"--resume: {self.partial} was made with other options, another model or other "
                              "calibration tokens; repeat its options, or drop --resume to start over")
        else:
            if self.partial.exists():
                if not force:
                    raise D2Error(f"{self.partial} holds an interrupted run; pass --resume to continue it "
                                  "or --force to start over")
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
            self._progress()

    @property
    def done(self) -> int:
        """Decoder layers already written."""
        return len(self.layers)

    def _stream_file(self, i: int) -> Path:
        return self.partial / f"stream-{self.group.rank}-{i:05d}.pt"

    def stream(self) -> dict:
        """This rank's activations entering the first layer not yet written ({"x": [...], "xf": [...] | None})."""
        path = self._stream_file(self.done - 1)
        if not path.is_file():
            raise D2Error(f"--resume: {path} is missing, so the interrupted run cannot go on; "
                          "drop --resume (and pass --force) to start over")
        return torch.load(path)

    def _progress(self) -> None:
        _write_json({"fingerprint": self.fp, "layers": self.layers, "linears": self.meta,
                     "files": self.files}, self.partial / "progress.json")

    def _add(self, file: str, linears: dict, tensors: dict) -> None:
        flat, meta = _flatten(linears, tensors)
        _save(flat, self.partial / file)
        self.meta.update(meta)
        self.files.update({n: file for n in [*linears, *tensors]})

    def layer(self, i: int, linears: dict, tensors: dict, stats: dict, stream: dict | None) -> None:
        """Layer ``i`` is finished; ``stream`` (the activations entering layer i + 1) makes it resumable."""
        if i != self.done:
            raise D2Error(f"internal: layer {i} written after {self.done} layers")
        if self.group.writes:
            self._add(layer_file(i), linears, tensors)
        if stream is not None:
            tmp = self._stream_file(i).with_suffix(".tmp")
            torch.save(stream, tmp)
            os.replace(tmp, self._stream_file(i))
        self.group.barrier()  # every rank's stream is on disk before the layer counts as done
        self.layers.append(stats)
        if self.group.writes:
            self._progress()
        self.group.barrier()
        if i:
            self._stream_file(i - 1).unlink(missing_ok=True)

    def finish(self, linears: dict, tensors: dict, manifest: dict, tokenizer) -> Path:
        """The model's remaining entries (embeddings, norm, head) go to top.safetensors; the
        checkpoint is renamed into place."""
        self._stream_file(self.done - 1).unlink(missing_ok=True)
        if not self.group.writes:
            self.group.barrier()  # rank 0 has renamed the checkpoint into place
            return self.out
        self._add(TOP, linears, tensors)
        for f in self.partial.glob("stream-*.pt"):
            f.unlink()
        (self.partial / "progress.json").unlink(missing_ok=True)
        _write_json({"format": FORMAT, "version": VERSION, **manifest, "linears": self.meta,
                     "files": self.files}, self.partial / "manifest.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.partial / "tokenizer"))
        if self.out.is_dir():
            shutil.rmtree(self.out)
        elif self.out.exists():
            self.out.unlink()
        os.replace(self.partial, self.out)
        self.group.barrier()
        return self.out

    def abandon(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


def _linear(meta: dict, name: str, get) -> object:
    from d2quant.qmodel import QuantizedLinear

    m = meta[name]
    return QuantizedLinear(grid=grid_from_spec(m["grid"]), codes=get(f"{name}.codes").to(torch.int16),
                           params={k: get(f"{name}.{k}") for k in m["params"]},
                           bias=get(f"{name}.bias") if m["bias"] else None)


def _read_floats(folder: Path, files: dict) -> dict[str, torch.Tensor]:
    """The float tensors only (a layer file's codes stay on disk)."""
    out = {}
    for file in sorted(set(files.values())):
        with safe_open(str(folder / file), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n, fn in files.items() if fn == file})
    return out


class LazyLinears(Mapping):
    """A checkpoint's quantized linears, each read from its file when asked for and not kept, so a
    writer that handles one tensor at a time holds one layer's worth of codes."""

    def __init__(self, folder: Path, meta: dict, files: dict[str, str]):
        self._folder, self._meta, self._files = folder, meta, files

    def __getitem__(self, name: str):
        if name not in self._meta:
            raise KeyError(name)
        with safe_open(str(self._folder / self._files[name]), framework="pt") as f:
            return _linear(self._meta, name, f.get_tensor)

    def __iter__(self):
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)


def read_checkpoint(path: str | Path) -> tuple[dict, LazyLinears, dict]:
    """(manifest, linears, float tensors) of a checkpoint directory."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        hint = " (an interrupted run: resume it with --resume)" if (path.with_name(path.name + ".partial")).is_dir() else ""
        raise D2Error(f"{path} is not a d2export checkpoint (no manifest.json){hint}; "
                      "make one with `d2export quantize`")
    try:
        manifest = json.loads(mf.read_text())
    except ValueError as e:
        raise D2Error(f"checkpoint {path} is unreadable ({e}); re-run quantize")
    if manifest.get("format") != FORMAT or manifest.get("version") not in READS:
        raise D2Error(f"checkpoint {path} has format {manifest.get('format')} version "
                      f"{manifest.get('version')}; this d2export reads versions {', '.join(map(str, READS))}")
    lacks = [k for k in ("spec", "linears", "tensors", "recipe") if k not in manifest]
    if lacks:
        raise D2Error(f"checkpoint {path} is unreadable (its manifest lacks {', '.join(lacks)}); re-run quantize")
    files = manifest.get("files") or {n: "model.safetensors" for n in [*manifest["linears"], *manifest["tensors"]]}
    meta = manifest["linears"]
    try:
        for file in sorted(set(files.values())):
            with safe_open(str(path / file), framework="pt"):
                pass
        tensors = _read_floats(path, {n: f for n, f in files.items() if n not in meta})
    except D2Error:
        raise
    except Exception as e:  # a missing or corrupt safetensors file
        raise D2Error(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); re-run quantize")
    order = manifest["tensors"] if isinstance(manifest["tensors"], list) else list(tensors)
    return manifest, LazyLinears(path, meta, files), {n: tensors[n] for n in order}
