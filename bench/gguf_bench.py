"""GGUF files of llama.cpp's quantizer vs ours, scored by llama.cpp under the domain protocol.

For each model (SmolLM2-135M, its 256-aligned padded twin ``smollm2-135m-pad768``, DESIGN.md §6),
preset (Q2_K, Q3_K_S, Q3_K_M, Q4_K_M), calibration (bench/protocol.py: wiki, self, mix) and method:

  llamacpp          llama.cpp's quantizer (ggml_quantize_chunk, what llama-quantize calls)
  llamacpp-imatrix  the same with an importance matrix from the calibration tokens (llama-imatrix)
  gptq              our GPTQ (act order, the default) onto the preset's native GGML grids
  d2quant           D²Quant (DSQ in dual-scale form + DAC) onto the same grids, as `d2export gguf`
  METHOD+KEY=VALUE  a lever: METHOD with QuantConfig fields changed, e.g. gptq+shrink=0.5,
                    d2quant+dac=False, gptq+damp=0.1 (several: d2quant+dac=False+shrink=0.25)

every file is written by the same ``write_gguf`` and measured the same way: file size, bits per
weight over the *real* parameters (the unpadded model's, so padding zeros cost bits rather than
diluting them), and on every eval set of the protocol (wikitext-2 test, and the out-of-domain
corpora gutenberg and pydocs) llama.cpp's perplexity and its KL divergence from the float model's
F32 file in llama.cpp, on the token ids torch scores (no BOS). The importance matrix and our
calibration read the same tokens. ``--decode`` adds greedy decode tokens/s against the llamacpp
file of the same preset (a loaded machine makes that number noise: use --speed on an idle one).

One JSON line per result is appended to --results; rows already there (same key) are skipped, so an
interrupted run resumes. Files stay in --out-dir.

    python bench/gguf_bench.py --models smollm2-135m-pad768 --presets Q2_K --calib wiki \
        --methods llamacpp-imatrix gptq d2quant gptq+shrink=0.5
    python bench/gguf_bench.py --table                           # markdown tables of the results
    python bench/gguf_bench.py --speed OURS.gguf THEIRS.gguf --threads 2 --decode-reps 5  # idle machine
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import time
import warnings
from collections import Counter
from pathlib import Path

import gguf
import torch

import protocol  # bench/ is on sys.path when run as a script
from resultlog import append_row, read_rows
from converters.gguf import PRESETS as ALL_PRESETS
from converters.gguf import GGUFTarget, file_bits_per_weight, write_gguf
from d2quant.data import generator_id, read_text, wikitext_dir
from d2quant.errors import D2Error
from d2quant.padding import param_count
from d2quant.pipeline import QuantConfig, quantize
from d2quant.qmodel import QuantizedModel
from d2quant.sources import Source, load_source
from runtime_tests.llamacpp import LlamaCppDecoder, verify_weights
from runtime_tests.llamacpp_quant import collect_importance, quantize_with_libggml

ROOT = Path(__file__).resolve().parents[1]
DATA = wikitext_dir()
RESULTS = ROOT / "bench" / "results" / "gguf_domains.jsonl"  # gguf.jsonl: the in-domain rows before
SPEED_RESULTS = ROOT / "bench" / "results" / "gguf_speed.jsonl"
OUT_DIR = ROOT / "out" / "gguf_bench"

MODELS = ("smollm2-135m", "smollm2-135m-pad768")
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M")
METHODS = ("llamacpp", "llamacpp-imatrix", "gptq", "d2quant")
REFERENCE = "llamacpp"  # the file decode speed is compared against
KEY = ("model", "preset", "method", "calib", "nsamples", "seqlen", "windows", "ctx")
_LEVERS = {f.name: f.type for f in dataclasses.fields(QuantConfig)
           if f.name in ("dsq", "dac", "act_order", "damp", "shrink", "shrink_down", "rotate", "dsq_form",
                         "objective", "scale_fit", "forward_dtype")}


def method_config(method: str) -> tuple[str, dict]:
    """``gptq+shrink=0.5+dac=False`` -> ("gptq", {"shrink": 0.5, "dac": False})."""
    base, *levers = method.split("+")
    if base not in METHODS:
        raise D2Error(f"unknown method {base!r}; known: {', '.join(METHODS)}")
    overrides = {}
    for lever in levers:
        key, _, value = lever.partition("=")
        kind = _LEVERS.get(key)
        if kind is None or not value:
            raise D2Error(f"lever {lever!r}: use KEY=VALUE with KEY one of {', '.join(_LEVERS)}")
        overrides[key] = value == "True" if kind in (bool, "bool") else \
            float(value) if kind in (float, "float", "float | None") else value
    if overrides and base.startswith("llamacpp"):
        raise D2Error(f"{method}: levers apply to our methods, not to llama.cpp's quantizer")
    return base, overrides


@dataclasses.dataclass
class Settings:
    calib: str
    nsamples: int
    seqlen: int
    windows: int
    ctx: int
    threads: int
    decode_tokens: int
    decode_reps: int
    device: str
    verify: bool
    decode: bool
    out_dir: Path


# ---- quantized models -------------------------------------------------------------------------

def file_stem(model: str) -> str:
    """The model's part of a file name in --out-dir: its alias, or a directory's name with a hash of
    its path (a path of its own would put the file beside the model)."""
    if "/" not in model and "\\" not in model:
        return model
    where = Path(model).resolve()
    return f"{where.name}-{hashlib.sha1(str(where).encode()).hexdigest()[:8]}"


def _calib_tokens(model: str, src: Source, s: Settings) -> torch.Tensor:
    base = lambda: (lambda b: (b.model, b.tokenizer))(load_source(protocol._base_name(model)))  # noqa: E731
    return protocol.calib_tokens(s.calib, model, src.model, src.tokenizer, s.nsamples, s.seqlen, base)


def make_model(base: Source, model: str, preset: str, method: str, s: Settings,
               target: GGUFTarget | None = None) -> QuantizedModel:
    """``method``'s quantized model of a fresh copy of ``base`` (calibration edits its model), onto
    ``preset``'s types or, for our methods, onto those of ``target`` (bench/frontier.py's recipes)."""
    src = dataclasses.replace(base, model=copy.deepcopy(base.model), spec=copy.deepcopy(base.spec))
    if method == "float":
        return QuantizedModel.unquantized(src)
    if method == "llamacpp":
        return quantize_with_libggml(src, preset, None)
    tokens = _calib_tokens(model, src, s)
    if method == "llamacpp-imatrix":
        return quantize_with_libggml(src, preset, collect_importance(src, tokens))
    name, levers = method_config(method)  # what `d2export gguf` runs, through the same target
    cfg = (target or GGUFTarget(preset)).quant_config(QuantConfig(method=name, device=s.device, **levers), src, tokens)
    n_layers = src.spec.layers
    return quantize(src, tokens, cfg, on_layer=lambda i, stats: print(  # a 1.5B model runs for an hour
        f"  {preset} {method}: layer {i + 1}/{n_layers} in {stats['seconds']:.0f} s", flush=True))


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


def float_file(base: Source, model: str, s: Settings) -> Path:
    """The float model as an F32 GGUF: the KL divergence reference, in the same runtime."""
    path = s.out_dir / f"{file_stem(model)}-F32-float.gguf"
    if not path.exists():
        write(QuantizedModel.unquantized(base), path, None)
    return path


def eval_sets(base: Source, model: str, s: Settings) -> list[protocol.EvalSet]:
    ref = float_file(base, model, s)
    return protocol.eval_sets(model, base.tokenizer, base.spec.vocab, s.windows, s.ctx, "llamacpp",
                              lambda: LlamaCppDecoder(ref, n_ctx=s.ctx, n_threads=s.threads))


def real_params(base: Source) -> int:
    """The parameters bpw is counted over: the unpadded model's (padding zeros cost bits)."""
    return base.info.get("real_params") or param_count(base.model)


