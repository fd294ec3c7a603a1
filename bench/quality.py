"""Issue-2 benchmark: torch perplexity of RTN / GPTQ / D²Quant and its ablations on SmolLM2-135M.

Each run calibrates with the library (the same code `d2export quantize` runs), evaluates on the first
N windows of 512 tokens of wikitext-2 test, and appends one JSON line to the results file, so an
interrupted benchmark resumes where it stopped. `--table` prints the markdown table.

    python bench/quality.py --nsamples 32 --runs w3-rtn w3-gptq w3-d2q ...
    python bench/quality.py --table
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from resultlog import append_row, read_rows  # bench/ is on sys.path when run as a script
from d2quant.data import CalibConfig, calibration_tokens, read_text, wikitext_dir
from d2quant.evaluate import TorchBackend, perplexity
from d2quant.pipeline import QuantConfig, quantize
from d2quant.sources import load_source

DATA = wikitext_dir()
RESULTS = Path(__file__).resolve().parent / "results" / "quality.jsonl"

# name -> (QuantConfig overrides, calibration source). The first set ran before GPTQ's act order
# existed, so it names natural column order; "-ao" runs use act order (now the default).
RUNS = {
    "fp": None,
    **{f"w{b}-{tag}": (dict(bits=b, **kw), calib)
       for b in (3, 2)
       for tag, kw, calib in [
           ("rtn", dict(method="rtn"), "valid"),
           ("gptq", dict(method="gptq", act_order=False), "valid"),
           ("d2q", dict(method="d2quant", act_order=False), "valid"),
           ("d2q-nodsq", dict(method="d2quant", dsq=False, act_order=False), "valid"),
           ("d2q-nodac", dict(method="d2quant", dac=False, act_order=False), "valid"),
           ("d2q-dual", dict(method="d2quant", dsq_form="dual", act_order=False), "valid"),
           ("d2q-rot", dict(method="d2quant", rotate=True, act_order=False), "valid"),
           ("gptq-rot", dict(method="gptq", rotate=True, act_order=False), "valid"),
           ("d2q-self", dict(method="d2quant", act_order=False), "self"),
           ("gptq-ao", dict(method="gptq", act_order=True), "valid"),
           ("d2q-ao", dict(method="d2quant", act_order=True), "valid"),
       ]},
}


def run(name: str, nsamples: int, seqlen: int, windows: int, device: str) -> dict:
    src = load_source(None)
    test = read_text(DATA / "test.txt")
    rec: dict = {"run": name, "nsamples": nsamples, "seqlen": seqlen, "windows": windows}
    if RUNS[name] is None:
        model, tok = src.model, src.tokenizer
    else:
        overrides, calib = RUNS[name]
        cfg = QuantConfig(group_size=64, device=device, **overrides)
        ccfg = CalibConfig(calib=str(DATA / "valid.txt") if calib == "valid" else "self",
                           nsamples=nsamples, seqlen=seqlen, seed=0)
        t0 = time.time()
        tokens = None if cfg.method == "rtn" else calibration_tokens(ccfg, src.model, src.tokenizer,
                                                                     cfg.torch_device())
        qm = quantize(src, tokens, cfg)
        rec.update(calib_seconds=round(time.time() - t0, 1), peak_mem_mb=qm.report["peak_mem_mb"],
                   config=overrides, calib=calib)
        model, tok = qm.to_torch(), qm.tokenizer
    res = perplexity(TorchBackend(model, tok, device if device != "auto" else "cpu"), test, 512, windows)
    rec.update(ppl=round(res.ppl, 3), tokens=res.tokens)
    return rec


def table() -> str:
    rows = read_rows(RESULTS)
    out = ["| run | bits | method and switches | calibration | ppl (torch) | windows×512 | calib s | peak MiB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = dict(r.get("config", {}))
        bits = cfg.pop("bits", "fp32")
        method = cfg.pop("method", "float")
        switches = " ".join(f"{k}={v}" for k, v in cfg.items())
        calib = f"{r.get('calib', '-')} {r['nsamples']}×{r['seqlen']}" if "calib" in r else "-"
        out.append(f"| {r['run']} | {bits} | {method} {switches} | {calib} | {r['ppl']:.2f} | "
                   f"{r['windows']} | {r.get('calib_seconds', '-')} | {r.get('peak_mem_mb', '-')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="*", default=list(RUNS))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args()
    if a.table:
        print(table())
        return
    done = {r["run"] for r in read_rows(RESULTS)}
    for name in a.runs:
        if name in done:
            continue
        torch.manual_seed(0)
        append_row(RESULTS, run(name, a.nsamples, a.seqlen, a.windows, a.device))


if __name__ == "__main__":
    main()
