"""GPTQ column solver over any grid, and round-to-nearest on the same grids.

The solver quantizes each column onto the grid that will be written, fitting a group's parameters
when the column loop reaches its first column (from the error-updated weights), so the result is
exactly representable by the target format.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from d2quant.errors import D2Error
from d2quant.grids import Grid, Params, row_params, stack_params


@dataclass
class Solved:
    codes: torch.Tensor  # int16 [N, K]
    params: Params  # stacked over groups
    weight: torch.Tensor  # float32 [N, K], exactly grid.dequantize_matrix(codes, params)
    error: float  # Hessian-weighted relative error tr(E H E^T) / tr(W H W^T)


_OUTER_THREADS: list[int] = []  # the thread counts single_thread() replaced, innermost last


@contextmanager
def single_thread():
    """The solver's small matrices and column ops run faster on one thread, and many times faster
    when the cores are shared (OpenMP threads spin on each other): 0.75 s vs 12 s for one
    1536x1536 Cholesky on this 2-core machine under load."""
    n = torch.get_num_threads()
    _OUTER_THREADS.append(n)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _OUTER_THREADS.pop()
        torch.set_num_threads(n)


@contextmanager
def outer_threads():
    """Inside single_thread(): the threads from before it, for a whole matrix's grid fit, which is
    wide elementwise work (1.7-2x on two idle cores for a Q4_0 / Q4_K fit of SmolLM2's matrices)
    and gives the same bits at any thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(_OUTER_THREADS[-1] if _OUTER_THREADS else n)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# the error goes by blocks of rows (and of H's columns): whole, the float64 copies of an embedding
# table, or of H and the weights of a wide linear, were GBs
ERROR_ROWS, ERROR_COLS = 4096, 1024


def _row_blocks(n: int):
    return (slice(i, min(n, i + ERROR_ROWS)) for i in range(0, n, ERROR_ROWS))


def _error_terms(w: torch.Tensor, q: torch.Tensor) -> tuple[float, float]:
    w = w.double()
    return float(((q.double() - w) ** 2).sum()), float((w * w).sum())


def _hessian_terms(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor):
    """(e H e^T, w H w^T) of each block of rows and of H's columns."""
    for rows in _row_blocks(w.shape[0]):
        wi, ei = w[rows].double(), (q[rows] - w[rows]).double()
        for c in range(0, h.shape[1], ERROR_COLS):
            hc, cols = h[:, c:c + ERROR_COLS].double(), slice(c, c + ERROR_COLS)
            yield float(((ei @ hc) * ei[:, cols]).sum()), float(((wi @ hc) * wi[:, cols]).sum())


def _relative(terms) -> float:
    num = den = 0.0
    for n_i, d_i in terms:
        num, den = num + n_i, den + d_i
    return num / max(den, 1e-30)


def weighted_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor | None) -> float:
    if h is None:
        return _relative(_error_terms(w[rows], q[rows]) for rows in _row_blocks(w.shape[0]))
    return _relative(_hessian_terms(w, q, h))


def rtn(w: torch.Tensor, grid: Grid, h: torch.Tensor | None = None, in_place: bool = False) -> Solved:
    """Round-to-nearest. in_place (float32 w, no H, a row-independent grid): w's values become the
    dequantized ones block by block, so a vocabulary table is never held twice (0.9 GB on Qwen's)."""
    with outer_threads():
        codes, params = grid.quantize_matrix(w.float())
    if not (in_place and h is None and grid.rows_independent and w.dtype == torch.float32):
        q = grid.dequantize_matrix(codes, params)
        return Solved(codes, params, q, weighted_error(w, q, h))

    def rounded_back():
        for rows in _row_blocks(w.shape[0]):
            q = grid.dequantize_matrix(codes[rows], row_params(params, rows, w.shape[0]))
            terms = _error_terms(w[rows], q)
            w[rows] = q
            yield terms
    return Solved(codes, params, w, _relative(rounded_back()))


def gptq(w: torch.Tensor, h: torch.Tensor, grid: Grid, damp: float = 0.01,
         block: int = 128, act_order: bool = False, shrink: float = 0.0, scale_fit: str = "diag") -> Solved:
    """GPTQ of one weight (see gptq_rows)."""
    return gptq_rows([w], h, grid, damp, block, act_order, shrink, scale_fit=scale_fit)[0]