def row_path(model: str, preset: str, method: str, s: Settings) -> Path:
    return s.out_dir / f"{file_stem(model)}-{preset}-{method}-{s.calib}{s.nsamples}x{s.seqlen}.gguf"


def run_row(base: Source, model: str, preset: str, method: str, s: Settings,
            sets: list[protocol.EvalSet], target: GGUFTarget | None = None) -> dict:
    """One scored file. ``target``: types other than a preset's (``preset`` then only labels it)."""
    t0 = time.time()
    qm = make_model(base, model, preset, method, s, target)
    quant_seconds = time.time() - t0
    path = row_path(model, preset, method, s)
    dropped = write(qm, path, None if method == "float" or target else preset)
    real = real_params(base)
    row = {"model": model, "preset": preset, "method": method, "calib": s.calib,
           "nsamples": s.nsamples, "seqlen": s.seqlen, "windows": s.windows, "ctx": s.ctx,
           "file": str(path), "file_bytes": path.stat().st_size, "real_params": real,
           "bpw": round(file_bits_per_weight(path, real), 4),
           "bpw_file_elements": round(file_bits_per_weight(path), 4), "types": _types(path),
           "quant_seconds": round(quant_seconds, 1), "warnings": dropped}
    if generator := _generator(s.calib):
        row["generator"] = generator
    if "shrink" in qm.recipe:  # the effective calibration settings (defaults included)
        row["config"] = {k: v for k, v in qm.recipe.items() if k not in ("grids", "calibration")}
    if "seconds" in qm.report:
        row["calib_report"] = {k: qm.report[k] for k in ("seconds", "peak_mem_mb", "peak_mem_of", "start_mem_mb", "final_dac_shift")
                               if k in qm.report}
    if s.verify:
        w = verify_weights(path, qm)
        row["weights_verified"] = {"pass": w["pass"], "exact": w["exact"], "n_tensors": w["n_tensors"],
                                   "float32_rounding": len(w["float32_rounding"])}
    del qm

    dec = LlamaCppDecoder(path, n_ctx=s.ctx, n_threads=s.threads)
    try:
        t0 = time.time()
        row["scores"] = protocol.score(dec, sets)
        row["score_seconds"] = round(time.time() - t0, 1)
    finally:
        dec.close()

    if s.decode and method != "float":
        prompt = sets[0].windows[0][:32]
        ref = s.out_dir / f"{file_stem(model)}-{preset}-{REFERENCE}.gguf"
        if method == REFERENCE:
            row["decode_tps"] = round(decode_speed([path], prompt, s)[0], 2)
        else:
            if not ref.exists():  # cheap: no calibration
                write(make_model(base, model, preset, REFERENCE, s), ref, preset)
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

