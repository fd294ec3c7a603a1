"""Which tensor carries the loss? Re-quantize named tensors of a finished GGUF and score it (issue 10).

A file's perplexity gap to the float model is the sum of many tensors' errors. This tool takes one
of our files, replaces the named tensors by llama.cpp's own rounding of the float weights (read
from the F32 file gguf_bench writes), writes the result and scores it under the domain protocol:

  TENSOR=llamacpp   the tensor's own GGML type, rounded by ggml_quantize_chunk without an importance
                    vector (for token_embd that is exactly what llama-quantize writes with an
                    imatrix too: llama-imatrix sees no matmul on the embedding table)
  TENSOR=Q8_0       another type (F32 takes the float tensor): the tensor's share of the loss
  TENSOR=DONOR.gguf the donor file's tensor as it is, e.g. llama.cpp + imatrix's layers into ours:
                    which layers lose the difference between two files
TENSOR is a glob over GGUF tensor names (blk.1?.ffn_*, blk.*.attn_q.weight).

    python bench/tensor_swap.py --model qwen2.5-coder-1.5b \
        --file out/gguf_bench/qwen2.5-coder-1.5b-Q2_K-d2quant+forward_dtype=bfloat16-wiki32x512.gguf \
        --variant token_embd.weight=llamacpp --variant token_embd.weight=Q8_0

Every variant is one row appended to bench/results/tensor_swap.jsonl.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import os
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
from rich.console import Console
from rich.table import Table

import protocol  # bench/ is on sys.path when run as a script
from gguf_bench import file_stem
from converters.gguf.tokenizer import copy_fields
from d2quant.errors import D2Error
from d2quant.sources import load_source
from resultlog import append_row
from runtime_tests.libggml import quantize_rows
from runtime_tests.llamacpp import LlamaCppDecoder

RESULTS = Path(__file__).parent / "results" / "tensor_swap.jsonl"
_WRITER_FIELDS = ("GGUF.", "general.architecture", "general.alignment")  # GGUFWriter writes these itself


def _tensor(reader: gguf.GGUFReader, name: str) -> gguf.ReaderTensor:
    for t in reader.tensors:
        if t.name == name:
            return t
    raise D2Error(f"{name} is not a tensor of the float file; write it again with bench/gguf_bench.py")


@functools.lru_cache(maxsize=4)
def _donor(path: str) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def _rerounded(float_reader: gguf.GGUFReader, ours: gguf.ReaderTensor, how: str):
    """(data, raw_dtype): the float tensor rounded by llama.cpp onto our type or ``how``'s."""
    w = np.asarray(_tensor(float_reader, ours.name).data, dtype=np.float32)
    type_name = ours.tensor_type.name if how == "llamacpp" else how.upper()
    qtype = gguf.GGMLQuantizationType[type_name]
    if qtype == gguf.GGMLQuantizationType.F32:
        return w, qtype
    raw = np.frombuffer(quantize_rows(type_name, w.reshape(w.shape[0], -1)), dtype=np.uint8)
    return raw.reshape(w.shape[0], -1), qtype


def _matches(reader: gguf.GGUFReader, pattern: str) -> list[gguf.ReaderTensor]:
    return [t for t in reader.tensors if fnmatch.fnmatchcase(t.name, pattern)]


