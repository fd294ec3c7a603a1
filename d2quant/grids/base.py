"""The grid contract: the set of values a block of weights may take.

A grid quantizes a weight matrix W [rows=N out-features, cols=K in-features] along K in
*fit units* of ``group`` columns. Every grid parameter tensor has shape [N or 1, n_groups, ...]
once stacked over groups (leading 1 = shared by all rows, e.g. a per-column scale).

The GPTQ solver calls :meth:`fit` when its column loop reaches a group's first column (on the
error-updated weights), then each column through :meth:`rounder` (quantize and dequantize). RTN is the
same calls without error feedback. Converters read codes and params and pack them; a grid knows
its parameters' storage precision and rounds them in ``fit`` so what the solver sees is what any
file can store exactly.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch

from d2quant.errors import D2Error

Params = dict[str, torch.Tensor]

_REGISTRY: dict[str, type["Grid"]] = {}


class Grid(ABC):
    """One grid family. Subclasses set ``kind`` and are registered by it."""

    kind: ClassVar[str] = ""
    group: int
    bits: int
    # each row's parameters come from that row alone (so stacked weights may be solved as one, and
    # a tall matrix fitted in row chunks)
    rows_independent: ClassVar[bool] = True
    fit_chunk: ClassVar[int] = 1 << 18  # weights per fit call in fit_groups
    row_chunk: ClassVar[int] = 16384  # rows per quantize / dequantize call in the whole-matrix helpers

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.kind:
            _REGISTRY[cls.kind] = cls

    # ---- identity -------------------------------------------------------------------------
    @abstractmethod
    def spec(self) -> dict:
        """JSON-able constructor arguments plus ``kind``; ``grid_from_spec(g.spec())`` rebuilds it."""

    def __repr__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.spec().items() if k != "kind")
        return f"{self.kind}({args})"

    def check_shape(self, n_rows: int, n_cols: int) -> None:
        """Raise D2Error if a [n_rows, n_cols] weight cannot live on this grid."""

    # ---- per-group operations used by the solver -------------------------------------------
    @abstractmethod
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        """Parameters for one group: w is [N, g] (g = group, or fewer for a last partial group).

        importance: optional [g] weights per column (e.g. diag of the Hessian) for the fit error.
        Returned tensors have shape [N or 1, ...] (no group axis).
        """

    @abstractmethod
    def quantize(self, w: torch.Tensor, p: Params, col0: int = 0) -> torch.Tensor:
        """Codes (int16 tensor, same shape) for columns col0.. of the group that p belongs to."""

    @abstractmethod
    def dequantize(self, q: torch.Tensor, p: Params, col0: int = 0) -> torch.Tensor:
        """Float32 values of codes q for columns col0.. of the group."""

    def rounder(self, p: Params) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]:
        """The solver's per-column step for the group of ``p``: column j's weights [N] -> (codes,
        values), what quantize and dequantize give; a grid may decode its group once for all columns."""
        def round_column(w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
            q = self.quantize(w, p, j)
            return q, self.dequantize(q, p, j)
        return round_column

    def scale_rows(self, p: Params, c: torch.Tensor) -> Params:
        """Params whose dequantized rows are multiplied by c [N] (rounded to storage precision).

        Used to fold DSQ's per-input-column scale of down_proj into up_proj's rows.
        """
        raise D2Error(f"grid {self!r} cannot absorb a row scale")

    # ---- whole-matrix helpers (RTN, checkpoint, converters) ---------------------------------
    def n_groups(self, n_cols: int) -> int:
        return math.ceil(n_cols / self.group)

    def quantize_matrix(self, w: torch.Tensor,
                        importance: torch.Tensor | None = None) -> tuple[torch.Tensor, Params]:
        """Round-to-nearest: codes [N, K] and params stacked over groups (fit with ``importance``
        [K] per column, like an imatrix, when given)."""
        per_group = self.fit_groups(w, importance)
        codes = self._by_group(w.shape, lambda rows, gi, c: self.quantize(
            w[rows, c:c + self.group], row_params(per_group[gi], rows, w.shape[0])))
        return codes, stack_params(per_group)

    def fit_groups(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> list[Params]:
        """fit for every group of w [N, K] from its own columns (importance [K]), the same values.

        A row-independent grid is fitted in row chunks whose temporaries stay in the CPU's cache (a
        49152-row embedding table's Q6_K fit in one call per superblock streams every temporary
        through memory)."""
        if not self.rows_independent:
            return self._fit_rows(w, importance)
        rows = max(1, self.fit_chunk // self._fit_width(w.shape[1]))
        parts = [self._fit_rows(w[r:r + rows], importance) for r in range(0, w.shape[0], rows)]
        if len(parts) == 1:
            return parts[0]
        return [{k: torch.cat([part[gi][k] for part in parts]) for k in group}
                for gi, group in enumerate(parts[0])]

    def _fit_width(self, n_cols: int) -> int:
        """Columns one fit call of _fit_rows works on at a time."""
        return self.group

    def _fit_rows(self, w: torch.Tensor, importance: torch.Tensor | None) -> list[Params]:
        """fit_groups on a chunk of rows: group by group (a grid may fit them all at once)."""
        g = self.group
        return [self.fit(w[:, c:c + g], None if importance is None else importance[c:c + g])
                for c in range(0, w.shape[1], g)]

    def dequantize_matrix(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return self._by_group(codes.shape, lambda rows, gi, c: self.dequantize(
            codes[rows, c:c + self.group], row_params(group_params(params, gi), rows, codes.shape[0])))

    def _by_group(self, shape: torch.Size, part) -> torch.Tensor:
        """The [N, K] matrix whose rows x columns c:c+group are part(rows, gi, c), written in place.

        A concatenation would hold the matrix twice, and one group's temporaries over every row of a
        151 936-row vocabulary table are GBs; a row-independent grid goes row_chunk rows at a time."""
        n, k = shape
        step = self.row_chunk if self.rows_independent else n
        out = None
        for r in range(0, n, step):
            rows = slice(r, min(n, r + step))
            for gi, c in enumerate(range(0, k, self.group)):
                p = part(rows, gi, c)
                if out is None:
                    out = p.new_empty(n, k)
                out[rows, c:c + p.shape[1]] = p
        return out


def row_params(p: Params, rows: slice, n: int) -> Params:
    """The params of a row-independent grid for rows of an n-row matrix (views, no copy)."""
    return p if rows == slice(0, n) else {k: v[rows] for k, v in p.items()}


def stack_params(per_group: list[Params]) -> Params:
    """[N, ...] per group -> [N, G, ...]; a last partial group is zero-padded on trailing axes."""
    out: Params = {}
    for k in per_group[0]:
        ts = [p[k] for p in per_group]
        if len({t.shape for t in ts}) > 1:
            full = max(t.shape[-1] for t in ts)
            ts = [torch.nn.functional.pad(t, (0, full - t.shape[-1])) for t in ts]
        out[k] = torch.stack(ts, 1)
    return out


def group_params(params: Params, gi: int) -> Params:
    return {k: v[:, gi] for k, v in params.items()}


def grid_from_spec(spec: dict) -> Grid:
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind not in _REGISTRY:
        raise D2Error(f"unknown grid kind {kind!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind](**spec)


def registered_kinds() -> list[str]:
    return sorted(_REGISTRY)


def round_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Storage precision of GGML and (our) MatMulNBits scales, kept in float32."""
    return x.to(torch.float16).to(torch.float32)
