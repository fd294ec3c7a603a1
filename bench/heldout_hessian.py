"""Does a GPTQ solution fitted on one text stay good on another? A one-layer probe (issue 10).

GPTQ minimises tr(E H E^T) with H = X^T X of the calibration text. Scored on another text the
relevant error is the same E under that text's H. This probe takes one decoder layer of a model,
sums H of the inputs of some of its linears (q_proj and down_proj by default) from the calibration
text (at two sample counts) and from each eval set of the protocol, solves each linear onto its
preset's GGML grid for several ``shrink`` values (H <- (1-s) H + s diag H; 1 is importance-weighted rounding, as an imatrix), and
prints the relative error of each solution under every H, next to llama.cpp's own rounding
(ggml_quantize_chunk) without and with diag(H) as its importance vector. Minutes instead of the hour a
full-model row costs on the 1.5B, but it ignores error propagation through the layers.

Each table's title also gives the shrink that the calibration text's own sampling noise calls for:
Schafer and Strimmer's estimate for shrinking correlations toward the diagonal target,
lambda* = sum_{i!=j} Var(r_ij) / sum_{i!=j} r_ij^2, with Var(r_ij) the variance of the mean over the
calibration *sequences* (tokens of one sequence are not independent draws). If it were near the shrink
that transfers best, the transfer loss would be estimation noise of H; it is not (BENCHMARKS.md).

    python bench/heldout_hessian.py --model qwen2.5-coder-1.5b --layer 3 --preset Q2_K
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

import protocol  # bench/ is on sys.path when run as a script
from converters.gguf.presets import preset_grids
from d2quant.grids import grid_from_spec
from d2quant.pipeline import _Moments
from d2quant.solver import gptq, single_thread, weighted_error
from d2quant.sources import load_source
from runtime_tests.libggml import dequantize_rows, quantize_rows


def llamacpp_fit(w: torch.Tensor, type_name: str, importance: torch.Tensor | None) -> torch.Tensor:
    """llama.cpp's own rounding of w (ggml_quantize_chunk), with importance as llama-imatrix gives it."""
    imp = None if importance is None else importance.float().numpy()
    raw = quantize_rows(type_name, w.numpy(), imp)
    return torch.from_numpy(dequantize_rows(type_name, raw, *w.shape))


class SequenceSpread:
    """Per-sequence second moments s_b = X_b^T X_b / T of one linear's input: their mean and the
    variance of that mean over the sequences, for the sampling-noise shrink estimate."""

    def __init__(self, k: int):
        self.sum = torch.zeros(k, k, dtype=torch.float64)
        self.sq = torch.zeros(k, k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        for xb in x.float():  # [T, K] per sequence
            s = (xb.T @ xb).double() / xb.shape[0]
            self.sum += s
            self.sq += s * s
            self.n += 1

    def noise_shrink(self) -> float:
        """Schafer-Strimmer lambda* for the correlations (target: the diagonal), clipped to 0..1."""
        m = self.sum / self.n
        var = (self.sq / self.n - m * m) / (self.n - 1)
        d = torch.diag(m).clamp(min=1e-30)
        norm = torch.outer(d, d)
        off = ~torch.eye(m.shape[0], dtype=torch.bool)
        return float(((var / norm)[off].sum() / (m * m / norm)[off].sum()).clamp(0, 1))


def hessians(model, layer: int, names: list[str], batches: list[torch.Tensor],
             spread: dict[str, SequenceSpread] | None = None) -> dict[str, torch.Tensor]:
    """H of the inputs of the named linears of one layer, summed as calibration sums it; with
    ``spread``, each linear's per-sequence moments too."""
    block = model.model.layers[layer]
    moments = {n: _Moments(block.get_submodule(n).in_features, "cpu") for n in names}

    def take(n, x):
        moments[n].add(x)
        if spread is not None:
            spread[n].add(x)
    handles = [block.get_submodule(n).register_forward_pre_hook(lambda _m, args, n=n: take(n, args[0]))
               for n in names]
    layers = model.model.layers
    model.model.layers = layers[:layer + 1]  # stop the forward after the probed layer
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for ids in batches:
                model.model(input_ids=ids, use_cache=False)
    finally:
        model.model.layers = layers
        for h in handles:
            h.remove()
    return {n: m.hessian() for n, m in moments.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--preset", default="Q2_K")
    ap.add_argument("--calib", default="wiki")
    ap.add_argument("--nsamples", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--linears", nargs="+", default=["self_attn.q_proj", "mlp.down_proj"])
    ap.add_argument("--shrinks", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    args = ap.parse_args()
    console = Console()
    src = load_source(args.model)
    model, tok = src.model, src.tokenizer
    grids = preset_grids(args.preset, src.spec)
    t0 = time.time()
    texts: dict[str, torch.Tensor] = {}
    for n in sorted(args.nsamples):
        texts[f"{args.calib} {n}x512"] = protocol.calib_tokens(args.calib, args.model, model, tok, n, 512)
    for s in protocol.EVAL_SETS:
        texts[s] = torch.tensor(protocol.eval_windows(tok, s, args.windows, 512))
    calib_keys = [k for k in texts if k not in protocol.EVAL_SETS]
    spreads = {k: {n: SequenceSpread(model.model.layers[args.layer].get_submodule(n).in_features)
                   for n in args.linears} for k in calib_keys}
    hs = {k: hessians(model, args.layer, args.linears, list(ids.split(8)), spreads.get(k))
          for k, ids in texts.items()}
    console.print(f"Hessians of layer {args.layer} from {len(texts)} texts in {time.time() - t0:.0f} s")
    for lin in args.linears:
        name = f"model.layers.{args.layer}.{lin}"
        w = model.get_submodule(name).weight.detach().float()
        grid = grid_from_spec(grids[name])
        noise = ", ".join(f"{k} {spreads[k][lin].noise_shrink():.3f}" for k in calib_keys)
        table = Table(title=f"{args.model} {name} {tuple(w.shape)} on {grids[name]['kind']}: "
                            "relative error tr(E H E^T)/tr(W H W^T) under each text's H; "
                            f"sampling-noise shrink lambda*: {noise}")
        table.add_column("solved on")
        table.add_column("shrink / fit")
        for k in texts:
            table.add_column(k)
        def row(solved_on: str, how: str, q: torch.Tensor) -> None:
            table.add_row(solved_on, how, *(f"{weighted_error(w, q, hs[k][lin]):.4g}" for k in texts))

        row("-", "llama.cpp, no imatrix", llamacpp_fit(w, grid.type_name, None))
        for ck in calib_keys:
            # llama-imatrix stores the mean of x^2 per input column: diag(H) up to a constant
            row(ck, "llama.cpp imatrix", llamacpp_fit(w, grid.type_name, torch.diag(hs[ck][lin])))
            for s in args.shrinks:
                with single_thread():
                    q = gptq(w, hs[ck][lin], grid, act_order=True, shrink=s).weight
                row(ck, f"{s:g}", q)
        console.print(table)
    console.print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
