"""A grid's RTN fit on the CPU under a calibration's allocator settings (issue 13's CPU speed): time,
the kernel's share of it and the page faults, to see whether the fit's temporaries reuse memory or
are zeroed afresh by the kernel at every allocation.

    python bench/grid_fit_faults.py IQ1_S                   # this checkout
    python bench/grid_fit_faults.py IQ1_S --src /tmp/old    # another checkout's d2quant (a git worktree)
    python bench/grid_fit_faults.py IQ1_S --glibc-defaults  # as an in-memory calibration runs it

One thread, ``cpu.bound_heap_blocks()`` first (as a streamed ``Calibrator.run`` calls it; skipped
with ``--glibc-defaults``), then
``quantize_matrix`` of a random 576 x 1536 matrix (SmolLM2's q_proj shape, padded to 256 columns)
with a random importance. Prints one line: the checkout's commit, the type, seconds, system seconds,
minor page faults, and a checksum of the codes and scales (equal between checkouts: the same fit).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("type", help="a GGML type name, e.g. IQ1_S")
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the checkout whose d2quant is measured (default: this one)")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="leave glibc's dynamic mmap/trim thresholds, as an in-memory calibration does")
    args = ap.parse_args()
    sys.path.insert(0, str(args.src))
    import torch

    from d2quant.cpu import bound_heap_blocks
    from d2quant.grids.ggml import ggml_grid

    torch.set_num_threads(1)
    if not args.glibc_defaults:
        bound_heap_blocks()
    grid = ggml_grid(args.type)
    torch.manual_seed(0)
    w, importance = torch.randn(576, 1536) * 0.02, torch.rand(1536) + 0.1
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    codes, params = grid.quantize_matrix(w, importance)
    seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.src, capture_output=True,
                            text=True).stdout.strip()
    checksum = int(codes.long().sum()) + sum(float(p.double().sum()) for p in params.values())
    print(f"{commit} {args.type}: {seconds:.1f} s, {after.ru_stime - before.ru_stime:.1f} s in the kernel, "
          f"{after.ru_minflt - before.ru_minflt} page faults, checksum {checksum:.9g}")


if __name__ == "__main__":
    main()
