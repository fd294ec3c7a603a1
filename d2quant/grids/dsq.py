"""DSQ, the dual-scale quantizer for down_proj: a per-input-column scale c_j shared by all rows.

Two forms:

* ``ResidualBinaryGrid`` (the paper's): w_ij ~ c_j * sum_t r_it * b_tij with b in {-1, +1} and
  one r per term, row and group (2 terms at 2 bits: 4 symmetric non-uniform levels; 3 at 3 bits).
  Code u holds b_t in bit t (1 -> +1).
* ``DualScaleGrid``: c_j on top of any other grid (uniform or native GGML), alternating c with the
  grid's own parameters. This is the form GGUF can carry exactly.

Both fit by alternating closed-form least squares. c is absorbable: down_proj's input channel j is
up_proj's output row j, so the pipeline folds c into up_proj and down keeps only the grid part.
Params carry c as ``col_scale`` with shape [1, g] (shared by rows).
"""

from __future__ import annotations

import torch

from d2quant.errors import D2Error
from d2quant.grids.base import Grid, Params, grid_from_spec, round_to_fp16

_ITERS = 15


def _init_col_scale(w: torch.Tensor) -> torch.Tensor:
    c = w.abs().mean(0, keepdim=True)
    c = c / c.mean().clamp(min=1e-12)
    return torch.where(c > 1e-6, c, torch.ones_like(c))


def _fit_col_scale(w: torch.Tensor, d: torch.Tensor, c_old: torch.Tensor) -> torch.Tensor:
    """Closed-form per-column least squares of w ~ c * d, kept positive and finite."""
    num, den = (w * d).sum(0, keepdim=True), (d * d).sum(0, keepdim=True)
    c = torch.where(den > 0, num / den.clamp(min=1e-20), c_old)
    return torch.where(c > 1e-6 * c_old.abs().mean(), c, c_old)


class ResidualBinaryGrid(Grid):
    kind = "rbin"
    rows_independent = False  # the column scale is fitted over all rows

    def __init__(self, bits: int, group: int):
        if bits not in (2, 3):
            raise D2Error(f"the residual-binary DSQ grid exists at 2 or 3 bits, got {bits}")
        self.bits, self.group = bits, group
        # signs[u, t] = +-1: the sign of term t in code u
        u = torch.arange(2**bits)
        self.signs = (((u[:, None] >> torch.arange(bits)) & 1) * 2 - 1).float()

    def spec(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "group": self.group}

    def levels(self, r: torch.Tensor) -> torch.Tensor:
        """[..., terms] -> [..., 2^bits] level values (before the column scale)."""
        return r @ self.signs.to(r.device).T

    def _assign(self, w: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        lv = self.levels(r)  # [N, L]
        x = w / c
        return (x.unsqueeze(-1) - lv.unsqueeze(1)).abs().argmin(-1)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        w = w.float()
        n, g = w.shape
        imp = torch.ones(g, device=w.device) if importance is None else importance.float().clamp(min=1e-12)
        c = _init_col_scale(w)
        signs = self.signs.to(w.device)
        eye = torch.eye(self.bits, device=w.device)
        # greedy init: r0 from sign(w), r1.. from the residual's sign
        x, r = w / c, torch.zeros(n, self.bits, device=w.device)
        res = x.clone()
        for t in range(self.bits):
            r[:, t] = res.abs().mean(1)
            res = res - r[:, t:t + 1] * torch.sign(res)
        r = r.sort(1, descending=True).values
        best, best_err = None, None
        for _ in range(_ITERS):
            u = self._assign(w, r, c)
            b = signs[u]  # [N, g, terms]
            a = b * c.unsqueeze(-1)  # design matrix per row: w_i ~ a_i @ r_i
            aw = a * imp[:, None]
            ata = aw.transpose(1, 2) @ a
            # ridge keeps rows whose terms share signs (collinear columns) solvable
            ridge = 1e-6 * ata.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-20)
            ata = ata + ridge[:, None, None] * eye
            r = torch.linalg.solve(ata, (aw * w.unsqueeze(-1)).sum(1))
            lv_per_w = (b * r.unsqueeze(1)).sum(-1)
            c = _fit_col_scale(w, lv_per_w, c)
            p = {"r": round_to_fp16(r), "col_scale": c}
            err = ((self.dequantize(self.quantize(w, p), p) - w) ** 2 * imp).sum()
            if best_err is not None and err > best_err * (1 - 1e-4):
                if err < best_err:
                    best = p
                break
            best, best_err = p, err
        return best

    def quantize(self, w: torch.Tensor, p: Params, col0: int = 0) -> torch.Tensor:
        c = _cols(p.get("col_scale"), w, col0)
        lv = self.levels(p["r"])
        x = (w / c).unsqueeze(-1)
        lvb = lv if w.dim() == 1 else lv.unsqueeze(1)
        return (x - lvb).abs().argmin(-1).to(torch.int16)

    def dequantize(self, q: torch.Tensor, p: Params, col0: int = 0) -> torch.Tensor:
        lv = self.levels(p["r"])  # [N, L]
        if q.dim() == 1:
            v = lv.gather(1, q.long().unsqueeze(1)).squeeze(1)
        else:
            v = lv.gather(1, q.long())
        return v * _cols(p.get("col_scale"), q, col0)

    def scale_rows(self, p: Params, c: torch.Tensor) -> Params:
        c = c.float().reshape(-1, *([1] * (p["r"].dim() - 1)))
        return {**p, "r": round_to_fp16(p["r"] * c)}


