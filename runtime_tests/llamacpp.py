"""Runtime parity of an exported GGUF in stock llama.cpp (through llama-cpp-python).

Two proofs, kept apart because they prove different things:

* weights: every tensor decoded from the file with gguf-py's ``dequantize`` (q/k rows un-permuted)
  must equal the quantized model's weight bit for bit. This is the claim that the file *is* the
  calibrated model; it does not depend on llama.cpp's arithmetic.
* logits: llama.cpp's forward pass vs the torch model built from the same quantized weights, on
  a few token windows. llama.cpp never matches bit for bit (see the thresholds below), so this
  checks agreement in distribution, twice: against float torch within what llama.cpp's 8-bit
  activation rounding does to this model, and against torch *with* that rounding within what a
  one-ulp nudge does to it. It catches what the weight check cannot see (architecture metadata,
  RoPE layout, biases, norms, tokenizer-independent graph wiring).

Run as a user: ``python -m runtime_tests.llamacpp OUT.gguf CHECKPOINT_DIR [--text FILE] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import gguf
import numpy as np
import torch

from converters.gguf.arch import rope_heads, rope_permutation
from converters.gguf.writer import GGUFPlan, float_values, plan_gguf
from d2quant.errors import D2Error
from d2quant.qmodel import QuantizedModel
from runtime_tests.ggml_activations import emulate_llamacpp, nudge_embeddings
from runtime_tests.isolation import Worker
from runtime_tests.llamacpp_build import NATIVE, RUNTIME
from runtime_tests.parity import TOP1_MARGIN, compare_logits, parity_windows, torch_logits

# ---- logit thresholds -------------------------------------------------------------------------
# llama.cpp never matches float arithmetic: its CPU matmuls round the activation operand to 8 bits
# first (Q8_K blocks of 256 for K-quant weights, Q8_0/Q8_1 blocks of 32 for the others) and the KV
# cache is fp16. How much that moves the logits depends on the model, not on the file: measured on
# 4 x 128 tokens of wikitext-2, llama.cpp vs float torch on the *same* weights gave mean KL 1e-6
# for an F32 file of SmolLM2-135M, 3.6e-3 for llama.cpp's own Q8_0 file, 6.3e-3 for its Q3_K_M,
# 0.046 (max 10.8 nats at one position) for its Q3_K_S of the 256-aligned padded SmolLM2, and
# 0.0187 (max 5.9) for the README's D²Quant Q3_K_M. A fixed bound cannot serve all of these, so the
# bound is set per model from the torch model rounding its activations the way llama.cpp does
# (runtime_tests/ggml_activations.py, equal to libggml's Q8_0 rounding bit for bit): that alone
# moves it by 0.0034, 0.0064, 0.045 and 0.0215 in the last four cases, the same order as llama.cpp
# (ratios 0.87-1.04; bench/parity_floor.py). The emulation is not llama.cpp's arithmetic to the
# last bit, and 8-bit rounding turns last-bit differences into code flips that propagate, so
# llama.cpp vs the emulation (``vs_emulated``) is itself bounded by the same rule against that
# chaos: the emulation against itself with the embeddings nudged by one ulp (``rounding_chaos``;
# 0.0043 vs 0.0048, 0.0067 vs 0.0066, 0.029 vs 0.033 on llama.cpp's own Q8_0, Q3_K_M and padded
# Q3_K_S files, 0.0063 vs 0.0066 for the README job; ggml_activations.py says where the last bits
# differ).
# Wiring errors sit far above the scale: on a tiny random llama whose rounding effect is ~1e-5,
# q/k rows left unpermuted give 0.10 and the DAC ffn biases left out 0.011. Small weight errors can
# hide under the noise of a real model, which is why the weight check (exact decode, no tensor
# missing) is the proof of the weights and this one the proof of the graph.
KL_FACTOR = 2.0  # llama.cpp's mean KL from float <= KL_FACTOR x the rounding's own + KL_SLACK
KL_SLACK = 1e-3
PPL_SLACK = 0.02  # |ln(ppl ratio)| <= PPL_SLACK + KL_FACTOR x |ln(the rounding's ppl ratio)|
# Top-1 agreement over all positions counts flips between near-tied logits, so the gate looks only
# at decisive positions (parity.TOP1_MARGIN): there a flip is a real disagreement; allowed as often
# as the rounding alone flips them, plus one percent.
TOP1_SLACK = 0.01
# Max |logit difference| is reported, not gated: it is set by the rare extreme token.
# Windows of 128 tokens the gates are decided on: on 4 (512 tokens) one sample of the README job's
# text put llama.cpp at 2.4x the emulation's chaos on an AVX2-only CPU and failed it; on 16 the same
# file sits at 1.35x, as 2 048-4 096 random tokens do (BENCHMARKS.md).
PARITY_WINDOWS = 16
TOKENIZER_CHARS = 2000  # of the parity text, tokenized by the file and by the model's tokenizer

# Decoded weights may differ from the model's only by how the dequantization's float32 operations
# associate; anything beyond a few float32 ulps means the bytes encode different weights.
_ULP_RTOL = 4 * np.finfo(np.float32).eps


class LlamaCppDecoder:
    """A GGUF loaded in llama.cpp, returning logits for every position of a token window.

    llama.cpp runs in a worker process (runtime_tests.isolation): if it crashes (SIGILL from an
    AMX build, SIGSEGV on a corrupt file), this raises ``RuntimeCrash`` with the fix instead of
    taking the caller down.
    """

    name = "llamacpp"
    native = NATIVE  # the class the worker builds

    def __init__(self, path: str | Path, n_ctx: int = 512, n_threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise D2Error(f"GGUF file {self.path} does not exist")
        self._worker = Worker(self.native, str(self.path), n_ctx=n_ctx, n_threads=n_threads,
                              runtime=RUNTIME, label=str(self.path))
        self.n_ctx = n_ctx
        self.n_vocab = self._worker.info["n_vocab"]

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """No BOS by default, special-token strings parsed: the ids the torch backend scores."""
        return self._worker.call("tokenize", text, add_bos)

    def logits(self, ids: list[int]) -> np.ndarray:
        """[T, V] float32 logits at every position of ``ids`` (a fresh context each call)."""
        return self._worker.call("logits", list(ids))

    def complete(self, prompt: str, max_tokens: int, chat: bool = True):
        """Greedy text pieces through the file's chat template (or a raw continuation)."""
        yield from self._worker.stream("complete", prompt, max_tokens, chat)

    def close(self) -> None:
        self._worker.close()