def gptq_rows(ws: list[torch.Tensor], h: torch.Tensor, grid: Grid, damp: float = 0.01,
              block: int = 128, act_order: bool = False, shrink: float = 0.0,
              cross: torch.Tensor | None = None, scale_fit: str = "diag") -> list[Solved]:
    """GPTQ (Frantar et al.) with lazy block updates; groups never straddle a block.

    shrink: solve with H' = (1 - shrink) H + shrink diag(H). At 1 the off-diagonal correlations,
    which carry the error feedback between columns, are gone: importance-weighted rounding, what an
    imatrix does. Between, the feedback trusts the calibration text's correlations less.

    act_order: visit columns by decreasing Hessian diagonal (the most input-energetic first, while
    the least error has accumulated). A group's columns are then scattered through the visit
    order, so every group's parameters are fit up front on the original weights ("static
    groups") instead of on the error-updated ones when the loop reaches the group.

    scale_fit: how each column's error is weighed when a group's scales are fit. "diag": by H_jj, as
    llama.cpp weighs with an imatrix. "conditional": by the energy left in column j after the columns
    GPTQ visits later have compensated what they can, 1/U_jj^2 = H_jj - H_j,later H_later^-1 H_later,j
    (U the upper Cholesky factor of the shrunk and damped H's inverse, in visit order), the weight
    GPTQ's own step puts on that column's rounding error. For a diagonal H it is H_jj plus the damping.

    cross: C = 2/n X_f^T X, the inputs X the quantized model gives the linear against the X_f the
    float model gives it (H = 2/n X^T X). Then the objective is ||Q X - W X_f||^2, which is the usual
    one towards the target W* = W + W (C - H) H^-1 (the least-squares map from X to W X_f) plus a
    constant, so GPTQ runs on W*. C is shrunk and H damped as H is: with no drift (C = H), W* = W.

    A vector grid (``grid.solve_unit`` > 1: llama.cpp's codebook types) is solved unit by unit (the
    LDLQ / GPTVQ step): the unit's columns are coded together, each weighted by the diagonal of
    the unit's block of the remaining problem's Hessian, [(U_uu^T U_uu)^-1]_jj with U the upper
    Cholesky factor of H^-1; the error is pushed into the later columns exactly, through
    (W_u - Q_u) U_uu^-1 U_u,rest. Act order permutes whole units, by their summed diagonal.

    ws: weights that read the same input (so one H), solved as one matrix of stacked rows: GPTQ
    treats rows independently, so on a grid whose rows fit independently this is the result of
    solving each alone, with one column loop instead of several (q/k, gate/up). One Solved each.
    """
    if len(ws) > 1 and not grid.rows_independent:
        raise D2Error(f"{grid!r} fits its parameters across rows; solve these weights one by one")
    sizes = [t.shape[0] for t in ws]
    w = torch.cat([t.detach().float() for t in ws])  # a copy, even of one
    n, k = w.shape
    h = h.detach().float().clone()
    if shrink:  # in place: at 8 960 inputs each k x k temporary is 0.3 GB
        d = torch.diag(h)
        h.mul_(1 - shrink).diagonal().add_(shrink * d)
        cross = None if cross is None else (1 - shrink) * cross + shrink * torch.diag(torch.diag(cross))
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if cross is not None:
        w = _asymmetric_target(w, h, cross.float(), damp)
    w_in = w  # w is changed in place from here, unless act order copies it
    h_orig_diag = torch.diag(h)
    g = grid.group
    unit = getattr(grid, "solve_unit", 1)
    if act_order:
        if unit == 1:
            perm = torch.argsort(h_orig_diag, descending=True)
        else:  # whole units, by their summed energy
            order = torch.argsort(h_orig_diag.reshape(-1, unit).sum(1), descending=True)
            perm = (order[:, None] * unit + torch.arange(unit, device=w.device)).reshape(-1)
        w, h = w[:, perm], _permuted(h, perm)  # the original order is restored for the error below
    else:
        perm = torch.arange(k, device=w.device)
        block = g * max(1, block // g)
        w = w.clone()
    # k x k copies held from here: h (permuted) and hinv; at 8 960 inputs (Qwen's down_proj) each is
    # 0.3 GB, and at an 8B's 14 336 0.8 GB
    hinv = _inverse_factor(h, damp)
    importance = h_orig_diag
    if scale_fit == "conditional":  # 1 / U_jj^2 = H_jj - H_j,later H_later^-1 H_later,j (damped)
        importance = torch.empty_like(h_orig_diag)
        importance[perm] = torch.diag(hinv) ** -2
    static = None
    if act_order:
        with outer_threads():
            static = grid.fit_groups(w_in, importance)
    rounders = None if static is None or unit > 1 else [grid.rounder(p) for p in static]
    codes = torch.zeros(n, k, dtype=torch.int16, device=w.device)
    q_all = torch.zeros_like(w)
    per_group: list[Params] = []
    cols = perm.tolist()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        hinv1 = hinv[i1:i2, i1:i2]
        if unit > 1:
            w1 = w[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            _vector_block(grid, w1, err1, hinv1, cols[i1:i2], static, per_group, importance, codes, q_all)
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
            continue
        # the block transposed, so that a column and the rows the update below touches are contiguous
        # (twice as fast on SmolLM2's stacked gate/up); the same products and differences as [N, block]
        w1t = w[:, i1:i2].T.contiguous()
        err1t = torch.zeros_like(w1t)
        round_column = None
        for i in range(i2 - i1):
            col = cols[i1 + i]  # the weight's own column index
            if static is not None:
                round_column = rounders[col // g]
            elif col % g == 0:  # the group's [N, g] columns, error-updated so far
                p = grid.fit(w1t[i:i + g].T.contiguous(), importance[col:col + g])
                per_group.append(p)
                round_column = grid.rounder(p)
            wc = w1t[i]
            qc, dq = round_column(wc, col % g)
            codes[:, col] = qc
            q_all[:, col] = dq
            e = (wc - dq) / hinv1[i, i]
            w1t[i:] -= hinv1[i, i:].unsqueeze(1) * e.unsqueeze(0)
            err1t[i] = e
        w[:, i2:] -= err1t.T.contiguous() @ hinv[i1:i2, i2:]
    params = stack_params(static if static is not None else per_group)
    del hinv, hinv1  # the last block's view would keep the factor alive
    h_raw = _permuted(h, torch.argsort(perm)) if act_order else h
    del h
    out, r = [], 0
    for size in sizes:
        rows = slice(r, r + size)
        part = {name: v[rows] if v.shape[0] == n else v for name, v in params.items()}
        out.append(Solved(codes[rows], part, q_all[rows], weighted_error(w_in[rows], q_all[rows], h_raw)))
        r += size
    return out


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp mean(diag H) I, a new tensor."""
    d = h.clone()
    d.diagonal().add_(damp * torch.mean(torch.diag(h)))
    return d


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of the damped H's inverse, in one new k x k buffer.

    LAPACK factors and inverts a column-major matrix in place, while torch copies a row-major one
    into a temporary at each step (three k x k allocations beside the result). H is symmetric, so
    its buffer read column-major is the same matrix; the factor comes out column-major and the
    buffer is transposed in place at the end. The same LAPACK calls as on row-major copies, so the
    same bits."""
    d = _damped_inverse(h, damp)
    t = d.mT
    torch.linalg.cholesky(t, upper=True, out=t)
    _transpose_in_place(d)
    return d


def _damped_inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The damped H's inverse in one new k x k buffer (symmetric, so the column-major LAPACK result
    read row-major is the same matrix; see _inverse_factor)."""
    d = _damped(h, damp)
    t = d.mT
    _cholesky(t, out=t)
    torch.cholesky_inverse(t, out=t)
    return d


def _cholesky(h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    try:
        return torch.linalg.cholesky(h, out=out)
    except torch._C._LinAlgError:
        raise D2Error("the Hessian is not positive definite even after damping; raise --damp "
                      "or use more calibration samples")


_SQUARE_BLOCK = 512


def _transpose_in_place(a: torch.Tensor) -> None:
    """a (square) becomes its transpose, one pair of blocks at a time (a block's copy beside it)."""
    k, b = a.shape[0], _SQUARE_BLOCK
    for i in range(0, k, b):
        for j in range(i, k, b):
            upper_t = a[i:i + b, j:j + b].T.clone()  # on the diagonal, the block's own transpose
            if j != i:
                a[i:i + b, j:j + b] = a[j:j + b, i:i + b].T
            a[j:j + b, i:i + b] = upper_t


def _permuted(h: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """h[perm][:, perm] by blocks of rows through one reused buffer: whole, h[perm] was a second
    k x k temporary, and a new temporary per block left that much again resident in the heap."""
    out = torch.empty_like(h)
    rows = torch.empty(_SQUARE_BLOCK, h.shape[1], dtype=h.dtype, device=h.device)
    for r in range(0, h.shape[0], _SQUARE_BLOCK):
        sel = perm[r:r + _SQUARE_BLOCK]
        buf = rows[:len(sel)]
        torch.index_select(h, 0, sel, out=buf)
        torch.index_select(buf, 1, perm, out=out[r:r + len(sel)])
    return out


def _asymmetric_target(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """W* = W + W (C - H) H^-1 with H damped as the solve damps it (see gptq_rows)."""
    return w + (w @ (cross - h)) @ _damped_inverse(h, damp)


def _vector_block(grid, w1, err1, hinv1, cols, static, per_group, importance, codes, q_all) -> None:
    """One lazy block of GPTQ on a vector grid, unit by unit (see gptq); fills err1 for the block."""
    g, unit = grid.group, grid.solve_unit
    p = None
    for i in range(0, w1.shape[1], unit):
        col = cols[i]  # the unit's first column (units are contiguous in the weight's own order)
        if static is not None:
            p = static[col // g]
        elif col % g == 0:
            p = grid.fit(w1[:, i:i + g], importance[col:col + g])
            per_group.append(p)
        u_uu = hinv1[i:i + unit, i:i + unit]
        weight = torch.diag(torch.linalg.inv(u_uu.T @ u_uu))
        wu = w1[:, i:i + unit]
        qu = grid.quantize_units(wu, p, col % g, weight)
        dq = grid.dequantize(qu, p, col % g)
        codes[:, col:col + unit], q_all[:, col:col + unit] = qu, dq
        e = torch.linalg.solve_triangular(u_uu, wu - dq, upper=True, left=False)  # (W_u - Q_u) U_uu^-1
        w1[:, i + unit:] -= e @ hinv1[i:i + unit, i + unit:]
        err1[:, i:i + unit] = e
