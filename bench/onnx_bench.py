"""A checkpoint exported to ONNX, run by onnxruntime vs the torch quantized model, under the
domain protocol (bench/protocol.py).

For each checkpoint and DSQ layout: file size, onnxruntime's perplexity and KL divergence from the
float model (torch) on every eval set of the protocol at accuracy levels 0 and 4, the torch
quantized model's on the same windows, prefill (one 512-token window) and decode (64 greedy
tokens) speed. One JSON line per result in bench/results/onnx_domains.jsonl (onnx.jsonl: the
wikitext-only rows of before).

    python bench/onnx_bench.py CKPT [CKPT ...] --windows 40 [--layouts planes lut]
    python bench/onnx_bench.py float:smollm2-135m onnx:GENAI_BUILDER_DIR --windows 40
    python bench/onnx_bench.py --speed runs/onnx/DIR [...] --reps 3   # idle machine
    python bench/onnx_bench.py --table
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import onnx

import protocol  # bench/ is on sys.path when run as a script
from resultlog import append_row, read_rows
from converters.onnx import write_onnx
from d2quant.data import read_text, wikitext_dir
from d2quant.evaluate import TorchBackend
from d2quant.pipeline import quantize_embeddings
from d2quant.qmodel import QuantizedModel
from d2quant.sources import load_source
from runtime_tests.onnxrt import OrtDecoder

DATA = wikitext_dir()
RESULTS = Path(__file__).resolve().parent / "results" / "onnx_domains.jsonl"
SPEED_RESULTS = RESULTS.with_name("onnx_speed.jsonl")
EMBED_GROUP = 64


def _speed(dec: OrtDecoder, ids: list[int]) -> tuple[float, float]:
    prefill = len(ids) / dec.prefill_seconds(ids)  # timed in the runtime's process
    t = time.perf_counter()
    n = sum(1 for _ in dec.generate(ids[:32], 64))
    return prefill, n / (time.perf_counter() - t)


def _levels(model_dir: Path) -> tuple[int | None, ...]:
    """MatMulNBits accuracy levels worth running: 0 and 4 for a quantized graph, none for float."""
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    return (0, 4) if any(n.op_type == "MatMulNBits" for n in graph.node) else (None,)


def _export(target: str, layout: str, embed: str, attention: str, out_root: Path):
    """(ONNX folder, name, recipe, quantized model or None) for a benchmark target."""
    if target.startswith("onnx:"):  # written by another tool (onnxruntime-genai's builder)
        out = Path(target[len("onnx:"):])
        return out, out.name, {"method": "external"}, None
    if target.startswith("float:"):
        qm = QuantizedModel.unquantized(load_source(target[len("float:"):]))
        name = target.replace(":", "-")
    else:
        qm, name = QuantizedModel.load(target), Path(target).name
    if embed != "float":
        qm = quantize_embeddings(qm, int(embed[1:]), EMBED_GROUP)
        name += f"-emb{embed}"
    if attention != "gqa":
        name += f"-{attention}"
    out = write_onnx(qm, out_root / f"{name}-{layout}", dsq_layout=layout, force=True,
                     embed="float" if embed == "float" else "quantized", attention=attention)
    return out, name, {k: qm.recipe.get(k) for k in ("method", "bits", "group_size")}, qm


def bench(target: str, layout: str, embed: str, attention: str, windows: int, out_root: Path,
          model: str) -> list[dict]:
    out, name, recipe, qm = _export(target, layout, embed, attention, out_root)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name.startswith("model.onnx"))
    fp = load_source(model)
    sets = protocol.eval_sets(model, fp.tokenizer, fp.spec.vocab, windows, 512, "torch",
                              lambda: TorchBackend(fp.model, fp.tokenizer))
    torch_scores = None if qm is None else protocol.score(TorchBackend(qm.to_torch(), qm.tokenizer), sets)
    has_rbin = qm is not None and any(ql.grid.kind == "rbin" for ql in qm.linears.values())
    text = read_text(DATA / "test.txt")
    rows = []
    for level in _levels(out):
        dec = OrtDecoder(out, accuracy_level=level)
        scores = protocol.score(dec, sets)
        prefill, decode = _speed(dec, dec.tokenize(text[:20000])[:512])
        dec.close()
        rows.append({"ckpt": name, "recipe": recipe, "layout": layout if has_rbin else "-",
                     "accuracy_level": level, "file_mb": round(size / 2**20, 1), "scores": scores,
                     "torch_scores": torch_scores, "windows": windows, "prefill_tok_s": round(prefill, 1),
                     "decode_tok_s": round(decode, 1), "threads": os.cpu_count()})
    return rows


def speeds(dirs: list[Path], reps: int) -> list[dict]:
    """Prefill (512 tokens) and decode (64 tokens) of exported folders, best of ``reps`` runs with
    the folders taking turns: meant for an otherwise idle machine."""
    text = read_text(DATA / "test.txt")
    runs = []
    for d in dirs:
        runs += [(d, level, OrtDecoder(d, accuracy_level=level)) for level in _levels(d)]
    ids = runs[0][2].tokenize(text[:20000])[:512]
    best = {(d, level): (0.0, 0.0) for d, level, _ in runs}
    for _ in range(reps):
        for d, level, dec in runs:
            p, g = _speed(dec, ids)
            best[d, level] = (max(best[d, level][0], p), max(best[d, level][1], g))
    rows = []
    for (d, level), (p, g) in best.items():
        peak, base = peak_rss_mb(d, level)
        rows.append({"onnx": d.name, "accuracy_level": level, "prefill_tok_s": round(p, 1),
                     "decode_tok_s": round(g, 1), "reps": reps, "threads": os.cpu_count(),
                     "peak_rss_mb": peak, "process_base_mb": base})
    return rows


# VmHWM (d2quant.cpu), not getrusage: Linux carries ru_maxrss over exec, so a child would report
# its parent's peak
_PEAK_RSS = """
import sys
from d2quant.cpu import peak_rss_mb
from runtime_tests.onnxrt import OrtDecoder
level = None if sys.argv[2] == "-" else int(sys.argv[2])
before = peak_rss_mb()
dec = OrtDecoder(sys.argv[1], accuracy_level=level)
dec.logits(list(range(100, 612)))
print(before, peak_rss_mb())
"""


def peak_rss_mb(model_dir: Path, level: int | None) -> tuple[float, float]:
    """(peak RSS of a fresh process after loading the model and one 512-token prefill, the same
    process's peak before the session) in MiB: mmap'd weights count once they are touched."""
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(model_dir.resolve()), "-" if level is None else str(level)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    before, after = map(float, out.stdout.split()[-2:])
    return round(after, 1), round(before, 1)


def table() -> str:
    rows, sets = read_rows(RESULTS), protocol.EVAL_SETS
    cell = lambda sc: f"{sc['ppl']:.2f} / {sc['mean_kl']:.4f}"  # noqa: E731
    out = [f"| checkpoint | layout | acc. level | file MiB | {' | '.join(f'{n} ppl / KLD' for n in sets)} | "
           "wiki-test ppl in torch | prefill tok/s | decode tok/s | windows |",
           "|---|---|---|---|" + "---|" * len(sets) + "---|---|---|---|"]
    for r in rows:
        torch_ppl = f"{r['torch_scores']['wiki-test']['ppl']:.2f}" if r.get("torch_scores") else "-"
        level = "-" if r["accuracy_level"] is None else r["accuracy_level"]
        out.append(f"| {r['ckpt']} | {r['layout']} | {level} | {r['file_mb']} | "
                   f"{' | '.join(cell(r['scores'][n]) for n in sets)} | {torch_ppl} | {r['prefill_tok_s']} | "
                   f"{r['decode_tok_s']} | {r['windows']} |")
    speed = read_rows(SPEED_RESULTS)
    if speed:
        out += ["", "| ONNX folder | acc. level | prefill tok/s (512) | decode tok/s (64) | peak RSS MiB | best of | threads |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['onnx']} | {'-' if r['accuracy_level'] is None else r['accuracy_level']} | "
                f"{r['prefill_tok_s']} | {r['decode_tok_s']} | {r.get('peak_rss_mb', '-')} | {r['reps']} | "
                f"{r['threads']} |" for r in speed]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("targets", nargs="*",
                    help="checkpoint dir | float:MODEL (the unquantized model) | onnx:DIR (another tool's export)")
    ap.add_argument("--layouts", nargs="*", default=["planes"])
    ap.add_argument("--embeds", nargs="*", default=["float"], choices=["float", "q4", "q8"],
                    help="embedding table (and tied lm_head) float or RTN q4/q8 (block 64)")
    ap.add_argument("--attentions", nargs="*", default=["gqa"], choices=["gqa", "ops"])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--model", default="smollm2-135m", help="the float model the KLD is measured from")
    ap.add_argument("--out", type=Path, default=Path("runs/onnx"))
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--speed", nargs="*", type=Path, default=None,
                    help="only time these exported folders (best of --reps; an idle machine)")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    if a.table:
        print(table())
        return
    if a.speed:
        for row in speeds(a.speed, a.reps):
            append_row(SPEED_RESULTS, row)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    for target in a.targets:
        external = target.startswith("onnx:")
        for layout, embed, attention in itertools.product(
                a.layouts[:1] if external or target.startswith("float:") else a.layouts,
                ["float"] if external else a.embeds, ["gqa"] if external else a.attentions):
            for row in bench(target, layout, embed, attention, a.windows, a.out, a.model):
                append_row(RESULTS, row)


if __name__ == "__main__":
    main()