def tensor_plan(reader: gguf.GGUFReader, float_reader: gguf.GGUFReader,
                swaps: dict[str, str]) -> list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    """The output's tensors. A donor pattern makes the matched tensors exactly the donor's: ours
    the donor lacks (DAC biases, say) are dropped, the donor's that we lack are added."""
    reround: dict[str, str] = {}
    donated: dict[str, gguf.ReaderTensor] = {}
    taken: set[str] = set()  # our names a donor pattern covers
    for pattern, how in swaps.items():
        if how.endswith(".gguf"):
            if not Path(how).is_file():
                raise D2Error(f"{pattern}={how}: the donor file does not exist")
            theirs = _matches(_donor(how), pattern)
            donated.update({t.name: t for t in theirs})
            ours = _matches(reader, pattern)
            taken.update(t.name for t in ours)
            found = theirs or ours
        elif how == "llamacpp" or how.upper() in gguf.GGMLQuantizationType.__members__:
            found = _matches(reader, pattern)
            reround.update({t.name: how for t in found})
        else:
            raise D2Error(f"{pattern}={how}: say llamacpp, a GGML type name such as Q8_0, or a donor .gguf")
        if not found:
            raise D2Error(f"{pattern} matches no tensor; use the names `gguf-dump` lists "
                          "(globs such as blk.1?.ffn_* work)")
    plan = []
    for t in reader.tensors:
        if t.name in donated:
            d = donated.pop(t.name)
            plan.append((t.name, d.data, d.tensor_type))
        elif t.name in taken:
            continue
        elif t.name in reround:
            plan.append((t.name, *_rerounded(float_reader, t, reround[t.name])))
        else:
            plan.append((t.name, t.data, t.tensor_type))
    return plan + [(n, d.data, d.tensor_type) for n, d in donated.items()]


def swapped_file(path: Path, float_path: Path, swaps: dict[str, str], out: Path) -> None:
    """A copy of ``path`` with the ``swaps`` applied: {tensor glob: "llamacpp", a GGML type, or a
    donor .gguf}; see ``tensor_plan``."""
    reader, float_reader = gguf.GGUFReader(str(path)), gguf.GGUFReader(str(float_path))
    plan = tensor_plan(reader, float_reader, swaps)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".part")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        copy_fields(writer, reader, lambda key: not key.startswith(_WRITER_FIELDS))
        for name, data, qtype in plan:
            writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--file", type=Path, required=True, help="a GGUF gguf_bench wrote")
    ap.add_argument("--variant", action="append", required=True,
                    help="GLOB=HOW[,GLOB=HOW...]; HOW is llamacpp, a GGML type (Q8_0, F32, ...) or a donor .gguf")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    console = Console()
    float_path = args.file.parent / f"{file_stem(args.model)}-F32-float.gguf"  # gguf_bench's float file
    for p in (args.file, float_path):
        if not p.exists():
            raise SystemExit(f"error: {p} does not exist; write it with bench/gguf_bench.py first")
    src = load_source(args.model)
    sets = protocol.eval_sets(args.model, src.tokenizer, src.spec.vocab, args.windows, args.ctx, "llamacpp",
                              lambda: LlamaCppDecoder(float_path, n_ctx=args.ctx, n_threads=args.threads))
    table = Table(title=f"{args.file.name} with tensors swapped")
    for col in ("variant", *(f"{s.name} ppl / KLD" for s in sets)):
        table.add_column(col)
    for variant in args.variant:
        swaps = dict(part.split("=", 1) for part in variant.split(","))
        out = args.file.with_name(f"{args.file.stem}-swap.gguf")
        t0 = time.time()
        swapped_file(args.file, float_path, swaps, out)
        dec = LlamaCppDecoder(out, n_ctx=args.ctx, n_threads=args.threads)
        try:
            scores = protocol.score(dec, sets)
        finally:
            dec.close()
        append_row(RESULTS, {"model": args.model, "file": str(args.file), "variant": variant,
                             "file_bytes": out.stat().st_size, "windows": args.windows, "ctx": args.ctx,
                             "scores": scores, "seconds": round(time.time() - t0, 1),
                             "date": time.strftime("%Y-%m-%d %H:%M:%S")})
        out.unlink()  # a large file; the row holds what was learnt
        table.add_row(variant, *(f"{scores[s.name]['ppl']:.3f} / {scores[s.name]['mean_kl']:.4f}"
                                 for s in sets))
        console.print(table)


if __name__ == "__main__":
    main()