def _generator(calib: str) -> str | None:
    """Which generator writes a generated calibration's text here: rows calibrated on another
    generator's text (another dtype or kernel, another machine) are other rows, never skipped as
    done nor paired with this text's llama.cpp + imatrix row."""
    return generator_id(torch.device("cpu")) if calib in protocol.GENERATED_CALIBRATIONS else None


def _key(row: dict) -> tuple:
    return (*(row[k] for k in KEY), row.get("generator"))


def key_for(model: str, preset: str, method: str, s: Settings) -> tuple:
    """The key of the row that run_row would make here."""
    return _key({"model": model, "preset": preset, "method": method, **{k: getattr(s, k) for k in KEY[3:]},
                 "generator": _generator(s.calib)})


def table(rows: list[dict]) -> str:
    """Markdown: per calibration, perplexity and KLD on every eval set, each ppl also as a ratio to
    llamacpp-imatrix of the same model, preset, calibration and settings."""
    presets = {p: i for i, p in enumerate((*ALL_PRESETS, "F32"))}
    order = lambda m: (METHODS.index(method_config(m)[0]) if m != "float" else 9, m)  # noqa: E731
    rows = sorted(rows, key=lambda r: (r["model"], r["calib"], r["nsamples"], r["windows"],
                                       presets.get(r["preset"], 99), order(r["method"])))
    group = lambda r: (r["model"], r["preset"], r["calib"], r["nsamples"], r["seqlen"], r["windows"], r["ctx"],  # noqa: E731
                       r.get("generator"))
    imat = {group(r): r["scores"] for r in rows if r["method"] == "llamacpp-imatrix"}
    sets = list(protocol.EVAL_SETS)
    out = [f"| model | type | calib | method | MiB | bpw | {' | '.join(f'{n} ppl (×imx)' for n in sets)} | "
           f"{' | '.join(f'{n} KLD mean / p99 / top-1' for n in sets)} |",
           "|---|---|---|---|---|---|" + "---|" * (2 * len(sets))]
    for r in rows:
        ref = imat.get(group(r))
        cells = []
        for n in sets:
            sc = r["scores"].get(n)
            if sc is None:
                cells.append("-")
                continue
            ratio = f" (×{sc['ppl'] / ref[n]['ppl']:.3f})" if ref and n in ref and r["method"] != "llamacpp-imatrix" else ""
            cells.append(f"{sc['ppl']:.2f}{ratio}")
        kl = [f"{r['scores'][n]['mean_kl']:.4f} / {r['scores'][n]['p99_kl']:.3f} / {100 * r['scores'][n]['top1']:.1f}%"
              if n in r["scores"] else "-" for n in sets]
        calib = "-" if r["method"] in ("llamacpp", "float") else f"{r['calib']} {r['nsamples']}×{r['seqlen']}" + (
            f" (gen {r['generator']})" if "generator" in r else "")
        out.append(f"| {r['model']} | {r['preset']} | {calib} | {r['method']} | {r['file_bytes'] / 2**20:.1f} | "
                   f"{r['bpw']:.3f} | {' | '.join(cells)} | {' | '.join(kl)} |")
    if rows:
        out.append(f"\nllama.cpp perplexity and KL divergence from the F32 file in llama.cpp over {rows[0]['windows']} "
                   f"windows of {rows[0]['ctx']} tokens per set (wiki-test: the first ones; the corpora: "
                   "spread over the text); domains: wiki calibration scored on wiki-test is in-domain, on "
                   "gutenberg/pydocs out-of-domain; self/mix calibration is cross. bpw: all tensor bytes "
                   "over the unpadded model's parameters.")
    return "\n".join(out)


