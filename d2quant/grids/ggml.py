"""Native GGML block types as grids, with the byte packers the GGUF writer uses.

Every type decodes a weight as ``dl * level[u] + off`` where u is the stored code, ``level`` a fixed
table of the type (integers, or IQ4_NL's non-uniform values) and (dl, off) the scale and offset of
the (sub-)block the weight sits in:

  =======  =====  ==============================  ==========================================
  type     block  params (storage form)            dl, off per weight
  =======  =====  ==============================  ==========================================
  Q4_0     32     d fp16                          d, 0                    level -8..7
  Q4_1     32     d, m fp16                       d, m                    level 0..15
  Q5_0     32     d fp16                          d, 0                    level -16..15
  Q5_1     32     d, m fp16                       d, m                    level 0..31
  Q8_0     32     d fp16                          d, 0                    level -128..127
  IQ4_NL   32     d fp16                          d, 0                    level kvalues_iq4nl
  Q2_K     256    d, dmin fp16; sc, m 0..15 /16   d*sc, -(dmin*m)         level 0..3
  Q3_K     256    d fp16; sc -32..31 /16          d*sc, 0                 level -4..3
  Q4_K     256    d, dmin fp16; sc, m 0..63 /32   d*sc, -(dmin*m)         level 0..15
  Q5_K     256    d, dmin fp16; sc, m 0..63 /32   d*sc, -(dmin*m)         level 0..31
  Q6_K     256    d fp16; sc -128..127 /16        d*sc, 0                 level -32..31
  =======  =====  ==============================  ==========================================

fp16 params are float32 tensors holding fp16-representable values; sub-scales and mins are float32
tensors holding integers (so checkpoints round-trip them unchanged). Dequantization performs the
float32 operations in libggml's order (``(d*sc)*level - dmin*m``), so it is bit-exact with llama.cpp
and gguf-py. For K-quants the superblock's d/dmin are fitted first and the sub-block scales and mins
constrained to the type's integer steps of them, so what the solver sees is what the file holds.

Fitting follows the idea of ggml's make_qx_quants / make_qkx3_quants / make_qp_quants (search the
scale, refit by weighted least squares) but optimises the importance-weighted error itself and then
polishes the stored integers and fp16 values against that error.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import gguf
import numpy as np
import torch

from d2quant.errors import D2Error
from d2quant.grids.base import Grid, Params, round_to_fp16

QK_K = 256
_GGML_TYPES: dict[str, type["_GgmlGrid"]] = {}  # GGML type name -> its grid class (filled by each class)
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# Scale search: map the block's largest |x| to (extreme level) * f for each f (f > 1 clips it).
_SCALE_FACTORS = [0.8 + 0.025 * i for i in range(25)]
# Affine search: levels 0..nmax spread over nmax*f of the block's [min, max] range.
_RANGE_FACTORS = [0.7 + 0.025 * i for i in range(29)]
_POLISH_ROUNDS = 3


# ==== level tables ===============================================================================
class _Levels:
    """The values codes stand for before scaling: code u -> values[u] (sorted ascending)."""

    def __init__(self, values: list[int]):
        self.values = torch.tensor(values, dtype=torch.float32)
        self.n = len(values)
        self.lo, self.hi = float(values[0]), float(values[-1])
        self.uniform = all(b - a == 1 for a, b in zip(values, values[1:]))
        if not self.uniform:
            # integer table: every midpoint is a multiple of 1/2, so the half-unit cell of t decides
            # its nearest level; a lookup over cells is far faster than bucketize
            cells = torch.arange(2 * values[0] - 1, 2 * values[-1] + 2) / 2 + 0.25
            mid = (self.values[1:] + self.values[:-1]) / 2
            self._cell0, self._ncell = 2 * values[0] - 1, len(cells)
            self._lut = (cells.unsqueeze(1) > mid).sum(1).float()

    @classmethod
    def range(cls, lo: int, hi: int) -> "_Levels":
        return cls(list(range(lo, hi + 1)))

    def code(self, t: torch.Tensor) -> torch.Tensor:
        """Nearest code (as float) to t = x / scale."""
        if self.uniform:
            return (t.round() - self.lo).clamp(0, self.n - 1)
        cell = (2 * t).floor().clamp(self._cell0, self._cell0 + self._ncell - 1) - self._cell0
        return _on(self._lut, t)[cell.long()]

    def value(self, u: torch.Tensor) -> torch.Tensor:
        return u + self.lo if self.uniform else _on(self.values, u)[u.long()]

    def nearest(self, t: torch.Tensor) -> torch.Tensor:
        """value(code(t)); on an integer range the rounded t clamped to it (the same numbers)."""
        return t.round().clamp(self.lo, self.hi) if self.uniform else self.value(self.code(t))


def _on(table: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return table if table.device == like.device else table.to(like.device)


def _safe(s: torch.Tensor) -> torch.Tensor:
    """Divisor for x / s: a zero scale gives 0 (so the code of level 0, or the lowest code)."""
    return torch.where(s == 0, torch.full_like(s, float("inf")), s)


# ==== fitting helpers (all vectorised over leading dims; sums over the last axis) ================
def _search_scale(x: torch.Tensor, w: torch.Tensor, lv: _Levels,
                  factors=_SCALE_FACTORS) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed scale s minimising sum w (x - s*level[u])^2 per block (last axis), u nearest.

    Returns (s, sum w*level^2) - the latter weighs how much an error in s costs.
    """
    xm = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    best_s = torch.zeros_like(xm)
    best_e = (w * x * x).sum(-1)
    best_qq = torch.zeros_like(xm)
    for target in (lv.lo, lv.hi):
        if target == 0:
            continue
        for f in factors:
            s = xm / (target * f)
            q = lv.nearest(x / _safe(s).unsqueeze(-1))
            wq = w * q
            sxq, sqq = (wq * x).sum(-1), (wq * q).sum(-1)
            s = torch.where(sqq > 0, sxq / sqq.clamp(min=1e-30), torch.zeros_like(sqq))
            e = (w * (x - s.unsqueeze(-1) * q) ** 2).sum(-1)
            take = e < best_e
            best_s = torch.where(take, s, best_s)
            best_qq = torch.where(take, sqq, best_qq)
            best_e = torch.minimum(e, best_e)
    return best_s, best_qq


