"""Issue-3 benchmark: GGUF files of llama.cpp's quantizer vs ours, scored by llama.cpp.

For each model (SmolLM2-135M, and its 256-aligned padded twin ``smollm2-135m-pad768``, DESIGN.md
§6), preset (Q2_K, Q3_K_S, Q3_K_M, Q4_K_M) and method:

  llamacpp          llama.cpp's quantizer (ggml_quantize_chunk, what llama-quantize calls)
  llamacpp-imatrix  the same with an importance matrix from the calibration tokens (llama-imatrix)
  gptq              our GPTQ (act order, the default) onto the preset's native GGML grids
  d2quant           D²Quant (DSQ in dual-scale form + DAC) onto the same grids, as `d2export gguf`
  (ABLATIONS below: D²Quant without one part, and both in natural column order)
  float             (with --float, once per model) the float model as an F32 GGUF: the reference

every file is written by the same ``write_gguf`` and measured the same way: file size, bits per
weight over the *real* parameters (the unpadded model's, so padding zeros cost bits rather than
diluting them), llama.cpp perplexity on the first --windows windows of --ctx tokens of wikitext-2
test (``d2quant.evaluate.perplexity`` on the token ids torch is scored on: no BOS), and greedy
decode tokens/s of the file against the llamacpp file of the same preset (best of --decode-reps
runs, the two files taking turns so both see the same machine load). Calibration: --nsamples
random windows of --seqlen tokens of wikitext-2 valid (seed 0), the same tokens for the importance
matrix and for our methods.

One JSON line per result is appended to --results; rows already there (same model, preset, method,
nsamples, seqlen, windows, ctx) are skipped, so an interrupted run resumes. Files stay in --out-dir.

    python bench/gguf_bench.py                                   # the full queue (hours on 2 cores)
    python bench/gguf_bench.py --models smollm2-135m-pad768 --presets Q2_K Q3_K_S
    python bench/gguf_bench.py --table                           # markdown table of the results
    python bench/gguf_bench.py --speed OURS.gguf THEIRS.gguf --threads 2 --decode-reps 5  # idle machine
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
import warnings
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch

from resultlog import append_row, read_rows  # bench/ is on sys.path when run as a script
from converters.gguf import PRESETS as ALL_PRESETS
from converters.gguf import file_bits_per_weight, preset_grids, write_gguf
from d2quant.data import CalibConfig, calibration_tokens, read_text, wikitext_dir
from d2quant.evaluate import perplexity
from d2quant.padding import param_count
from d2quant.pipeline import QuantConfig, quantize
from d2quant.qmodel import QuantizedModel
from d2quant.sources import Source, load_source
from runtime_tests.llamacpp import LlamaCppDecoder, verify_weights
from runtime_tests.llamacpp_quant import collect_importance, quantize_with_libggml

ROOT = Path(__file__).resolve().parents[1]
DATA = wikitext_dir()
RESULTS = ROOT / "bench" / "results" / "gguf.jsonl"
SPEED_RESULTS = ROOT / "bench" / "results" / "gguf_speed.jsonl"
OUT_DIR = ROOT / "out" / "gguf_bench"

MODELS = ("smollm2-135m", "smollm2-135m-pad768")
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M")
METHODS = ("llamacpp", "llamacpp-imatrix", "gptq", "d2quant")
# variants: D²Quant minus one part, and both methods in natural column order (rows before act
# order became the default ran that way)
ABLATIONS = {"d2quant-nodac": {"dac": False}, "d2quant-nodsq": {"dsq": False},
             "gptq-natural": {"act_order": False}, "d2quant-natural": {"act_order": False},
             "d2quant-natural-nodac": {"act_order": False, "dac": False},
             "d2quant-natural-nodsq": {"act_order": False, "dsq": False}}
REFERENCE = "llamacpp"  # the file decode speed is compared against
KEY = ("model", "preset", "method", "nsamples", "seqlen", "windows", "ctx")


@dataclasses.dataclass
class Settings:
    nsamples: int
    seqlen: int
    windows: int
    ctx: int
    threads: int
    decode_tokens: int
    decode_reps: int
    device: str
    verify: bool
    out_dir: Path


class HFTokenIds:
    """llama.cpp logits on the ids the torch backend scores (HF tokenizer, no BOS), so the two
    runtimes' perplexities are over identical windows. (llama.cpp's own tokenizer agrees with it on
    wikitext-2 test up to token 245502 of 312144, then splits one string differently.)"""

    name = "llamacpp"

    def __init__(self, decoder: LlamaCppDecoder, tokenizer):
        self.decoder, self.tokenizer = decoder, tokenizer

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.decoder.logits(ids)


# ---- quantized models -------------------------------------------------------------------------

def _calib_tokens(src: Source, s: Settings) -> torch.Tensor:
    cfg = CalibConfig(calib=str(DATA / "valid.txt"), nsamples=s.nsamples, seqlen=s.seqlen, seed=0)
    return calibration_tokens(cfg, src.model, src.tokenizer, torch.device("cpu"))


def make_model(base: Source, preset: str, method: str, s: Settings) -> QuantizedModel:
    """``method``'s quantized model of a fresh copy of ``base`` (calibration edits its model)."""
    src = dataclasses.replace(base, model=copy.deepcopy(base.model), spec=copy.deepcopy(base.spec))
    if method == "float":
        return QuantizedModel.unquantized(src)
    if method == "llamacpp":
        return quantize_with_libggml(src, preset, None)
    tokens = _calib_tokens(src, s)
    if method == "llamacpp-imatrix":
        return quantize_with_libggml(src, preset, collect_importance(src, tokens))
    # what `d2export gguf` runs: the preset's grids, DSQ in its dual-scale (GGUF-exact) form
    cfg = QuantConfig(method=method.split("-")[0], dsq_form="dual", device=s.device,
                      grids=preset_grids(preset, src.spec), **ABLATIONS.get(method, {}))
    return quantize(src, tokens, cfg)


