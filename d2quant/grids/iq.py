"""llama.cpp's codebook types (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) as grids.

A 256-weight superblock has one fp16 ``d`` and a 4-bit scale ``sc`` per ``sub`` weights; each run of
``unit`` weights (8 for IQ2, 4 for IQ3) takes its magnitudes from one point of a fixed lattice
codebook (E8-derived for IQ2, D4 for IQ3: the tables gguf-py ships, read from it) and its signs
from sign bits, with even parity over 8 weights for the XXS/XS types (7 bits stored, the 8th
implied). Decode, in libggml's float32 order: ``(dl * magnitude) * sign`` with
``dl = d * (0.5 + sc) * 0.25`` (IQ2), ``d * (0.5 + sc) * 0.5`` (IQ3_XXS), ``d * (1 + 2 sc)`` (IQ3_S).

Codes are kept per weight, as for every other grid: ``2 * level + negative``, where ``level``
indexes the type's magnitude table (grid_map). Only level vectors that are codebook points (and
sign patterns with the type's parity) are valid; the packers check it. A grid quantizes a whole
``solve_unit`` at once (:meth:`quantize_units`: a point's ``unit``, or the 8 weights a sign parity
spans): the solver's vector path calls it with the weights of each coordinate.
"""

from __future__ import annotations

from functools import cache
from typing import ClassVar

import gguf.quants as gq
import numpy as np
import torch

from d2quant.cpu import HEAP_BLOCK_LIMIT
from d2quant.errors import D2Error
from d2quant.grids.base import Params, round_to_fp16
from d2quant.grids.ggml import QK_K, _f16, _from_f16, _GgmlGrid, _importance, _keep_better, _safe

_CUDA_UNITS_PER_CHUNK = 16384  # units searched at once on CUDA: [units, points] distances <= 128 MB
# sub-block scale search around max|x| / max level: finer where the codebook is small (cheap to search)
_SCALE_FACTORS = {True: [0.7 + 0.05 * i for i in range(11)], False: [0.7 + 0.1 * i for i in range(6)]}
_POLISH_ROUNDS = 2