# ---- weights ----------------------------------------------------------------------------------

def _expected_tensors(qm: QuantizedModel) -> tuple[dict[str, torch.Tensor], object]:
    """GGUF name -> the float32 values the file must decode to (transformers row order)."""
    plan = plan_gguf(qm)
    out = {}
    for gname, src in plan.sources.items():
        if src == "<generated>":
            continue
        out[gname] = qm.linears[src].weight().float() if src in qm.linears else float_values(qm, plan, gname)
    return out, plan


def verify_weights(path: str | Path, qm: QuantizedModel) -> dict:
    """Decode every tensor of the file and compare with the quantized model's values."""
    expected, plan = _expected_tensors(qm)
    try:
        reader = gguf.GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
    except Exception as e:  # gguf-py raises ValueError, KeyError, struct errors on bad bytes
        raise D2Error(f"{path} is not a readable GGUF file ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else 'truncated'}); re-export it") from None
    exact, rounding, mismatched = [], [], {}
    seen = set()
    for t in reader.tensors:
        if t.name not in expected:
            continue
        seen.add(t.name)
        got = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        want = expected[t.name].numpy()
        got = got.reshape(want.shape)
        role = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if plan.layout.permute_qk and role in ("attn_q", "attn_k"):
            un = np.empty_like(got)
            un[rope_permutation(got.shape[0], rope_heads(qm.spec, role))] = got
            got = un
        if np.array_equal(got, want):
            exact.append(t.name)
        elif np.allclose(got, want, rtol=_ULP_RTOL, atol=0):
            rounding.append(t.name)
        else:
            mismatched[t.name] = float(np.abs(got - want).max())
    missing = sorted(set(expected) - seen)
    return {"arch": arch, "n_tensors": len(expected), "exact": len(exact),
            "float32_rounding": rounding, "mismatched": mismatched, "missing": missing,
            "dropped": plan.dropped,
            "pass": not mismatched and not missing and arch == plan.layout.name}


# ---- logits -----------------------------------------------------------------------------------

def weight_types(plan: GGUFPlan, model: torch.nn.Module) -> dict[str, str]:
    """Module name -> GGML type of its weight in the file, for every matmul llama.cpp runs."""
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out = {}
    for gname, src in plan.sources.items():
        name = src.removesuffix(".weight")
        if gname.endswith(".weight") and name in linears:
            out[name] = plan.types[gname]
    if "lm_head" not in out:  # no output.weight: llama.cpp multiplies by token_embd
        out["lm_head"] = plan.types["token_embd.weight"]
    return out


def _within_rounding_noise(cpp: dict, rounding: dict) -> bool:
    """llama.cpp's departure from float torch against what 8-bit activation rounding alone does."""
    kl_ok = cpp["mean_kl"] <= KL_SLACK + KL_FACTOR * rounding["mean_kl"]
    ppl_ok = abs(math.log(cpp["ppl_ratio"])) <= PPL_SLACK + KL_FACTOR * abs(math.log(rounding["ppl_ratio"]))
    top1, floor = cpp["top1_decisive"], rounding["top1_decisive"]
    top1_ok = top1 is None or top1 >= (1.0 if floor is None else floor) - TOP1_SLACK
    return bool(kl_ok and ppl_ok and top1_ok)


