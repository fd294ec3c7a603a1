"""Uniform asymmetric b-bit grid with an integer zero point per (row, group).

Decode: (q - z) * s, q and z in 0..2^b-1. This is the paper's grid and MatMulNBits' decode; with
b <= 3 it also sits exactly in GGML Q4_0 (u = q - z + 8). Scales are rounded to fp16 so every
container holds them exactly.
"""

from __future__ import annotations

import torch

from d2quant.errors import D2Error
from d2quant.grids.base import Grid, Params, round_to_fp16

# Clipping search: shrink the min/max range by these factors and keep the best per row.
_SHRINKS = torch.linspace(1.0, 0.5, 11).tolist()


class UniformGrid(Grid):
    kind = "uniform"

    def __init__(self, bits: int, group: int, clip_search: bool = True):
        if bits not in (2, 3, 4, 8):
            raise D2Error(f"uniform grid supports 2, 3, 4 or 8 bits, got {bits}")
        if group < 8:
            raise D2Error(f"group size {group} is too small; use 16, 32, 64 or 128")
        self.bits, self.group, self.clip_search = bits, group, clip_search
        self.maxq = 2**bits - 1

    def spec(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "group": self.group,
                "clip_search": self.clip_search}

    def _params(self, lo: torch.Tensor, hi: torch.Tensor) -> Params:
        s = round_to_fp16((hi - lo) / self.maxq)
        s = torch.where(s == 0, torch.ones_like(s), s)
        z = torch.clamp(torch.round(-lo / s), 0, self.maxq)
        return {"scale": s, "zero": z}

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        w = w.float()
        lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
        if not self.clip_search:
            return self._params(lo, hi)
        imp = torch.ones(w.shape[1], device=w.device) if importance is None else importance.float()
        best, best_err = None, None
        for f in _SHRINKS:
            p = self._params(lo * f, hi * f)
            err = ((self.dequantize(self.quantize(w, p), p) - w) ** 2 * imp).sum(1)
            if best is None:
                best, best_err = p, err
            else:
                take = err < best_err
                best = {k: torch.where(take, p[k], best[k]) for k in p}
                best_err = torch.minimum(err, best_err)
        return best

    def quantize(self, w: torch.Tensor, p: Params, col0: int = 0) -> torch.Tensor:
        s, z = _col(p["scale"], w), _col(p["zero"], w)
        return torch.clamp(torch.round(w / s) + z, 0, self.maxq).to(torch.int16)

    def dequantize(self, q: torch.Tensor, p: Params, col0: int = 0) -> torch.Tensor:
        return (q.float() - _col(p["zero"], q)) * _col(p["scale"], q)

    def scale_rows(self, p: Params, c: torch.Tensor) -> Params:
        c = c.float().reshape(-1, *([1] * (p["scale"].dim() - 1)))
        return {"scale": round_to_fp16(p["scale"] * c), "zero": p["zero"]}


def _col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row parameter [N] broadcast against a block [N, n] (or a column [N])."""
    return t if like.dim() == t.dim() else t.unsqueeze(-1)
