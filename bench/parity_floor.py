"""How far llama.cpp's arithmetic moves a model's logits: llama.cpp's own quantization of a source
(or the float model as F32) written by our GGUF writer and checked by ``verify_gguf``, which prints
llama.cpp vs float torch, torch with llama.cpp's 8-bit activation rounding vs float torch, and
llama.cpp vs that emulation, and the emulation vs itself with the embeddings nudged by one ulp
(4 windows x 128 tokens of wikitext-2 test).

    python bench/parity_floor.py smollm2-135m F32 Q8_0 Q3_K_M
    python bench/parity_floor.py smollm2-135m-pad768 Q3_K_S
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from converters.gguf import write_gguf
from d2quant.data import read_text, wikitext_dir
from d2quant.qmodel import QuantizedModel
from d2quant.sources import load_source
from runtime_tests.llamacpp import verify_gguf
from runtime_tests.llamacpp_quant import quantize_with_libggml

OUT = Path(__file__).resolve().parents[1] / "out" / "parity_floor"
SECTIONS = ("logits", "activation_rounding", "vs_emulated", "rounding_chaos")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("types", nargs="+", help="F32 (the float model) or a preset for llama.cpp's quantizer")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    text = read_text(wikitext_dir() / "test.txt")
    for t in a.types:
        src = load_source(a.model)
        qm = QuantizedModel.unquantized(src) if t == "F32" else quantize_with_libggml(src, t, None)
        path = OUT / f"{a.model}-{t}-llamacpp.gguf"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_gguf(qm, path, force=True, preset=None if t == "F32" else t)
        res = verify_gguf(path, qm, text=text, n_threads=1)
        print(json.dumps({"model": a.model, "type": t, "pass": res["pass"],
                          **{s: {k: round(res[s][k], 5) for k in ("mean_kl", "max_kl", "ppl_ratio")}
                             for s in SECTIONS}}), flush=True)


if __name__ == "__main__":
    main()