def default_method(method: str) -> str | None:
    """The bare method a label names when its levers are all today's defaults (``gptq+shrink=0.5``
    is ``gptq`` since shrink 0.5 became the default), else None: a lever row, not a preset curve."""
    base, overrides = method_config(method)
    defaults = {f.name: f.default for f in dataclasses.fields(QuantConfig)}
    return base if all(defaults.get(k) == v for k, v in overrides.items()) else None


CURVE_LABELS = {"llamacpp": "llama.cpp, no imatrix", "llamacpp-imatrix": "llama.cpp + imatrix",
                "gptq": "GPTQ (ours)", "d2quant": "D²Quant (ours)"}


def plot(rows: list[dict], path: Path, eval_set: str, calib: str, nsamples: int, seqlen: int) -> None:
    """Perplexity on ``eval_set`` against file size, one line per method at its default settings
    across the presets, for one calibration: the curve a user reads to choose a file (matplotlib,
    from the bench extra). Lever rows are left to the table; of repeated rows the newest counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for model in sorted({r["model"] for r in rows}):
        series: dict[str, dict[str, tuple[float, float]]] = {}
        for r in rows:
            if (r["model"], r["calib"], r["nsamples"], r["seqlen"]) != (model, calib, nsamples, seqlen) \
                    or eval_set not in r["scores"] or r["method"] == "float":
                continue
            method = default_method(r["method"])
            if method is not None:
                series.setdefault(method, {})[r["preset"]] = (r["file_bytes"] / 2**20, r["scores"][eval_set]["ppl"])
        for method in sorted(series, key=METHODS.index):
            pts = sorted((x, y, preset) for preset, (x, y) in series[method].items())
            if len(pts) < 2:
                continue
            label = CURVE_LABELS.get(method, method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{label}, {model}")
            for x, y, preset in pts:  # every method's files of a preset have about one size: name them once
                if method == "llamacpp-imatrix" or preset not in series.get("llamacpp-imatrix", {}):
                    ax.annotate(preset, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_title(f"calibration: {calib} {nsamples}×{seqlen} tokens (the same for every method)", fontsize=9)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel(f"llama.cpp perplexity, {eval_set}")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=ALL_PRESETS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help="llamacpp | llamacpp-imatrix | gptq | d2quant, optionally +KEY=VALUE levers")
    ap.add_argument("--calib", default="wiki", choices=protocol.CALIBRATIONS)
    ap.add_argument("--float", action="store_true", help="also score the float (F32) file per model")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows of --seqlen tokens")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40, help="windows of --ctx tokens per eval set")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (perplexity and decode)")
    ap.add_argument("--decode", action="store_true", help="also greedy decode tokens/s per row")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--decode-reps", type=int, default=5)
    ap.add_argument("--device", default="auto", help="calibration device: auto | cpu | cuda")
    ap.add_argument("--no-verify", action="store_true", help="skip decoding each file's weights")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--files-only", action="store_true",
                    help="write the missing files (for bench/tensor_swap.py) without scoring or a results row")
    ap.add_argument("--table", action="store_true", help="print the results as markdown and exit")
    ap.add_argument("--plot", type=Path, metavar="PNG", help="write perplexity against file size and exit")
    ap.add_argument("--plot-set", default="wiki-test", choices=protocol.EVAL_SETS)
    ap.add_argument("--speed", nargs="+", type=Path, metavar="GGUF",
                    help="only decode tokens/s of these files against the last one, taking turns "
                         "(for an idle machine); appended to results/gguf_speed.jsonl")
    a = ap.parse_args(argv)
    if a.table:
        print(table(read_rows(a.results)))
        return
    if a.plot:
        plot([r for r in read_rows(a.results) if r["model"] in a.models], a.plot, a.plot_set,
             a.calib, a.nsamples, a.seqlen)
        return
    for m in a.methods:
        method_config(m)  # refuse a bad lever before hours of work
    s = Settings(a.calib, a.nsamples, a.seqlen, a.windows, a.ctx, a.threads, a.decode_tokens,
                 a.decode_reps, a.device, not a.no_verify, a.decode, a.out_dir)
    if a.speed:
        speed_only(a.speed, s)
        return
    s.out_dir.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in read_rows(a.results)}
    jobs = [(p, m) for p in a.presets for m in a.methods] + ([("F32", "float")] if a.float else [])
    for model in a.models:
        if a.files_only:
            base = load_source(model)
            for preset, method in jobs:
                path = row_path(model, preset, method, s)
                if not path.exists():
                    torch.manual_seed(0)
                    write(make_model(base, model, preset, method, s), path, None if method == "float" else preset)
            continue
        todo = [(p, m) for p, m in jobs if key_for(model, p, m, s) not in done]
        if not todo:
            continue
        base = load_source(model)
        sets = eval_sets(base, model, s)
        for preset, method in todo:
            torch.manual_seed(0)
            append_row(a.results, run_row(base, model, preset, method, s, sets))


if __name__ == "__main__":
    main()
