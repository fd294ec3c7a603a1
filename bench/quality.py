"""Torch perplexity and KLD of RTN / GPTQ / D²Quant and its ablations on SmolLM2-135M (uniform grids).

Each run calibrates with the library (the same code `d2export quantize` runs) on a calibration of
the domain protocol (bench/protocol.py: wiki, self, chat, mix), is scored in torch on every eval
set of the protocol (wikitext-2 test and the out-of-domain corpora: perplexity, and KL divergence
from the float model), and appends one JSON line to the results file, so an interrupted benchmark
resumes where it stopped. `--table` prints the markdown table.

    python bench/quality.py --nsamples 32 --calib wiki --runs w3-rtn w3-gptq w3-d2q ...
    python bench/quality.py --table
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import protocol  # bench/ is on sys.path when run as a script
from resultlog import append_row, read_rows
from d2quant.evaluate import TorchBackend
from d2quant.pipeline import QuantConfig, quantize
from d2quant.sources import load_source

RESULTS = Path(__file__).resolve().parent / "results" / "quality_domains.jsonl"  # quality.jsonl: before

# name -> QuantConfig overrides (act order, the default, throughout; quality.jsonl holds the
# natural-order rows of before the protocol)
RUNS = {
    "fp": None,
    **{f"w{b}-{tag}": dict(bits=b, **kw)
       for b in (3, 2)
       for tag, kw in [
           ("rtn", dict(method="rtn")),
           ("gptq", dict(method="gptq")),
           ("gptq-shrink0.5", dict(method="gptq", shrink=0.5)),
           ("d2q", dict(method="d2quant")),
           ("d2q-nodsq", dict(method="d2quant", dsq=False)),
           ("d2q-nodac", dict(method="d2quant", dac=False)),
           ("d2q-dual", dict(method="d2quant", dsq_form="dual")),
           ("d2q-rot", dict(method="d2quant", rotate=True)),
           ("gptq-rot", dict(method="gptq", rotate=True)),
       ]},
}


def run(name: str, calib: str, nsamples: int, seqlen: int, windows: int, device: str) -> dict:
    src = load_source(None)
    fp = load_source(None)
    sets = protocol.eval_sets("smollm2-135m", fp.tokenizer, fp.spec.vocab, windows, 512, "torch",
                              lambda: TorchBackend(fp.model, fp.tokenizer))
    rec: dict = {"run": name, "calib": calib, "nsamples": nsamples, "seqlen": seqlen, "windows": windows}
    if RUNS[name] is None:
        model, tok = src.model, src.tokenizer
    else:
        overrides = RUNS[name]
        cfg = QuantConfig(group_size=64, device=device, **overrides)
        t0 = time.time()
        tokens = None if cfg.method == "rtn" else protocol.calib_tokens(
            calib, "smollm2-135m", src.model, src.tokenizer, nsamples, seqlen)
        qm = quantize(src, tokens, cfg)
        rec.update(calib_seconds=round(time.time() - t0, 1), peak_mem_mb=qm.report["peak_mem_mb"],
                   config=overrides)
        model, tok = qm.to_torch(), qm.tokenizer
    rec["scores"] = protocol.score(TorchBackend(model, tok, device if device != "auto" else "cpu"), sets)
    return rec


def table() -> str:
    rows = read_rows(RESULTS)
    sets = protocol.EVAL_SETS
    out = [f"| run | bits | method and switches | calibration | {' | '.join(f'{n} ppl / KLD' for n in sets)} | calib s |",
           "|---|---|---|---|" + "---|" * len(sets) + "---|"]
    for r in rows:
        cfg = dict(r.get("config", {}))
        bits = cfg.pop("bits", "fp32")
        method = cfg.pop("method", "float")
        switches = " ".join(f"{k}={v}" for k, v in cfg.items())
        calib = "-" if method in ("float", "rtn") else f"{r['calib']} {r['nsamples']}×{r['seqlen']}"
        cells = [f"{r['scores'][n]['ppl']:.2f} / {r['scores'][n]['mean_kl']:.4f}" for n in sets]
        out.append(f"| {r['run']} | {bits} | {method} {switches} | {calib} | {' | '.join(cells)} | "
                   f"{r.get('calib_seconds', '-')} |")
    if rows:
        out.append(f"\ntorch perplexity and KL divergence from the float model over {rows[0]['windows']} windows of "
                   "512 tokens per eval set (bench/protocol.py).")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="*", default=list(RUNS))
    ap.add_argument("--calib", default="wiki", choices=protocol.CALIBRATIONS)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args()
    if a.table:
        print(table())
        return
    done = {(r["run"], r["calib"], r["nsamples"], r["windows"]) for r in read_rows(RESULTS)}
    for name in a.runs:
        if (name, a.calib, a.nsamples, a.windows) in done:
            continue
        torch.manual_seed(0)
        append_row(RESULTS, run(name, a.calib, a.nsamples, a.seqlen, a.windows, a.device))


if __name__ == "__main__":
    main()