def write(qm: QuantizedModel, path: Path, preset: str | None) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_gguf(qm, path, force=True, preset=preset)
    return [str(w.message) for w in caught]


# ---- measurements -----------------------------------------------------------------------------

def _decode_tps(llm, prompt: list[int], n: int) -> float:
    """Greedy tokens/s over n decode steps after the prompt (prompt processing not timed)."""
    llm.reset()
    t0 = None
    for i, _ in enumerate(llm.generate(prompt, temp=0.0)):
        if i == 0:
            t0 = time.perf_counter()
        elif i == n:
            return n / (time.perf_counter() - t0)
    raise RuntimeError("generation stopped early")


def decode_speed(paths: list[Path], prompt: list[int], s: Settings) -> list[float]:
    """Best tokens/s of each file over ``decode_reps`` runs, the files taking turns: on a shared
    machine the fastest run is the one least disturbed by other load."""
    from llama_cpp import Llama

    llms = [Llama(model_path=str(p), n_ctx=len(prompt) + s.decode_tokens + 8, n_threads=s.threads,
                  verbose=False) for p in paths]
    try:
        for llm in llms:  # warm-up: page the weights in
            _decode_tps(llm, prompt, 8)
        runs = [[] for _ in llms]
        for _ in range(s.decode_reps):
            for r, llm in zip(runs, llms):
                r.append(_decode_tps(llm, prompt, s.decode_tokens))
        return [max(r) for r in runs]
    finally:
        for llm in llms:
            llm.close()


def _types(path: Path) -> dict[str, int]:
    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))