def _lsq2(x, w, a, b, dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted least squares x ~ alpha*a + beta*b over ``dims``; returns alpha, beta, solvable."""
    wa, wb = w * a, w * b
    return _solve2((wa * a).sum(dims), (wa * b).sum(dims), (wb * b).sum(dims),
                   (wa * x).sum(dims), (wb * x).sum(dims))


def _solve2(saa, sab, sbb, sxa, sxb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2x2 normal equations of _lsq2 from their sums, in float64."""
    saa, sab, sbb, sxa, sxb = (t.double() for t in (saa, sab, sbb, sxa, sxb))
    det = saa * sbb - sab * sab
    ok = det > 1e-12 * (saa * sbb).clamp(min=1e-300)
    det = torch.where(ok, det, torch.ones_like(det))
    alpha = (sxa * sbb - sxb * sab) / det
    beta = (saa * sxb - sab * sxa) / det
    return alpha.float(), beta.float(), ok


def _search_affine(x: torch.Tensor, w: torch.Tensor, nmax: int, offset_le_zero: bool,
                   factors=_RANGE_FACTORS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale s > 0 and offset o minimising sum w (x - (s*u + o))^2 per block, u in 0..nmax.

    ``offset_le_zero`` keeps o <= 0 (K-quant mins are stored as dmin*m with m >= 0).
    Returns (s, o, sum w*u^2).
    """
    lo, hi = x.min(-1).values, x.max(-1).values
    if offset_le_zero:
        lo = lo.clamp(max=0)
    rng = hi - lo
    ones = torch.ones_like(x)
    best_s = rng / nmax
    best_o = lo.clone()
    best_e = (w * (x - lo.unsqueeze(-1)) ** 2).sum(-1)  # s*u + o with every u = 0
    best_uu = torch.zeros_like(lo)
    # the least-squares sums that do not depend on the codes, once (the same tensors _lsq2 forms)
    w1 = w * ones
    sbb, sxb = (w1 * ones).sum(-1), (w1 * x).sum(-1)
    for f in factors:
        u = ((x - lo.unsqueeze(-1)) * (nmax * f / _safe(rng)).unsqueeze(-1)).round().clamp(0, nmax)
        wu = w * u
        suu, sxu = (wu * u).sum(-1), (wu * x).sum(-1)
        s, o, ok = _solve2(suu, (wu * ones).sum(-1), sbb, sxu, sxb)
        if offset_le_zero:
            s_only = sxu / suu.clamp(min=1e-30)
            clip = o > 0
            s, o = torch.where(clip, s_only, s), torch.where(clip, torch.zeros_like(o), o)
            ok = ok | (clip & (suu > 0))
        ok = ok & (s > 0)
        e = (w * (x - s.unsqueeze(-1) * u - o.unsqueeze(-1)) ** 2).sum(-1)
        take = ok & (e < best_e)
        best_s, best_o = torch.where(take, s, best_s), torch.where(take, o, best_o)
        best_uu = torch.where(take, suu, best_uu)
        best_e = torch.where(take, e, best_e)
    return best_s, best_o, best_uu


def _importance(importance: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """Per-column error weights [g] for a group w [N, g]."""
    g = w.shape[1]
    if importance is None:
        return torch.ones(g, device=w.device)
    imp = importance.to(w.device, torch.float32).reshape(g)
    top = imp.max()
    if not torch.isfinite(top) or top <= 0:
        return torch.ones(g, device=w.device)
    # zero-importance columns still get a (tiny) say so every system stays solvable
    return imp.clamp(min=1e-6 * float(top))


# ==== byte helpers ===============================================================================
def _planes(v: np.ndarray, span: int, nbits: int) -> np.ndarray:
    """[M, P*span] small ints -> [M, span] bytes; byte b holds v[:, p*span + b] at bit nbits*p."""
    planes = 8 // nbits
    v = v.reshape(v.shape[0], planes, span).astype(np.uint8)
    shifts = (np.arange(planes, dtype=np.uint8) * nbits).reshape(1, planes, 1)
    return np.bitwise_or.reduce(v << shifts, axis=1)


def _unplanes(b: np.ndarray, nbits: int) -> np.ndarray:
    """Inverse of _planes: [M, span] bytes -> [M, P*span]."""
    planes = 8 // nbits
    shifts = (np.arange(planes, dtype=np.uint8) * nbits).reshape(1, planes, 1)
    out = (b[:, None, :] >> shifts) & np.uint8((1 << nbits) - 1)
    return out.reshape(b.shape[0], -1)


def _f16(x: np.ndarray) -> np.ndarray:
    """[M] float32 (fp16-exact) -> [M, 2] little-endian fp16 bytes."""
    return x.astype("<f2").reshape(-1, 1).view(np.uint8)


def _from_f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").reshape(-1).astype(np.float32)


def _pack_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins -> 12 bytes."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    return np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
                           m[:, :4] | ((m[:, 4:] >> 4) << 6),
                           (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1)


def _unpack_k4_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([b[:, :4] & 63, (b[:, 8:] & 15) | ((b[:, :4] >> 6) << 4)], axis=1)
    m = np.concatenate([b[:, 4:8] & 63, (b[:, 8:] >> 4) | ((b[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _pack_q3_scales(sc: np.ndarray) -> np.ndarray:
    """Q3_K: 16 signed six-bit scales (stored +32) -> 12 bytes."""
    v = (sc + 32).astype(np.uint8)
    low = (v[:, :8] & 15) | ((v[:, 8:] & 15) << 4)
    high = _planes(v >> 4, 4, 2)  # scale j = 4k + i: byte 8 + i, bits 2k
    return np.concatenate([low, high], axis=1)


def _unpack_q3_scales(b: np.ndarray) -> np.ndarray:
    low = np.concatenate([b[:, :8] & 15, b[:, :8] >> 4], axis=1)
    return (low | (_unplanes(b[:, 8:12], 2) << 4)).astype(np.int16) - 32


# ==== the grids ==================================================================================
class _GgmlGrid(Grid):
    """What all GGML block types share: codes on ``levels``, decode ``dl*level[u] + off``, bytes.

    Each subclass is one GGML type and carries every fact about it (llama.cpp's ggml-cpu type
    traits and llama-quant.cpp): ``block`` and ``block_bytes`` (from gguf's GGML_QUANT_SIZES),
    ``vec_dot`` (the block type llama.cpp rounds the activations to before the dot product),
    ``fallback`` (what llama.cpp stores a row that is not a multiple of ``block`` as),
    ``file_type`` (general.file_type of a file mostly in this type) and ``needs_imatrix`` (llama.cpp
    refuses to make it without an importance matrix). A type is added in one place: its class.
    """

    block: ClassVar[int]
    block_bytes: ClassVar[int]
    vec_dot: ClassVar[str]
    fallback: ClassVar[str | None] = None
    needs_imatrix: ClassVar[bool] = False
    levels: ClassVar[_Levels]
    fp16_params: ClassVar[tuple[str, ...]]  # also the ones scale_rows multiplies
    int_params: ClassVar[dict[str, tuple[int, int]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.kind:
            cls.block, cls.block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[cls.kind.upper()]]
            _GGML_TYPES[cls.kind.upper()] = cls

    @property
    def type_name(self) -> str:
        """The gguf.GGMLQuantizationType member name."""
        return self.kind.upper()

    @property
    def file_type(self) -> gguf.LlamaFileType:
        """llama.cpp has file types per preset; a K type's is its _M preset's."""
        name = f"MOSTLY_{self.type_name}"
        return gguf.LlamaFileType.__members__.get(name) or gguf.LlamaFileType[f"{name}_M"]

    @property
    def n_codes(self) -> int:
        """Distinct per-weight codes."""
        return self.levels.n

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / self.block

    def spec(self) -> dict:
        return {"kind": self.kind}

    def _check_group(self, w: torch.Tensor) -> None:
        if w.dim() != 2 or w.shape[1] != self.block:
            raise D2Error(f"{self.type_name} fits whole blocks of {self.block} columns, got shape "
                          f"{tuple(w.shape)}; check the tensor with check_shape first")

    def check_shape(self, n_rows: int, n_cols: int) -> None:
        if n_cols % self.block:
            fits = sorted(k for k, c in _GGML_TYPES.items() if n_cols % c.block == 0)
            raise D2Error(f"{self.type_name} needs rows of a multiple of {self.block} weights but this "
                          f"tensor has {n_cols}; use one of: {', '.join(fits) or 'none (pad it)'}")

    # ---- decode model -----------------------------------------------------------------------
    @abstractmethod
    def _scale_offset(self, p: Params, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row scale and offset [N, n] for the block's columns ``cols``."""

    def _dl_off(self, p: Params, like: torch.Tensor, col0: int):
        cols = torch.arange(col0, col0 + (like.shape[1] if like.dim() == 2 else 1), device=like.device)
        dl, off = self._scale_offset(p, cols)
        if like.dim() == 1:
            dl, off = dl[:, 0], None if off is None else off[:, 0]
        return dl, off

    def _codes(self, w: torch.Tensor, dl: torch.Tensor, off: torch.Tensor | None) -> torch.Tensor:
        t = w.float() if off is None else w.float() - off
        return self.levels.code(t / _safe(dl))

    def _values(self, u: torch.Tensor, dl: torch.Tensor, off: torch.Tensor | None) -> torch.Tensor:
        y = dl * self.levels.value(u)
        return y if off is None else y + off

    def quantize(self, w: torch.Tensor, p: Params, col0: int = 0) -> torch.Tensor:
        return self._codes(w, *self._dl_off(p, w, col0)).to(torch.int16)

    def dequantize(self, q: torch.Tensor, p: Params, col0: int = 0) -> torch.Tensor:
        return self._values(q.float(), *self._dl_off(p, q, col0))

    def rounder(self, p: Params):
        """quantize + dequantize with the group's per-column scales and offsets decoded once (the
        same values; the column loop spent ~9 s of the README job recomputing them per column)."""
        dl, off = self._scale_offset(p, torch.arange(self.group, device=next(iter(p.values())).device))
        dl = dl.T.contiguous()
        off = None if off is None else off.T.contiguous()

        def round_column(w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
            oj = None if off is None else off[j]
            u = self._codes(w, dl[j], oj)
            return u.to(torch.int16), self._values(u, dl[j], oj)
        return round_column

    def scale_rows(self, p: Params, c: torch.Tensor) -> Params:
        c = c.float()
        out = dict(p)
        for k in self.fp16_params:
            out[k] = round_to_fp16(p[k] * c.reshape(-1, *([1] * (p[k].dim() - 1))))
        return out

    # ---- bytes ------------------------------------------------------------------------------
    def pack(self, codes, params: Params) -> np.ndarray:
        """codes [N, K] and params stacked over groups ([N|1, G, ...]) -> GGML bytes [N, G*block_bytes]."""
        codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
        if codes.ndim != 2:
            raise D2Error(f"{self.type_name} pack needs codes [rows, cols], got shape {codes.shape}")
        n, k = codes.shape
        self.check_shape(n, k)
        g = k // self.block
        if codes.min(initial=0) < 0 or codes.max(initial=0) >= self.n_codes:
            raise D2Error(f"{self.type_name} codes must lie in 0..{self.n_codes - 1}; "
                          "the tensor was not quantized on this grid")
        u = codes.reshape(n * g, self.block).astype(np.uint8)
        p = {}
        for name in (*self.fp16_params, *self.int_params):
            if name not in params:
                raise D2Error(f"{self.type_name} params lack {name!r}; "
                              "the tensor was not quantized on this grid")
            v = params[name]
            v = np.asarray(v.detach().cpu().float() if isinstance(v, torch.Tensor) else v, dtype=np.float32)
            v = np.broadcast_to(v, (n, g, *v.shape[2:])).reshape(n * g, *v.shape[2:])
            if name in self.fp16_params:
                if not np.array_equal(v.astype(np.float16).astype(np.float32), v, equal_nan=True):
                    raise D2Error(f"{self.type_name} param {name!r} holds values fp16 cannot store exactly; "
                                  "fit it with this grid (fit rounds to fp16)")
            else:
                lo, hi = self.int_params[name]
                if not (np.all(v == np.round(v)) and v.min(initial=lo) >= lo and v.max(initial=hi) <= hi):
                    raise D2Error(f"{self.type_name} param {name!r} must hold integers in {lo}..{hi}")
                v = v.astype(np.int16)
            p[name] = v
        raw = self._pack_blocks(u, p)
        assert raw.shape == (n * g, self.block_bytes)
        return raw.reshape(n, g * self.block_bytes)

    def unpack(self, raw, n_rows: int, n_cols: int) -> tuple[torch.Tensor, Params]:
        """GGML bytes of an [n_rows, n_cols] tensor -> (codes int16 [N, K], params [N, G, ...])."""
        self.check_shape(n_rows, n_cols)
        g = n_cols // self.block
        raw = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) \
            else np.asarray(raw, dtype=np.uint8)
        if raw.size != n_rows * g * self.block_bytes:
            want = n_rows * g * self.block_bytes
            raise D2Error(f"{self.type_name} data of {raw.size} bytes does not fit a [{n_rows}, {n_cols}] "
                          f"tensor ({want} bytes); the file is corrupt or mislabeled")
        u, p = self._unpack_blocks(raw.reshape(n_rows * g, self.block_bytes))
        codes = torch.from_numpy(u.astype(np.int16).reshape(n_rows, n_cols))
        params = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)
                                      .reshape(n_rows, g, *v.shape[1:])) for k, v in p.items()}
        return codes, params

    @abstractmethod
    def _pack_blocks(self, u: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
        """u [M, block] uint8, p[name] [M, ...] -> [M, block_bytes] uint8."""

    @abstractmethod
    def _unpack_blocks(self, raw: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """[M, block_bytes] uint8 -> (u [M, block], p[name] [M, ...])."""


# ---- 32-weight blocks ---------------------------------------------------------------------------
class _Block32Grid(_GgmlGrid):
    """Legacy types: one fp16 scale d per 32 weights, decode d*level[u] (Q4_1 adds an offset)."""

    group = 32
    vec_dot = "Q8_0"
    fp16_params = ("d",)

    def _scale_offset(self, p, cols):
        return p["d"].float().unsqueeze(-1).expand(-1, len(cols)), None

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        self._check_group(w)
        p = self._fit_blocks(w.float().unsqueeze(1), _importance(importance, w).unsqueeze(0))
        return {k: v[:, 0] for k, v in p.items()}

    def _fit_width(self, n_cols: int) -> int:
        return n_cols

    def _fit_rows(self, w: torch.Tensor, importance: torch.Tensor | None) -> list[Params]:
        """Every block of the rows at once: block by block, the calls spend most of their time in
        dispatch on small tensors."""
        n, k = w.shape
        self.check_shape(n, k)
        imp = torch.stack([_importance(None if importance is None else importance[c:c + 32], w[:, c:c + 32])
                           for c in range(0, k, 32)])
        p = self._fit_blocks(w.float().reshape(n, k // 32, 32), imp)
        return [{name: v[:, gi] for name, v in p.items()} for gi in range(k // 32)]

    def _fit_blocks(self, x: torch.Tensor, imp: torch.Tensor) -> Params:
        """x [..., 32] blocks, imp their column weights (broadcast) -> params [...]."""
        s, _ = _search_scale(x, imp, self.levels)
        best, best_e = None, None
        for _ in range(_POLISH_ROUNDS):  # store in fp16, requantize, refit by least squares
            p = {"d": round_to_fp16(s)}
            q = self.levels.nearest(x / _safe(p["d"]).unsqueeze(-1))
            e = (imp * (x - p["d"].unsqueeze(-1) * q) ** 2).sum(-1)
            best, best_e = _keep_better(best, best_e, p, e)
            wq = imp * q
            sqq = (wq * q).sum(-1)
            s = torch.where(sqq > 0, (wq * x).sum(-1) / sqq.clamp(min=1e-30), p["d"])
        return best

    def _pack_blocks(self, u, p):
        return np.concatenate([_f16(p["d"]), _planes(u, self.block // 2, 4)], axis=1)

    def _unpack_blocks(self, raw):
        return _unplanes(raw[:, 2:], 4), {"d": _from_f16(raw[:, :2])}


class Q4_0Grid(_Block32Grid):
    kind, bits = "q4_0", 4
    levels = _Levels.range(-8, 7)


class IQ4_NLGrid(_Block32Grid):
    kind, bits = "iq4_nl", 4
    levels = _Levels(list(KVALUES_IQ4NL))


class Q5_0Grid(_Block32Grid):
    kind, bits = "q5_0", 5
    levels = _Levels.range(-16, 15)

    def _pack_blocks(self, u, p):
        qh = np.packbits((u >> 4).astype(bool), axis=1, bitorder="little")  # uint32 LE, bit j = u[j] >> 4
        return np.concatenate([_f16(p["d"]), qh, _planes(u & 15, 16, 4)], axis=1)

    def _unpack_blocks(self, raw):
        high = np.unpackbits(raw[:, 2:6], axis=1, bitorder="little")
        return _unplanes(raw[:, 6:], 4) | (high << 4), {"d": _from_f16(raw[:, :2])}


class Q8_0Grid(_Block32Grid):
    kind, bits = "q8_0", 8
    levels = _Levels.range(-128, 127)  # code u = int8 value + 128

    def _pack_blocks(self, u, p):
        q = (u.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        return np.concatenate([_f16(p["d"]), q], axis=1)

    def _unpack_blocks(self, raw):
        q = np.ascontiguousarray(raw[:, 2:]).view(np.int8).astype(np.int16) + 128
        return q, {"d": _from_f16(raw[:, :2])}


class Q4_1Grid(_Block32Grid):
    kind, bits = "q4_1", 4
    vec_dot = "Q8_1"
    nmax = 15
    levels = _Levels.range(0, nmax)
    fp16_params = ("d", "m")

    def _scale_offset(self, p, cols):
        n = len(cols)
        return p["d"].float().unsqueeze(-1).expand(-1, n), p["m"].float().unsqueeze(-1).expand(-1, n)

    def _fit_blocks(self, x: torch.Tensor, imp: torch.Tensor) -> Params:
        s, o, _ = _search_affine(x, imp, self.nmax, offset_le_zero=False)
        best, best_e = None, None
        for _ in range(_POLISH_ROUNDS):
            p = {"d": round_to_fp16(s), "m": round_to_fp16(o)}
            d, m = p["d"].unsqueeze(-1), p["m"].unsqueeze(-1)
            u = self.levels.code((x - m) / _safe(d))
            e = (imp * (x - (d * u + m)) ** 2).sum(-1)
            best, best_e = _keep_better(best, best_e, p, e)
            s2, o2, ok = _lsq2(x, imp, u, torch.ones_like(x), -1)
            s, o = torch.where(ok, s2, p["d"]), torch.where(ok, o2, p["m"])
        return best

    def _pack_blocks(self, u, p):
        return np.concatenate([_f16(p["d"]), _f16(p["m"]), _planes(u, 16, 4)], axis=1)

    def _unpack_blocks(self, raw):
        return _unplanes(raw[:, 4:], 4), {"d": _from_f16(raw[:, :2]), "m": _from_f16(raw[:, 2:4])}


class Q5_1Grid(Q4_1Grid):
    kind, bits = "q5_1", 5
    nmax = 31
    levels = _Levels.range(0, nmax)

    def _pack_blocks(self, u, p):
        qh = np.packbits((u >> 4).astype(bool), axis=1, bitorder="little")  # as Q5_0
        return np.concatenate([_f16(p["d"]), _f16(p["m"]), qh, _planes(u & 15, 16, 4)], axis=1)

    def _unpack_blocks(self, raw):
        high = np.unpackbits(raw[:, 4:8], axis=1, bitorder="little")
        return (_unplanes(raw[:, 8:], 4) | (high << 4),
                {"d": _from_f16(raw[:, :2]), "m": _from_f16(raw[:, 2:4])})


# ---- 256-weight K-quant superblocks --------------------------------------------------------------
class _KQuantGrid(_GgmlGrid):
    """K-quants: fp16 d (and dmin) per 256 weights; per ``sub`` weights an integer scale sc (and min m).

    Decode: (d*sc)*level[u] - dmin*m.  Fit: float scale (and min) per sub-block, then d (and dmin)
    with the integer sc (and m) that best carry them, then a local search over each sub-block's
    integers and a least-squares refit of d/dmin, all against the true weighted error.
    """

    group = QK_K
    vec_dot = "Q8_K"
    sub: ClassVar[int]
    has_min: ClassVar[bool]
    sc_levels: ClassVar[_Levels]  # the allowed integer sub-scales (and mins, when has_min)

    @property
    def n_sub(self) -> int:
        return QK_K // self.sub

    def _scale_offset(self, p, cols):
        si = cols // self.sub
        dl = (p["d"].float().unsqueeze(-1) * p["sc"].float())[:, si]
        if not self.has_min:
            return dl, None
        return dl, -(p["dmin"].float().unsqueeze(-1) * p["m"].float())[:, si]

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        self._check_group(w)
        n = w.shape[0]
        x = w.float().reshape(n, self.n_sub, self.sub)
        imp = _importance(importance, w).reshape(1, self.n_sub, self.sub)
        if self.has_min:
            s, o, su2 = _search_affine(x, imp, self.levels.n - 1, offset_le_zero=True)
            d, _ = _search_scale(s, su2, self.sc_levels)
            dmin, _ = _search_scale(-o, imp.sum(-1).expand_as(o), self.sc_levels)
            p = {"d": round_to_fp16(d), "dmin": round_to_fp16(dmin)}
            p["sc"], p["m"] = self._nearest_int(s, p["d"]), self._nearest_int(-o, p["dmin"])
        else:
            s, sq2 = _search_scale(x, imp, self.levels)
            d, _ = _search_scale(s, sq2, self.sc_levels)
            p = {"d": round_to_fp16(d)}
            p["sc"] = self._nearest_int(s, p["d"])
        p, e = self._refine(x, imp, p, radius=2)
        for _ in range(_POLISH_ROUNDS - 1):
            p2 = self._refit_super(x, imp, p)
            p2, e2 = self._refine(x, imp, p2, radius=1)
            p, e = _keep_better(p, e, p2, e2)
        return p

    def _nearest_int(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.sc_levels.value(self.sc_levels.code(v / _safe(d).unsqueeze(-1)))

    def _sub_err(self, x, w, d, sc, dmin=None, m=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Requantize each sub-block with the given integers: (error [N, S], codes [N, S, sub])."""
        dl = (d.unsqueeze(-1) * sc).unsqueeze(-1)
        if dmin is None:
            u = self.levels.code(x / _safe(dl))
            y = dl * self.levels.value(u)
        else:
            ml = (dmin.unsqueeze(-1) * m).unsqueeze(-1)
            u = self.levels.code((x + ml) / _safe(dl))
            y = dl * u - ml
        return (w * (y - x) ** 2).sum(-1), u

    def _refine(self, x, w, p: Params, radius: int) -> tuple[Params, torch.Tensor]:
        """Per sub-block, the best integers within ``radius`` of the current ones (d, dmin fixed)."""
        lo, hi = self.sc_levels.lo, self.sc_levels.hi
        best_e = torch.full_like(p["sc"], float("inf"))
        best = {k: v.clone() for k, v in p.items()}
        steps = range(-radius, radius + 1)
        for ds in steps:
            sc = (p["sc"] + ds).clamp(lo, hi)
            for dm in (steps if self.has_min else [0]):
                m = (p["m"] + dm).clamp(lo, hi) if self.has_min else None
                e, _ = self._sub_err(x, w, p["d"], sc, p.get("dmin"), m)
                take = e < best_e
                best["sc"] = torch.where(take, sc, best["sc"])
                if self.has_min:
                    best["m"] = torch.where(take, m, best["m"])
                best_e = torch.minimum(e, best_e)
        return best, best_e.sum(1)

    def _refit_super(self, x, w, p: Params) -> Params:
        """Least-squares d (and dmin) for the current codes and integers, in fp16, integers rescaled."""
        _, u = self._sub_err(x, w, p["d"], p["sc"], p.get("dmin"), p.get("m"))
        a = p["sc"].unsqueeze(-1) * self.levels.value(u)
        out = dict(p)
        if self.has_min:
            d, dmin, ok = _lsq2(x, w, a, (-p["m"]).unsqueeze(-1).expand_as(x), (1, 2))
            out["dmin"] = round_to_fp16(torch.where(ok & (dmin > 0), dmin, p["dmin"]))
            out["m"] = self._nearest_int(p["m"] * p["dmin"].unsqueeze(-1), out["dmin"])
        else:
            wa = w * a
            saa = (wa * a).sum((1, 2))
            ok = saa > 0
            d = (wa * x).sum((1, 2)) / saa.clamp(min=1e-30)
        out["d"] = round_to_fp16(torch.where(ok & (d != 0), d, p["d"]))
        out["sc"] = self._nearest_int(p["sc"] * p["d"].unsqueeze(-1), out["d"])
        return out


class Q2_KGrid(_KQuantGrid):
    kind, bits, sub, has_min, fallback = "q2_k", 2, 16, True, "q4_0"
    levels, sc_levels = _Levels.range(0, 3), _Levels.range(0, 15)
    fp16_params = ("d", "dmin")
    int_params = {"sc": (0, 15), "m": (0, 15)}

    def _pack_blocks(self, u, p):
        sc = p["sc"].astype(np.uint8) | (p["m"].astype(np.uint8) << 4)
        qs = _planes(u.reshape(-1, 128), 32, 2).reshape(-1, 64)
        return np.concatenate([sc, qs, _f16(p["d"]), _f16(p["dmin"])], axis=1)

    def _unpack_blocks(self, raw):
        u = _unplanes(raw[:, 16:80].reshape(-1, 32), 2).reshape(-1, QK_K)
        return u, {"d": _from_f16(raw[:, 80:82]), "dmin": _from_f16(raw[:, 82:84]),
                   "sc": raw[:, :16] & 15, "m": raw[:, :16] >> 4}


class Q3_KGrid(_KQuantGrid):
    kind, bits, sub, has_min, fallback = "q3_k", 3, 16, False, "q4_0"
    levels, sc_levels = _Levels.range(-4, 3), _Levels.range(-32, 31)  # code u = value + 4
    fp16_params = ("d",)
    int_params = {"sc": (-32, 31)}

    def _pack_blocks(self, u, p):
        hmask = _planes(u >> 2, 32, 1)  # bit k of byte b: weight 32k + b
        qs = _planes((u & 3).reshape(-1, 128), 32, 2).reshape(-1, 64)
        return np.concatenate([hmask, qs, _pack_q3_scales(p["sc"]), _f16(p["d"])], axis=1)

    def _unpack_blocks(self, raw):
        high = _unplanes(raw[:, :32], 1)
        low = _unplanes(raw[:, 32:96].reshape(-1, 32), 2).reshape(-1, QK_K)
        return low | (high << 2), {"d": _from_f16(raw[:, 108:110]), "sc": _unpack_q3_scales(raw[:, 96:108])}


class Q4_KGrid(_KQuantGrid):
    kind, bits, sub, has_min, fallback = "q4_k", 4, 32, True, "q5_0"
    levels, sc_levels = _Levels.range(0, 15), _Levels.range(0, 63)
    fp16_params = ("d", "dmin")
    int_params = {"sc": (0, 63), "m": (0, 63)}

    def _pack_blocks(self, u, p):
        qs = _planes(u.reshape(-1, 64), 32, 4).reshape(-1, 128)
        return np.concatenate([_f16(p["d"]), _f16(p["dmin"]), _pack_k4_scales(p["sc"], p["m"]), qs], axis=1)

    def _unpack_blocks(self, raw):
        sc, m = _unpack_k4_scales(raw[:, 4:16])
        u = _unplanes(raw[:, 16:].reshape(-1, 32), 4).reshape(-1, QK_K)
        return u, {"d": _from_f16(raw[:, :2]), "dmin": _from_f16(raw[:, 2:4]), "sc": sc, "m": m}


class Q5_KGrid(_KQuantGrid):
    kind, bits, sub, has_min, fallback = "q5_k", 5, 32, True, "q5_1"
    levels, sc_levels = _Levels.range(0, 31), _Levels.range(0, 63)
    fp16_params = ("d", "dmin")
    int_params = {"sc": (0, 63), "m": (0, 63)}

    def _pack_blocks(self, u, p):
        qh = _planes(u >> 4, 32, 1)  # bit k of byte b: weight 32k + b
        qs = _planes((u & 15).reshape(-1, 64), 32, 4).reshape(-1, 128)
        return np.concatenate([_f16(p["d"]), _f16(p["dmin"]), _pack_k4_scales(p["sc"], p["m"]), qh, qs],
                              axis=1)

    def _unpack_blocks(self, raw):
        sc, m = _unpack_k4_scales(raw[:, 4:16])
        high = _unplanes(raw[:, 16:48], 1)
        low = _unplanes(raw[:, 48:].reshape(-1, 32), 4).reshape(-1, QK_K)
        return low | (high << 4), {"d": _from_f16(raw[:, :2]), "dmin": _from_f16(raw[:, 2:4]),
                                   "sc": sc, "m": m}


class Q6_KGrid(_KQuantGrid):
    kind, bits, sub, has_min, fallback = "q6_k", 6, 16, False, "q8_0"
    levels, sc_levels = _Levels.range(-32, 31), _Levels.range(-128, 127)  # code u = value + 32
    fp16_params = ("d",)
    int_params = {"sc": (-128, 127)}

    def _pack_blocks(self, u, p):
        halves = u.reshape(-1, 128)  # per 128 weights: 64 low-nibble bytes, 32 bytes of high pairs
        ql = _planes(halves & 15, 64, 4).reshape(-1, 128)
        qh = _planes(halves >> 4, 32, 2).reshape(-1, 64)
        sc = p["sc"].astype(np.int8).view(np.uint8)
        return np.concatenate([ql, qh, sc, _f16(p["d"])], axis=1)

    def _unpack_blocks(self, raw):
        low = _unplanes(raw[:, :128].reshape(-1, 64), 4)
        high = _unplanes(raw[:, 128:192].reshape(-1, 32), 2)
        u = (low | (high << 4)).reshape(-1, QK_K)
        sc = np.ascontiguousarray(raw[:, 192:208]).view(np.int8)
        return u, {"d": _from_f16(raw[:, 208:210]), "sc": sc}


class IQ4_XSGrid(_KQuantGrid):
    """IQ4_NL's 16 non-uniform levels with a 6-bit signed scale per 32 weights in 256-superblocks."""

    kind, bits, sub, has_min, fallback = "iq4_xs", 4, 32, False, "iq4_nl"
    levels, sc_levels = _Levels(list(KVALUES_IQ4NL)), _Levels.range(-32, 31)
    fp16_params = ("d",)
    int_params = {"sc": (-32, 31)}

    def _pack_blocks(self, u, p):
        v = (p["sc"] + 32).astype(np.uint16)  # 6 bits per sub-block: low 4 in scales_l, high 2 in scales_h
        high = np.bitwise_or.reduce(((v >> 4) & 3) << (2 * np.arange(8, dtype=np.uint16)), axis=1)
        low = (v[:, 0::2] & 15) | ((v[:, 1::2] & 15) << 4)
        qs = _planes(u.reshape(-1, 32), 16, 4).reshape(-1, 128)  # per 32: byte b = u[b] | u[16 + b] << 4
        return np.concatenate([_f16(p["d"]), high.astype("<u2").reshape(-1, 1).view(np.uint8),
                               low.astype(np.uint8), qs], axis=1)

    def _unpack_blocks(self, raw):
        high = np.ascontiguousarray(raw[:, 2:4]).view("<u2").reshape(-1, 1) >> (2 * np.arange(8, dtype=np.uint16))
        low = np.stack([raw[:, 4:8] & 15, raw[:, 4:8] >> 4], axis=2).reshape(-1, 8)
        sc = (low.astype(np.int16) | ((high & 3).astype(np.int16) << 4)) - 32
        u = _unplanes(raw[:, 8:].reshape(-1, 16), 4).reshape(-1, QK_K)
        return u, {"d": _from_f16(raw[:, :2]), "sc": sc}


def _keep_better(best: Params | None, best_e: torch.Tensor | None, p: Params, e: torch.Tensor):
    """Per row, keep whichever of two param sets has the lower error."""
    if best is None:
        return p, e
    take = e < best_e  # per row (and block): params may carry trailing axes of their own
    out = {k: torch.where(take.reshape(*take.shape, *([1] * (v.dim() - take.dim()))), p[k], v)
           for k, v in best.items()}
    return out, torch.minimum(e, best_e)


def ggml_types() -> dict[str, type[_GgmlGrid]]:
    """Every GGML type we calibrate onto, by its gguf name."""
    return dict(_GGML_TYPES)


def ggml_grid(type_name: str) -> _GgmlGrid:
    """The grid of a GGML type by its gguf name (``"Q4_K"``)."""
    cls = _GGML_TYPES.get(type_name.upper())
    if cls is None:
        raise D2Error(f"no grid for GGML type {type_name!r}; known: {', '.join(_GGML_TYPES)}")
    return cls()
