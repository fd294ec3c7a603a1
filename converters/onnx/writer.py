"""QuantizedModel -> a directory with model.onnx (+ model.onnx.data), tokenizer and genai_config.json."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx import helper

from converters.onnx.genai import genai_config
from converters.onnx.graph import DecoderBuilder
from converters.onnx.layouts import MS
from converters.onnx.target import ONNXOptions
from converters.onnx.store import GraphStore
from d2quant.errors import D2Error
from d2quant.qmodel import QuantizedModel

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
METADATA_KEY = "d2export"
FORMAT = "d2export-onnx"
VERSION = 1
OPSET = 21
IR_VERSION = 10  # readable by onnxruntime >= 1.20
# protobuf caps one message at 2 GiB; keep a margin for the estimate
_SINGLE_FILE_LIMIT = 3 << 29


def _estimated_bytes(qm: QuantizedModel) -> int:
    codes = sum(ql.codes.numel() for ql in qm.linears.values())  # <= 1 byte each once packed
    return codes + sum(t.numel() * 4 for t in qm.tensors.values())


def write_onnx(qm: QuantizedModel, out_dir: str | Path, *, embed: str = "float",
               dsq_layout: str = "planes", accuracy_level: int = 0, attention: str = "gqa",
               external_data: bool = True, force: bool = False) -> Path:
    """Write the decoder of ``qm`` for onnxruntime; return the output directory.

    embed: "float" (Gather) or "quantized" (GatherBlockQuantized; needs a quantized
    ``model.embed_tokens``). dsq_layout: how DSQ residual-binary weights are carried ("planes" or
    "lut", see converters.onnx.layouts). accuracy_level: MatMulNBits' attribute (0: float
    activations, exact; 4: int8 activations, faster). attention: "gqa" (contrib
    GroupQueryAttention) or "ops" (standard ONNX ops). external_data: tensors in model.onnx.data
    (onnxruntime memory-maps it: half the memory and a faster start than one file; required above
    protobuf's 2 GB).
    """
    out = Path(out_dir)
    if out.exists() and not force:
        raise D2Error(f"output {out} exists; pass --force to overwrite it")
    ONNXOptions(dsq_layout, accuracy_level, embed, attention)  # validates
    if not external_data and _estimated_bytes(qm) > _SINGLE_FILE_LIMIT:
        raise D2Error("the model is too large for a single .onnx file (protobuf's 2 GB limit); "
                      "write it with external data")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    store = None
    try:
        store = GraphStore(tmp / DATA_FILE if external_data else None)
        builder = DecoderBuilder(qm, store, embed=embed, dsq_layout=dsq_layout,
                                 accuracy_level=accuracy_level, attention=attention)
        inputs, outputs = builder.build()
        store.close()
        graph = helper.make_graph(store.nodes, "d2export_decoder", inputs, outputs, store.initializers)
        model = helper.make_model(graph, producer_name="d2export", ir_version=IR_VERSION,
                                  opset_imports=[helper.make_opsetid("", OPSET),
                                                 helper.make_opsetid(MS, 1)])
        meta = {"format": FORMAT, "version": VERSION, "arch": qm.spec.arch, "embed": embed,
                "dsq_layout": dsq_layout, "accuracy_level": accuracy_level, "attention": attention,
                "recipe": qm.recipe, **builder.meta}
        helper.set_model_props(model, {METADATA_KEY: json.dumps(meta)})
        (tmp / MODEL_FILE).write_bytes(model.SerializeToString())
        if qm.tokenizer is not None:
            qm.tokenizer.save_pretrained(str(tmp))
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(qm, MODEL_FILE), indent=2))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it private
        _replace_dir(tmp, out)
    except BaseException:
        if store is not None:
            store.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` is set aside first and deleted only after."""
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def read_metadata(model: onnx.ModelProto) -> dict:
    """The writer's metadata (layouts of every weight) from a loaded model."""
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise D2Error("this ONNX model was not written by d2export (no d2export metadata)")
    meta = json.loads(props[METADATA_KEY])
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise D2Error(f"ONNX metadata format {meta.get('format')} version {meta.get('version')}; "
                      f"this d2export reads version {VERSION}")
    return meta
