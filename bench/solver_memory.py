"""GPTQ's memory at one linear's width (issue 13): how much a solve of ``solver.gptq_rows`` adds to
the process's peak RSS beside the caller's Hessian, counted in k x k float32 copies.

    python bench/solver_memory.py 8960                    # Qwen2.5-1.5B's down_proj width, this checkout
    python bench/solver_memory.py 8960 --src /tmp/old     # another checkout's d2quant (a git worktree)

A random positive definite H of width k and 64 rows of weights onto Q4_K with act order (the
pipeline's default); the rows are few so that the k x k work dominates. Prints one line: the
checkout's commit, k, seconds, the peak above the RSS before the solve in k x k copies, and the
solve's error (equal errors between checkouts say the solves agree).
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("k", type=int, help="the linear's input width (H is k x k)")
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the checkout whose d2quant is measured (default: this one)")
    args = ap.parse_args()
    sys.path.insert(0, str(args.src))
    import torch

    from d2quant.cpu import peak_rss_mb, reset_peak_rss, rss_mb
    from d2quant.grids.ggml import ggml_grid
    from d2quant.solver import gptq_rows

    torch.manual_seed(0)
    k = args.k
    x = torch.randn(k + 512, k)
    h = x.T @ x / x.shape[0]
    del x
    w = torch.randn(64, k) * 0.05
    gc.collect()
    base = rss_mb()
    reset_peak_rss()
    t0 = time.time()
    solved = gptq_rows([w], h, ggml_grid("q4_k"), act_order=True)[0]
    seconds = time.time() - t0
    copies = (peak_rss_mb() - base) / (k * k * 4 / 2**20)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.src,
                            capture_output=True, text=True).stdout.strip()
    print(f"{commit} k={k} {seconds:.1f} s, peak +{copies:.2f} k x k copies, error {solved.error:.10g}")


if __name__ == "__main__":
    main()