@cache
def _codebook(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(magnitude table [L], point levels [P, unit] int) of a gguf-py IQ class."""
    cls = getattr(gq, name)
    cls.init_grid()
    mags = np.asarray(cls.grid_map, dtype=np.float32)
    points = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    levels = np.searchsorted(mags, points).astype(np.int64)
    assert np.array_equal(mags[levels], points)
    return mags, levels


def _point_lookup(levels: np.ndarray, n_levels: int) -> np.ndarray:
    """Base-L number of a level vector -> its point index (-1 where no point)."""
    key = (levels * n_levels ** np.arange(levels.shape[1])).sum(1)
    out = np.full(n_levels ** levels.shape[1], -1, dtype=np.int64)
    out[key] = np.arange(len(levels))
    return out


@cache
def _rounding_tables(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(midpoints between levels, base-L digit weights [unit], point lookup) of a codebook: what
    rounding a unit to its nearest levels and finding that point takes."""
    mags, levels = _codebook(name)
    return (torch.from_numpy((mags[1:] + mags[:-1]) / 2), len(mags) ** torch.arange(levels.shape[1]),
            torch.from_numpy(_point_lookup(levels, len(mags))))


def _points_at(name: str, levels: torch.Tensor) -> torch.Tensor:
    """Point index of every unit's level vector [..., unit] in codebook ``name`` (-1: no point)."""
    _, digits, lookup = _rounding_tables(name)
    return lookup.to(levels.device)[(levels * digits.to(levels.device)).sum(-1)]


class _CodebookGrid(_GgmlGrid):
    group = QK_K
    vec_dot = "Q8_K"
    fallback = "iq4_nl"
    fp16_params = ("d",)
    int_params = {"sc": (0, 15)}
    codebook: ClassVar[str]  # gguf.quants class name
    unit: ClassVar[int]  # weights per codebook point
    sub: ClassVar[int]  # weights per 4-bit scale
    parity: ClassVar[bool] = False  # 8 signs stored as 7 bits + even parity

    # ---- the codebook ---------------------------------------------------------------------------
    @property
    def mags(self) -> torch.Tensor:
        return torch.from_numpy(_codebook(self.codebook)[0])

    @property
    def points(self) -> torch.Tensor:
        """Magnitudes of every point [P, unit]."""
        mags, levels = _codebook(self.codebook)
        return torch.from_numpy(mags[levels])

    @property
    def n_codes(self) -> int:
        return 2 * len(_codebook(self.codebook)[0])

    @property
    def n_sub(self) -> int:
        return QK_K // self.sub

    @property
    def solve_unit(self) -> int:
        """Columns the solver codes together: a point's unit, or the 8 weights one sign parity
        spans (IQ3_XXS: two points of 4)."""
        return 8 if self.parity else self.unit

    def _scale(self, d: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        return d * (0.5 + sc) * 0.25  # IQ2; the IQ3 types override

    def _scale_offset(self, p, cols):  # the scalar decode model does not apply: see dequantize
        raise D2Error(f"{self.type_name} decodes through its codebook")

    def rounder(self, p: Params):
        raise D2Error(f"{self.type_name} has no per-column rounder: the solver codes it {self.solve_unit} "
                      "columns at a time (quantize_units)")

    def _dl(self, p: Params, col0: int, n: int) -> torch.Tensor:
        """Per-weight scale [N, n] for the block's columns col0..col0+n."""
        si = torch.arange(col0, col0 + n) // self.sub
        return self._scale(p["d"].float().unsqueeze(-1), p["sc"].float())[:, si]

    # ---- decode and search ------------------------------------------------------------------------
    def dequantize(self, q: torch.Tensor, p: Params, col0: int = 0) -> torch.Tensor:
        col = q.dim() == 1
        q2 = q.unsqueeze(1) if col else q
        mags = self.mags.to(q2.device)
        mag = mags[(q2 >> 1).long()]
        y = (self._dl(p, col0, q2.shape[1]).to(q2.device) * mag) * (1 - 2 * (q2 & 1)).float()
        return y[:, 0] if col else y

    def quantize(self, w: torch.Tensor, p: Params, col0: int = 0) -> torch.Tensor:
        if w.dim() != 2 or col0 % self.solve_unit or w.shape[1] % self.solve_unit:
            raise D2Error(f"{self.type_name} quantizes whole runs of {self.solve_unit} weights; the solver "
                          "must visit this grid unit by unit")
        return self.quantize_units(w, p, col0)

    def quantize_units(self, w: torch.Tensor, p: Params, col0: int = 0,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
        """Codes [N, n] for columns col0..col0+n (whole units) minimising sum weight * err^2.

        weight: [n] or [N, n] per-coordinate error weights (GPTQ's 1 / [U]_jj^2), default uniform.
        """
        return self._codes_for(w, self._dl(p, col0, w.shape[1]).to(w.device), weight)

    def _codes_for(self, w: torch.Tensor, dl: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """The search itself, for per-weight scales dl [N, n]."""
        n_rows, n = w.shape
        x = w.float() / _safe(dl)
        a, neg = x.abs(), x < 0
        wt = torch.ones_like(x) if weight is None else weight.float().to(w.device).expand_as(x)
        if self.parity:  # an odd count of negatives: the cheapest weight takes the other sign, and
            a, neg = _even_signs(a, neg, wt)  # its magnitude is then matched from the wrong side
        idx = self._nearest_points(a.reshape(-1, self.unit), wt.reshape(-1, self.unit))
        levels = torch.from_numpy(_codebook(self.codebook)[1]).to(w.device)[idx].reshape(n_rows, n)
        return (2 * levels + neg.long()).to(torch.int16)

    def _nearest_points(self, t: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        """Index of the point nearest each unit's target t [M, unit] under sum wt (t - g)^2 (wt > 0).

        The error is separable, so where rounding each coordinate to its nearest level lands on a
        point, that point is the optimum; only the other units are searched against every point.
        """
        idx = _points_at(self.codebook, torch.bucketize(t, _rounding_tables(self.codebook)[0].to(t.device)))
        miss = (idx < 0).nonzero().squeeze(1)
        if len(miss):
            pts = self.points.to(t.device)  # [P, v]
            # sum_j wt (t - g)^2 = const + [wt, wt t] . [g^2, -2 g]: one product against every point
            rhs = torch.cat([pts * pts, -2 * pts], 1).T.contiguous()
            for m in miss.split(_units_per_chunk(len(pts), t.device)):
                wr = wt[m]
                # min's indices: the first minimum, as argmin, at half its cost on CPU
                idx[m] = (torch.cat([wr, wr * t[m]], 1) @ rhs).min(-1).indices
        return idx

    # ---- fit ----------------------------------------------------------------------------------
    def _signed(self, q: torch.Tensor) -> torch.Tensor:
        """Unscaled value of every code: magnitude with its sign."""
        return self.mags.to(q.device)[(q >> 1).long()] * (1 - 2 * (q & 1)).float()

    def _errors(self, x, imp, dl) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted error per sub-block [N, S] of x quantized at per-weight scales dl, and the codes."""
        q = self._codes_for(x, dl, imp)
        e = (imp * (dl * self._signed(q) - x) ** 2).reshape(x.shape[0], self.n_sub, self.sub).sum(-1)
        return e, q

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        self._check_group(w)
        x = w.float()
        n = x.shape[0]
        imp = _importance(importance, x).unsqueeze(0).expand_as(x)
        peak = x.abs().reshape(n, self.n_sub, self.sub).amax(-1)  # [N, S]
        top = float(self.mags[-1])
        # 1. the best free scale per sub-block: a search, each candidate refined by least squares
        best_t, best_e = None, None
        for f in _SCALE_FACTORS[len(_codebook(self.codebook)[1]) <= 512]:
            t = peak / (top * f)
            for _ in range(2):
                e, q = self._errors(x, imp, t.repeat_interleave(self.sub, 1))
                best_t, best_e = _keep_better_sub(best_t, best_e, t, e)
                t = self._lsq_scale(x, imp, q, t)
        # 2. d and the 4-bit integers that carry those scales, polished against the real error
        p = self._superblock(best_t)
        e = self._errors(x, imp, self._dl(p, 0, QK_K))[0].sum(1)
        for _ in range(_POLISH_ROUNDS):
            p2 = self._refine(x, imp, p)
            p, e = _keep_better(p, e, p2, self._errors(x, imp, self._dl(p2, 0, QK_K))[0].sum(1))
        return p

    def _lsq_scale(self, x, imp, q, t) -> torch.Tensor:
        g = self._signed(q).reshape(x.shape[0], self.n_sub, self.sub)
        xs, ws = x.reshape_as(g), imp.reshape_as(g)
        num, den = (ws * xs * g).sum(-1), (ws * g * g).sum(-1)
        t2 = torch.where(den > 0, num / den.clamp(min=1e-30), t)
        return torch.where(t2 > 0, t2, t)

    def _superblock(self, t: torch.Tensor) -> Params:
        """fp16 d and integer sc with _scale(d, sc) ~ t (_scale is affine in sc)."""
        one, top = torch.ones(1), self.int_params["sc"][1]
        base, step = self._scale(one, 0 * one), self._scale(one, one) - self._scale(one, 0 * one)
        d = round_to_fp16(t.amax(1) / (base + top * step))
        sc = ((t / _safe(d).unsqueeze(-1) - base) / step).round().clamp(0, top)
        return {"d": d, "sc": sc}

    def _per_unit_d(self, x, imp, p: Params) -> torch.Tensor:
        """What each weight is per unit of d, for the codes x takes under p (for the d refit)."""
        dl1 = self._dl({"d": torch.ones_like(p["d"]), "sc": p["sc"]}, 0, QK_K)
        return dl1 * self._signed(self._errors(x, imp, self._dl(p, 0, QK_K))[1])

    def _refine(self, x, imp, p: Params) -> Params:
        """Each sub-block's integer within +-1 (d fixed), then a least-squares d for those codes."""
        top = self.int_params["sc"][1]
        best, best_e = dict(p), None
        for ds in (0, -1, 1):
            sc = (p["sc"] + ds).clamp(0, top)
            e, _ = self._errors(x, imp, self._dl({"d": p["d"], "sc": sc}, 0, QK_K))
            if best_e is None:
                best_e = e
                continue
            take = e < best_e
            best["sc"], best_e = torch.where(take, sc, best["sc"]), torch.minimum(e, best_e)
        a = self._per_unit_d(x, imp, best)
        num, den = (imp * x * a).sum(1), (imp * a * a).sum(1)
        d = round_to_fp16(torch.where(den > 0, num / den.clamp(min=1e-30), p["d"]))
        return {"d": torch.where(d > 0, d, p["d"]), "sc": best["sc"]}

    # ---- bytes ----------------------------------------------------------------------------------
    def _code_levels(self, u: np.ndarray) -> np.ndarray:
        """Per-weight codes -> their magnitude levels (the low bit is the sign)."""
        return u >> 1

    def _unit_index(self, u: np.ndarray) -> np.ndarray:
        """[M, 256] per-weight codes -> point index per unit [M, 256 / unit] (checked)."""
        lv = torch.from_numpy(self._code_levels(u).astype(np.int64).reshape(u.shape[0], -1, self.unit))
        idx = _points_at(self.codebook, lv).numpy()
        if (idx < 0).any():
            raise D2Error(f"{self.type_name} codes hold levels that are no point of its codebook; "
                          "the tensor was not quantized on this grid")
        return idx

    def _sign_bits(self, u: np.ndarray) -> np.ndarray:
        """[M, 256] codes -> one byte of signs per 8 weights [M, 32] (bit j: weight j negative)."""
        neg = (u & 1).astype(np.uint8).reshape(u.shape[0], -1, 8)
        bits = (neg << np.arange(8, dtype=np.uint8)).sum(-1).astype(np.uint8)
        if self.parity and (neg.sum(-1) % 2).any():
            raise D2Error(f"{self.type_name} needs an even number of negative signs per 8 weights; "
                          "the tensor was not quantized on this grid")
        return bits

    def _codes(self, idx: np.ndarray, signs: np.ndarray) -> np.ndarray:
        """Point indices [M, units] and sign bytes [M, 32] -> per-weight codes [M, 256]."""
        levels = _codebook(self.codebook)[1][idx].reshape(idx.shape[0], QK_K)
        neg = ((signs[:, :, None] >> np.arange(8, dtype=np.uint8)) & 1).reshape(idx.shape[0], QK_K)
        return (2 * levels + neg).astype(np.uint8)

    def _scale_nibbles(self, sc: np.ndarray) -> np.ndarray:
        """[M, S] 4-bit scales -> [M, S / 2] bytes, the first of each pair in the low nibble."""
        sc = sc.astype(np.uint8)
        return sc[:, 0::2] | (sc[:, 1::2] << 4)

    @staticmethod
    def _unnibble(b: np.ndarray) -> np.ndarray:
        return np.stack([b & 15, b >> 4], axis=2).reshape(b.shape[0], -1)


def _units_per_chunk(points: int, device: torch.device) -> int:
    """Units whose distances to every point are formed at once. On CUDA, one large launch. On the
    CPU, half the heap's block limit (4 MiB): the chunks then reuse the same heap pages, where a
    128 MB chunk was a freshly zeroed mapping each time. An IQ1_S fit of a 576 x 1536 matrix on one
    thread spent 13.9 of its 26.7 s in the kernel; 12.2 s with the same codes, together with
    cpu.bound_heap_blocks's trim threshold (BENCHMARKS.md, issue 13)."""
    if device.type == "cuda":
        return _CUDA_UNITS_PER_CHUNK
    return max(1, HEAP_BLOCK_LIMIT // 2 // (4 * points))


def _even_signs(a, neg, wt):
    """Every 8 signs made even: where the count of negatives is odd, the weight with the least
    wt * |x| flips sign, and its target magnitude becomes -|x| (the codebook's smallest fits it)."""
    n_rows, n = neg.shape
    neg8, cost = neg.reshape(n_rows, -1, 8), (wt * a).reshape(n_rows, -1, 8)
    odd = neg8.sum(-1) % 2 == 1
    flip = torch.zeros_like(neg8).scatter_(-1, cost.argmin(-1, keepdim=True), True) & odd.unsqueeze(-1)
    a = torch.where(flip.reshape(n_rows, n), -a, a)
    return a, (neg8 ^ flip).reshape(n_rows, n)


def _keep_better_sub(best_t, best_e, t, e):
    """Per sub-block, the scale with the lower error."""
    if best_t is None:
        return t, e
    take = e < best_e
    return torch.where(take, t, best_t), torch.where(take, e, best_e)


def _ksign_index(bits: np.ndarray) -> np.ndarray:
    return (bits & 0x7F).astype(np.uint32)


class IQ2_XXSGrid(_CodebookGrid):
    kind, bits, codebook, unit, sub, parity = "iq2_xxs", 2, "IQ2_XXS", 8, 32, True
    needs_imatrix = True

    def _pack_blocks(self, u, p):
        idx, signs = self._unit_index(u), self._sign_bits(u)  # [M, 32], [M, 32]
        m = u.shape[0]
        aux0 = idx.reshape(m, 8, 4).astype(np.uint32) << (8 * np.arange(4, dtype=np.uint32))
        aux1 = _ksign_index(signs).reshape(m, 8, 4) << (7 * np.arange(4, dtype=np.uint32))
        aux1 = aux1.sum(-1) | (p["sc"].astype(np.uint32) << 28)
        qs = np.stack([aux0.sum(-1), aux1], axis=2).astype("<u4").reshape(m, -1).view(np.uint8)
        return np.concatenate([_f16(p["d"]), qs], axis=1)

    def _unpack_blocks(self, raw):
        m = raw.shape[0]
        aux = np.ascontiguousarray(raw[:, 2:]).view("<u4").reshape(m, 8, 2)
        idx = ((aux[:, :, :1] >> (8 * np.arange(4, dtype=np.uint32))) & 255).reshape(m, 32)
        s7 = ((aux[:, :, 1:] >> (7 * np.arange(4, dtype=np.uint32))) & 127).reshape(m, 32)
        return self._codes(idx, _with_parity(s7)), {"d": _from_f16(raw[:, :2]), "sc": aux[:, :, 1] >> 28}


class IQ2_XSGrid(_CodebookGrid):
    kind, bits, codebook, unit, sub, parity = "iq2_xs", 2, "IQ2_XS", 8, 16, True
    needs_imatrix = True

    def _pack_blocks(self, u, p):
        idx, signs = self._unit_index(u), self._sign_bits(u)
        qs = (idx.astype(np.uint16) | (_ksign_index(signs).astype(np.uint16) << 9)).astype("<u2").view(np.uint8)
        return np.concatenate([_f16(p["d"]), qs, self._scale_nibbles(p["sc"])], axis=1)

    def _unpack_blocks(self, raw):
        qs = np.ascontiguousarray(raw[:, 2:66]).view("<u2")
        codes = self._codes((qs & 511).astype(np.int64), _with_parity((qs >> 9).astype(np.uint8)))
        return codes, {"d": _from_f16(raw[:, :2]), "sc": self._unnibble(raw[:, 66:74])}


class IQ2_SGrid(_CodebookGrid):
    kind, bits, codebook, unit, sub = "iq2_s", 2, "IQ2_S", 8, 16

    def _pack_blocks(self, u, p):
        idx, signs = self._unit_index(u), self._sign_bits(u)
        qh = ((idx >> 8).reshape(-1, 8, 4) << (2 * np.arange(4))).sum(-1).astype(np.uint8)
        return np.concatenate([_f16(p["d"]), (idx & 255).astype(np.uint8), signs, qh,
                               self._scale_nibbles(p["sc"])], axis=1)

    def _unpack_blocks(self, raw):
        m = raw.shape[0]
        qh = ((raw[:, 66:74, None] >> (2 * np.arange(4, dtype=np.uint8))) & 3).reshape(m, 32)
        idx = raw[:, 2:34].astype(np.int64) | (qh.astype(np.int64) << 8)
        return self._codes(idx, raw[:, 34:66]), {"d": _from_f16(raw[:, :2]), "sc": self._unnibble(raw[:, 74:82])}


class IQ3_XXSGrid(_CodebookGrid):
    kind, bits, codebook, unit, sub, parity = "iq3_xxs", 3, "IQ3_XXS", 4, 32, True

    def _scale(self, d, sc):
        return d * (0.5 + sc) * 0.5

    def _pack_blocks(self, u, p):
        idx, signs = self._unit_index(u), self._sign_bits(u)  # [M, 64], [M, 32]
        m = u.shape[0]
        aux = (_ksign_index(signs).reshape(m, 8, 4) << (7 * np.arange(4, dtype=np.uint32))).sum(-1)
        aux = (aux | (p["sc"].astype(np.uint32) << 28)).astype("<u4").view(np.uint8)
        return np.concatenate([_f16(p["d"]), idx.astype(np.uint8), aux], axis=1)

    def _unpack_blocks(self, raw):
        m = raw.shape[0]
        aux = np.ascontiguousarray(raw[:, 66:98]).view("<u4")
        s7 = ((aux[:, :, None] >> (7 * np.arange(4, dtype=np.uint32))) & 127).reshape(m, 32)
        return self._codes(raw[:, 2:66].astype(np.int64), _with_parity(s7)), {"d": _from_f16(raw[:, :2]),
                                                                              "sc": aux >> 28}


class IQ3_SGrid(_CodebookGrid):
    kind, bits, codebook, unit, sub = "iq3_s", 3, "IQ3_S", 4, 32

    def _scale(self, d, sc):
        return d * (1 + 2 * sc)

    def _pack_blocks(self, u, p):
        idx, signs = self._unit_index(u), self._sign_bits(u)  # [M, 64], [M, 32]
        qh = (((idx >> 8) & 1).reshape(-1, 8, 8) << np.arange(8)).sum(-1).astype(np.uint8)
        return np.concatenate([_f16(p["d"]), (idx & 255).astype(np.uint8), qh, signs,
                               self._scale_nibbles(p["sc"])], axis=1)

    def _unpack_blocks(self, raw):
        m = raw.shape[0]
        qh = ((raw[:, 66:74, None] >> np.arange(8, dtype=np.uint8)) & 1).reshape(m, 64)
        idx = raw[:, 2:66].astype(np.int64) | (qh.astype(np.int64) << 8)
        return self._codes(idx, raw[:, 74:106]), {"d": _from_f16(raw[:, :2]), "sc": self._unnibble(raw[:, 106:110])}


class _TernaryGrid(_CodebookGrid):
    """IQ1_S / IQ1_M: 2048 ternary 8-vectors (values -1, 0, 1: signs inside the codebook) shifted by
    +-0.125 (``delta``, one sign per ``delta_run`` weights), 3-bit scales: ``d * (2 sc + 1)``.

    Codes are the level index per weight (0, 1, 2 for -1, 0, 1); the delta signs are a param,
    ``dneg`` (1: -0.125), per run of ``delta_run`` weights.
    """

    codebook, unit = "IQ1_S", 8
    int_params = {"sc": (0, 7), "dneg": (0, 1)}
    delta_run: ClassVar[int]
    needs_imatrix = True

    @property
    def n_codes(self) -> int:
        return 3

    def _scale(self, d, sc):
        return d * (2 * sc + 1)

    def _delta(self, p: Params, col0: int, n: int) -> torch.Tensor:
        ri = torch.arange(col0, col0 + n) // self.delta_run
        return torch.where(p["dneg"].float()[:, ri] > 0, -0.125, 0.125)

    def dequantize(self, q: torch.Tensor, p: Params, col0: int = 0) -> torch.Tensor:
        col = q.dim() == 1
        q2 = q.unsqueeze(1) if col else q
        g = q2.float() - 1  # level -> -1, 0, 1
        y = self._dl(p, col0, q2.shape[1]).to(q2.device) * (g + self._delta(p, col0, q2.shape[1]).to(q2.device))
        return y[:, 0] if col else y

    def _codes_for(self, w, dl, weight, delta=None):
        """The point per unit for per-weight scales dl and deltas (+-0.125 per weight)."""
        n_rows, n = w.shape
        x = w.float() / _safe(dl) - delta
        wt = torch.ones_like(x) if weight is None else weight.float().to(w.device).expand_as(x)
        idx = self._nearest_points(x.reshape(-1, self.unit), wt.reshape(-1, self.unit))
        levels = torch.from_numpy(_codebook(self.codebook)[1]).to(w.device)
        return levels[idx].reshape(n_rows, n).to(torch.int16)

    def quantize_units(self, w, p, col0=0, weight=None):
        n = w.shape[1]
        return self._codes_for(w, self._dl(p, col0, n).to(w.device), weight, self._delta(p, col0, n).to(w.device))

    def _signed(self, q):
        return q.float() - 1

    def _deltas(self, dneg: torch.Tensor) -> torch.Tensor:
        return torch.where(dneg.repeat_interleave(self.delta_run, 1) > 0, -0.125, 0.125)

    def _run_errors(self, x, imp, dl, dneg) -> tuple[torch.Tensor, torch.Tensor]:
        delta = self._deltas(dneg)
        q = self._codes_for(x, dl, imp, delta)
        e = (imp * (dl * (q.float() - 1 + delta) - x) ** 2).reshape(x.shape[0], -1, self.delta_run).sum(-1)
        return e, q

    def best_dneg(self, x, imp, dl) -> torch.Tensor:
        """Per run of delta_run weights, the delta sign with the lower error."""
        runs = (x.shape[0], QK_K // self.delta_run)
        e_pos, _ = self._run_errors(x, imp, dl, torch.zeros(runs))
        e_neg, _ = self._run_errors(x, imp, dl, torch.ones(runs))
        return (e_neg < e_pos).float()

    def _errors(self, x, imp, dl):
        """Weighted error per sub-block [N, S] (each delta run at its better sign), and the codes."""
        e, q = self._run_errors(x, imp, dl, self.best_dneg(x, imp, dl))
        if self.sub >= self.delta_run:
            return e.reshape(x.shape[0], self.n_sub, -1).sum(-1), q
        return e.repeat_interleave(self.delta_run // self.sub, 1) / (self.delta_run // self.sub), q

    def fit(self, w, importance=None):
        p = super().fit(w, importance)
        x = w.float()
        imp = _importance(importance, x).unsqueeze(0).expand_as(x)
        return {**p, "dneg": self.best_dneg(x, imp, self._dl(p, 0, QK_K))}

    def _per_unit_d(self, x, imp, p):
        dl = self._dl(p, 0, QK_K)
        dneg = self.best_dneg(x, imp, dl)
        _, q = self._run_errors(x, imp, dl, dneg)
        dl1 = self._dl({"d": torch.ones_like(p["d"]), "sc": p["sc"]}, 0, QK_K)
        return dl1 * (q.float() - 1 + self._deltas(dneg))

    def _code_levels(self, u):
        return u  # no sign bit: the level is the code

    def _codes_from(self, idx):
        return _codebook(self.codebook)[1][idx].reshape(idx.shape[0], QK_K).astype(np.uint8)


class IQ1_SGrid(_TernaryGrid):
    kind, bits, sub, delta_run = "iq1_s", 1, 32, 32

    def _pack_blocks(self, u, p):
        idx = self._unit_index(u)  # [M, 32]
        high = ((idx >> 8).reshape(-1, 8, 4) << (3 * np.arange(4))).sum(-1)
        qh = high | (p["sc"].astype(np.int64) << 12) | (p["dneg"].astype(np.int64) << 15)
        return np.concatenate([_f16(p["d"]), (idx & 255).astype(np.uint8),
                               qh.astype("<u2").view(np.uint8)], axis=1)

    def _unpack_blocks(self, raw):
        qh = np.ascontiguousarray(raw[:, 34:50]).view("<u2").astype(np.int64)  # [M, 8]
        high = ((qh[:, :, None] >> (3 * np.arange(4))) & 7).reshape(-1, 32)
        idx = raw[:, 2:34].astype(np.int64) | (high << 8)
        return self._codes_from(idx), {"d": _from_f16(raw[:, :2]), "sc": (qh >> 12) & 7, "dneg": qh >> 15}


class IQ1_MGrid(_TernaryGrid):
    kind, bits, sub, delta_run = "iq1_m", 1, 16, 8
    needs_imatrix = False  # libggml quantizes it without one (llama-quantize refuses the preset)

    def _pack_blocks(self, u, p):
        idx = self._unit_index(u)  # [M, 32]
        m = u.shape[0]
        dn = p["dneg"].astype(np.int64)  # [M, 32], one per unit of 8
        nib = ((idx >> 8) & 7) | (dn << 3)  # per unit: 3 high index bits, then the delta sign
        qh = (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)
        d16 = p["d"].astype("<f2").view(np.uint16).astype(np.int64)
        sc = p["sc"].astype(np.int64).reshape(m, 4, 4)
        words = (sc << (3 * np.arange(4))).sum(-1) | (((d16[:, None] >> (4 * np.arange(4))) & 15) << 12)
        return np.concatenate([(idx & 255).astype(np.uint8), qh, words.astype("<u2").view(np.uint8)], axis=1)

    def _unpack_blocks(self, raw):
        m = raw.shape[0]
        words = np.ascontiguousarray(raw[:, 48:56]).view("<u2").astype(np.int64)  # [M, 4]
        d16 = ((words >> 12) << (4 * np.arange(4))).sum(-1).astype(np.uint16)
        sc = ((words[:, :, None] >> (3 * np.arange(4))) & 7).reshape(m, 16)
        nib = np.stack([raw[:, 32:48] & 15, raw[:, 32:48] >> 4], axis=2).reshape(m, 32).astype(np.int64)
        idx = raw[:, :32].astype(np.int64) | ((nib & 7) << 8)
        return self._codes_from(idx), {"d": d16.view(np.float16).astype(np.float32), "sc": sc, "dneg": nib >> 3}


def _with_parity(s7: np.ndarray) -> np.ndarray:
    """7 stored sign bits -> the 8 signs (the 8th makes the count of negatives even)."""
    s7 = s7.astype(np.uint8)
    par = np.unpackbits(s7[..., None], axis=-1).sum(-1) % 2
    return (s7 | (par.astype(np.uint8) << 7)).astype(np.uint8)