class DualScaleGrid(Grid):
    kind = "dual"
    rows_independent = False  # the column scale is fitted over all rows

    def __init__(self, base: dict):
        self.base = grid_from_spec(base)
        if isinstance(self.base, (DualScaleGrid, ResidualBinaryGrid)):
            raise D2Error("a dual-scale grid needs a plain base grid")
        self.bits, self.group = self.base.bits, self.base.group
        self.solve_unit = getattr(self.base, "solve_unit", 1)  # a codebook base is solved unit by unit

    def spec(self) -> dict:
        return {"kind": self.kind, "base": self.base.spec()}

    def check_shape(self, n_rows: int, n_cols: int) -> None:
        self.base.check_shape(n_rows, n_cols)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        w = w.float()
        imp = torch.ones(w.shape[1], device=w.device) if importance is None else importance.float()
        c = _init_col_scale(w)
        best, best_err = None, None
        for _ in range(max(3, _ITERS // 3)):
            bp = self.base.fit(w / c, imp * c.squeeze(0) ** 2)
            d = self.base.dequantize(self.base.quantize(w / c, bp), bp)
            err = ((c * d - w) ** 2 * imp).sum()
            if best_err is None or err < best_err:
                best, best_err = {**bp, "col_scale": c}, err
            c = _fit_col_scale(w, d, c)
        return best

    def _split(self, p: Params) -> tuple[Params, torch.Tensor]:
        return {k: v for k, v in p.items() if k != "col_scale"}, p["col_scale"]

    def quantize(self, w: torch.Tensor, p: Params, col0: int = 0) -> torch.Tensor:
        bp, c = self._split(p)
        return self.base.quantize(w / _cols(c, w, col0), bp, col0)

    def quantize_units(self, w: torch.Tensor, p: Params, col0: int = 0,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
        """A codebook base's unit search, on the column-scaled weights (errors scale by c^2)."""
        bp, c = self._split(p)
        cs = _cols(c, w, col0)
        return self.base.quantize_units(w / cs, bp, col0, None if weight is None else weight * cs ** 2)

    def dequantize(self, q: torch.Tensor, p: Params, col0: int = 0) -> torch.Tensor:
        bp, c = self._split(p)
        return self.base.dequantize(q, bp, col0) * _cols(c, q, col0)

    def rounder(self, p: Params):
        bp, c = self._split(p)
        base = self.base.rounder(bp)

        def round_column(w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
            cj = _cols(c, w, j)
            q, y = base(w / cj, j)
            return q, y * cj
        return round_column

    def scale_rows(self, p: Params, c: torch.Tensor) -> Params:
        bp, cs = self._split(p)
        return {**self.base.scale_rows(bp, c), "col_scale": cs}


def _cols(c: torch.Tensor | None, like: torch.Tensor, col0: int) -> torch.Tensor | float:
    """The column scales [1, g] for the columns col0.. that ``like`` ([N, n] or one column [N]) holds."""
    if c is None:  # folded away (see strip_col_scale)
        return 1.0
    if like.dim() == 1:
        return c[:, col0]
    return c[:, col0:col0 + like.shape[1]]


def strip_col_scale(grid: Grid, params: Params, n_cols: int) -> tuple[Grid, Params, torch.Tensor | None]:
    """Split a DSQ-quantized tensor into (grid that files carry, its params, c over its n_cols columns).

    After the pipeline folds c into up_proj, down_proj is stored on the plain grid: the base grid for
    ``DualScaleGrid``, and ``ResidualBinaryGrid`` itself without its column scales.
    """
    if "col_scale" not in params:
        return grid, params, None
    c = params["col_scale"].reshape(-1)[:n_cols]  # [1, G, g] with the last group zero-padded
    rest = {k: v for k, v in params.items() if k != "col_scale"}
    return (grid.base if isinstance(grid, DualScaleGrid) else grid), rest, c
