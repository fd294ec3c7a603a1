"""Does a GPTQ solution fitted on one text stay good on another? A one-layer probe (issue 10).

GPTQ minimises tr(E H E^T) with H = X^T X of the calibration text. Scored on another text the
relevant error is the same E under that text's H. This probe takes one decoder layer of a model,
sums H of the inputs of its q/k/v and down_proj from the calibration text (at two sample counts)
and from each eval set of the protocol, solves each linear onto its preset's GGML grid for several
``shrink`` values (H <- (1-s) H + s diag H; 1 is importance-weighted rounding, as an imatrix), and
prints the relative error of each solution under every H. Minutes instead of the hour a
full-model row costs on the 1.5B, but it ignores error propagation through the layers.

    python bench/heldout_hessian.py --model qwen2.5-coder-1.5b --layer 6 --preset Q2_K
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
from d2quant.solver import gptq, single_thread, weighted_error
from d2quant.sources import load_source

SHRINKS = (0.0, 0.25, 0.5, 0.75, 1.0)


def hessians(model, layer: int, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum of x^T x / tokens over the inputs of the named linears of one layer."""
    block = model.model.layers[layer]
    sums: dict[str, torch.Tensor] = {}
    count = 0

    def hook(name):
        def pre(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            with torch.autocast("cpu", enabled=False):  # the sum in float32, not bfloat16
                sums[name] = sums.get(name, 0) + x.T @ x
        return pre

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    layers = model.model.layers
    model.model.layers = layers[:layer + 1]  # stop the forward after the probed layer
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for ids in batches:
                model.model(input_ids=ids, use_cache=False)
                count += ids.numel()
    finally:
        model.model.layers = layers
        for h in handles:
            h.remove()
    return {n: (s / count).double() for n, s in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--preset", default="Q2_K")
    ap.add_argument("--calib", default="wiki")
    ap.add_argument("--nsamples", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--linears", nargs="+", default=["self_attn.q_proj", "mlp.down_proj"])
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
    hs = {k: hessians(model, args.layer, args.linears, list(ids.split(8))) for k, ids in texts.items()}
    console.print(f"Hessians of layer {args.layer} from {len(texts)} texts in {time.time() - t0:.0f} s")
    calib_keys = [k for k in texts if k not in protocol.EVAL_SETS]
    for lin in args.linears:
        name = f"model.layers.{args.layer}.{lin}"
        w = model.get_submodule(name).weight.detach().float()
        grid = grid_from_spec(grids[name])
        table = Table(title=f"{args.model} {name} {tuple(w.shape)} on {grids[name]['kind']}: "
                            "relative error tr(E H E^T)/tr(W H W^T) under each text's H")
        table.add_column("solved on")
        table.add_column("shrink")
        for k in texts:
            table.add_column(k)
        for ck in calib_keys:
            for s in SHRINKS:
                with single_thread():
                    q = gptq(w, hs[ck][lin], grid, act_order=True, shrink=s).weight
                table.add_row(ck, f"{s:g}", *(f"{weighted_error(w, q, hs[k][lin]):.5f}" for k in texts))
        console.print(table)
    console.print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