def verify_gguf(path: str | Path, reference: QuantizedModel, *, text: str | None = None,
                n_windows: int = PARITY_WINDOWS, seq_len: int = 128, seed: int = 0,
                n_threads: int | None = None) -> dict:
    """Weight and logit parity of a GGUF against the quantized model it was written from.

    The logit reference is the torch model of what the file holds: tensors the writer had to drop
    (lm_head.bias under llama/qwen3) are removed from it, and what dropping them costs is reported
    separately under ``dropped_cost`` (the quantized model with vs without them, in torch).
    """
    weights = verify_weights(path, reference)
    dropped = set(weights["dropped"])
    held = reference.without(dropped)
    dec = LlamaCppDecoder(path, n_ctx=max(seq_len, 64), n_threads=n_threads)
    try:
        windows = parity_windows(dec.tokenize(text) if text else None, n_windows, seq_len,
                                 reference.spec.vocab, seed)
        cpp = [dec.logits(w) for w in windows]
        ref_model = held.to_torch()
        ref = torch_logits(ref_model, windows)
        fam = reference.spec.family
        gelu = (fam.activation_module,) if fam.activation == "gelu_tanh" else ()
        with emulate_llamacpp(ref_model, weight_types(plan_gguf(held), ref_model), gelu):
            emulated = torch_logits(ref_model, windows)
            with nudge_embeddings(ref_model):
                nudged = torch_logits(ref_model, windows)
        logits = compare_logits(ref, cpp, windows)
        rounding = compare_logits(ref, emulated, windows)
        tokenizer = None
        if text and reference.tokenizer is not None:
            # the file's tokenizer must split text as the model's own does, or every prompt differs
            sample = text[:TOKENIZER_CHARS]
            ours = dec.tokenize(sample, add_bos=False)
            theirs = reference.tokenizer.encode(sample, add_special_tokens=False)
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                         None if len(ours) == len(theirs) else min(len(ours), len(theirs)))
            tokenizer = {"chars": len(sample), "tokens": len(theirs), "first_difference": first,
                         "pass": first is None}
    finally:
        dec.close()
    logits["pass"] = _within_rounding_noise(logits, rounding)
    chaos, vs_emulated = compare_logits(emulated, nudged, windows), compare_logits(emulated, cpp, windows)
    vs_emulated["pass"] = vs_emulated["mean_kl"] <= KL_SLACK + KL_FACTOR * chaos["mean_kl"]
    result = {"path": str(path), "windows": len(windows), "seq_len": seq_len, "weights": weights,
              "tokenizer": tokenizer, "logits": logits, "activation_rounding": rounding,
              "vs_emulated": vs_emulated, "rounding_chaos": chaos,
              "thresholds": {"kl_factor": KL_FACTOR, "kl_slack": KL_SLACK, "ppl_slack": PPL_SLACK,
                             "top1_margin": TOP1_MARGIN, "top1_slack": TOP1_SLACK}}
    if dropped:
        full = torch_logits(reference.to_torch(), windows)
        result["dropped_cost"] = compare_logits(full, ref, windows)
    result["pass"] = (weights["pass"] and logits["pass"] and vs_emulated["pass"]
                      and (tokenizer is None or tokenizer["pass"]))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("reference", help="d2export checkpoint directory the GGUF was written from")
    ap.add_argument("--text", help="text file for the logit windows (random tokens otherwise)")
    ap.add_argument("--windows", type=int, default=PARITY_WINDOWS)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        qm = QuantizedModel.load(args.reference)
        text = Path(args.text).read_text() if args.text else None
        res = verify_gguf(args.gguf, qm, text=text, n_windows=args.windows, seq_len=args.seq_len)
    except D2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        w, lg = res["weights"], res["logits"]
        print(f"weights: {w['exact']}/{w['n_tensors']} bit-exact, {len(w['float32_rounding'])} within "
              f"float32 rounding, {len(w['mismatched'])} mismatched, {len(w['missing'])} missing")
        print(f"logits:  mean KL {lg['mean_kl']:.2e}  top-1 {lg['top1_agreement']:.3f} (decisive "
              f"{lg['top1_decisive']} of {lg['n_decisive']})  max |diff| "
              f"{lg['max_abs_diff']:.3f}  ppl {lg['ppl_test']:.3f} vs {lg['ppl_reference']:.3f}")
        for label, key in (("8-bit activation rounding in torch", "activation_rounding"),
                           ("llama.cpp vs that rounding", "vs_emulated"),
                           ("that rounding vs itself, embeddings nudged 1 ulp", "rounding_chaos")):
            r = res[key]
            print(f"{label}: mean KL {r['mean_kl']:.2e}  max KL {r['max_kl']:.3f}  ppl x{r['ppl_ratio']:.4f}")
        for name, why in w["dropped"].items():
            cost = res["dropped_cost"]
            print(f"dropped: {name} ({why}); cost: KL {cost['mean_kl']:.2e}, ppl x{cost['ppl_ratio']:.4f}")
        print("PASS" if res["pass"] else "FAIL")
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