def run_row(base: Source, model: str, preset: str, method: str, s: Settings, test_text: str) -> dict:
    t0 = time.time()
    qm = make_model(base, preset, method, s)
    quant_seconds = time.time() - t0
    path = s.out_dir / f"{model}-{preset}-{method}.gguf"
    dropped = write(qm, path, None if method == "float" else preset)
    real = base.info.get("real_params") or param_count(base.model)
    row = {"model": model, "preset": preset, "method": method, "nsamples": s.nsamples,
           "seqlen": s.seqlen, "windows": s.windows, "ctx": s.ctx, "file": str(path),
           "file_bytes": path.stat().st_size, "real_params": real,
           "bpw": round(file_bits_per_weight(path, real), 4),
           "bpw_file_elements": round(file_bits_per_weight(path), 4), "types": _types(path),
           "quant_seconds": round(quant_seconds, 1), "warnings": dropped}
    if "seconds" in qm.report:
        row["calib_report"] = {k: qm.report[k] for k in ("seconds", "peak_mem_mb", "final_dac_shift")
                               if k in qm.report}
    if s.verify:
        w = verify_weights(path, qm)
        row["weights_verified"] = {"pass": w["pass"], "exact": w["exact"], "n_tensors": w["n_tensors"],
                                   "float32_rounding": len(w["float32_rounding"])}
    del qm

    dec = LlamaCppDecoder(path, n_ctx=s.ctx, n_threads=s.threads)
    try:
        t0 = time.time()
        res = perplexity(HFTokenIds(dec, base.tokenizer), test_text, s.ctx, s.windows)
        row.update(ppl=round(res.ppl, 4), nll=round(res.nll, 6), tokens=res.tokens,
                   ppl_seconds=round(time.time() - t0, 1))
    finally:
        dec.close()

    if method != "float":
        prompt = base.tokenizer(test_text[:2000], add_special_tokens=False)["input_ids"][:32]
        ref = s.out_dir / f"{model}-{preset}-{REFERENCE}.gguf"
        if method == REFERENCE:
            row["decode_tps"] = round(decode_speed([path], prompt, s)[0], 2)
        else:
            if not ref.exists():  # cheap: no calibration
                write(make_model(base, preset, REFERENCE, s), ref, preset)
            ours, theirs = decode_speed([path, ref], prompt, s)
            row.update(decode_tps=round(ours, 2), reference_decode_tps=round(theirs, 2),
                       decode_ratio=round(ours / theirs, 4))
        row.update(threads=s.threads, decode_tokens=s.decode_tokens)
    row["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return row


def speed_only(paths: list[Path], s: Settings) -> None:
    """Decode tokens/s of each file, all taking turns, each against the last (the reference)."""
    from llama_cpp import Llama

    text = read_text(DATA / "test.txt")[:2000].encode()
    prompt = Llama(model_path=str(paths[-1]), vocab_only=True, verbose=False).tokenize(
        text, add_bos=False, special=False)[:32]
    tps = decode_speed(paths, prompt, s)
    for p, t in zip(paths, tps):
        row = {"file": str(p), "reference": str(paths[-1]), "decode_tps": round(t, 2),
               "ratio": round(t / tps[-1], 4), "threads": s.threads, "decode_tokens": s.decode_tokens,
               "reps": s.decode_reps, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        append_row(SPEED_RESULTS, row)
        print(f"{p.name}: {t:.1f} tok/s (x{t / tps[-1]:.3f})")


# ---- results ----------------------------------------------------------------------------------

def _key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def table(rows: list[dict]) -> str:
    """Markdown: one line per row, Δppl against llamacpp-imatrix of the same model/preset/settings."""
    order = {m: i for i, m in enumerate((*METHODS, *ABLATIONS, "float"))}
    presets = {p: i for i, p in enumerate((*ALL_PRESETS, "F32"))}
    rows = sorted(rows, key=lambda r: (r["model"], r["nsamples"], r["windows"],
                                       presets.get(r["preset"], 99), order.get(r["method"], 99)))
    imat = {(r["model"], r["preset"], r["nsamples"], r["seqlen"], r["windows"], r["ctx"]): r["ppl"]
            for r in rows if r["method"] == "llamacpp-imatrix"}
    out = ["| model | type | method | MiB | bpw | ppl | windows | vs imatrix | decode tok/s (vs llamacpp) | calib |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = imat.get((r["model"], r["preset"], r["nsamples"], r["seqlen"], r["windows"], r["ctx"]))
        delta = f"{100 * (r['ppl'] / ref - 1):+.1f}%" if ref and r["method"] != "llamacpp-imatrix" else ""
        speed = f"{r['decode_tps']:.1f}" if "decode_tps" in r else "-"
        if "decode_ratio" in r:
            speed += f" (×{r['decode_ratio']:.3f})"
        calib = "-" if r["method"] in ("llamacpp", "float") else f"{r['nsamples']}×{r['seqlen']}"
        out.append(f"| {r['model']} | {r['preset']} | {r['method']} | {r['file_bytes'] / 2**20:.1f} | "
                   f"{r['bpw']:.3f} | {r['ppl']:.3f} | {r['windows']} | {delta} | {speed} | {calib} |")
    if rows:
        out.append(f"\nppl: llama.cpp, the first `windows` windows of {rows[0]['ctx']} tokens of wikitext-2 "
                   "test; bpw: all tensor bytes over the unpadded model's parameters.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=ALL_PRESETS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, *ABLATIONS])
    ap.add_argument("--float", action="store_true", help="also the float (F32) file per model")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows of --seqlen tokens")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=100, help="perplexity windows of --ctx tokens")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (perplexity and decode)")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--decode-reps", type=int, default=5)
    ap.add_argument("--device", default="auto", help="calibration device: auto | cpu | cuda")
    ap.add_argument("--no-verify", action="store_true", help="skip decoding each file's weights")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true", help="print the results as markdown and exit")
    ap.add_argument("--speed", nargs="+", type=Path, metavar="GGUF",
                    help="only decode tokens/s of these files against the last one, taking turns "
                         "(for an idle machine); appended to results/gguf_speed.jsonl")
    a = ap.parse_args(argv)
    if a.table:
        print(table(read_rows(a.results)))
        return
    s = Settings(a.nsamples, a.seqlen, a.windows, a.ctx, a.threads, a.decode_tokens, a.decode_reps,
                 a.device, not a.no_verify, a.out_dir)
    if a.speed:
        speed_only(a.speed, s)
        return
    s.out_dir.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in read_rows(a.results)}
    test_text = read_text(DATA / "test.txt")
    jobs = [(p, m) for p in a.presets for m in a.methods] + ([("F32", "float")] if a.float else [])
    for model in a.models:
        todo = [(p, m) for p, m in jobs
                if (model, p, m, s.nsamples, s.seqlen, s.windows, s.ctx) not in done]
        if not todo:
            continue
        base = load_source(model)
        for preset, method in todo:
            torch.manual_seed(0)
            row = run_row(base, model, preset, method, s, test_text)
            append_row(a.results, row)


if __name__ == "__main__":
    main()
