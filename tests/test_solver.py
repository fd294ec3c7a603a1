"""GPTQ solver tests on random heavy-tailed matrices with correlated inputs."""

import pytest
import torch

from d2quant.grids import DualScaleGrid, ResidualBinaryGrid, UniformGrid, grid_from_spec
from d2quant.solver import gptq, gptq_rows, outer_threads, rtn, single_thread


def problem(n=96, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, k, generator=g).pow(3)
    mix = torch.randn(k, k, generator=g) * 0.2 + torch.eye(k)
    x = torch.randn(2048, k, generator=g) @ mix * (torch.rand(k, generator=g) * 4 + 0.1)
    return w, 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("grid", [UniformGrid(2, 64), UniformGrid(3, 32), UniformGrid(4, 128),
                                  ResidualBinaryGrid(2, 64), DualScaleGrid(UniformGrid(3, 64).spec())],
                         ids=repr)
def test_gptq_beats_rtn_on_hessian_error(grid):
    w, h = problem()
    g, r = gptq(w, h, grid), rtn(w, grid, h)
    assert g.error < 0.85 * r.error, (g.error, r.error)
    # what the solver reports is exactly what the grid decodes from its codes
    assert torch.equal(grid.dequantize_matrix(g.codes, g.params), g.weight)


def test_dead_columns_and_partial_group():
    w, h = problem(k=96)
    h[5, :] = h[:, 5] = 0
    s = gptq(w, h, UniformGrid(3, 64))
    assert s.codes.shape == (96, 96) and torch.isfinite(s.weight).all()
    assert torch.all(s.weight[:, 5] == UniformGrid(3, 64).dequantize_matrix(s.codes, s.params)[:, 5])


@pytest.mark.parametrize("grid", [UniformGrid(3, 64), DualScaleGrid({"kind": "q3_k"})], ids=repr)
def test_act_order_visits_columns_by_energy_with_static_groups(grid):
    """Act order is still exactly on the grid, and on inputs whose energy varies 40x across
    columns it beats the natural order (here by a quarter or more)."""
    w, h = problem(k=256)
    a, n = gptq(w, h, grid, act_order=True), gptq(w, h, grid)
    assert torch.equal(grid.dequantize_matrix(a.codes, a.params), a.weight)
    assert a.error < 0.9 * n.error, (a.error, n.error)
    assert a.error < 0.85 * rtn(w, grid, h).error


def test_asymmetric_gptq_fits_the_float_output_not_the_drifted_one():
    """With the cross moment of drifted inputs X~ against the float X, GPTQ minimises ||Q X~ - W X||:
    on a 4-bit grid it lands far closer to the float output than plain GPTQ on X~ does (which
    cannot see the drift), and without drift (C = H) it is plain GPTQ bit for bit."""
    g = torch.Generator().manual_seed(3)
    w, _ = problem()
    x = torch.randn(2048, 256, generator=g) * (torch.rand(256, generator=g) * 2 + 0.1)
    xq = x @ (torch.eye(256) + 0.1 * torch.randn(256, 256, generator=g)) + 0.05 * torch.randn(2048, 256, generator=g)
    h, c = 2 * xq.T @ xq / 2048, 2 * x.T @ xq / 2048
    grid = UniformGrid(4, 64)
    plain, asym = gptq_rows([w], h, grid)[0], gptq_rows([w], h, grid, cross=c)[0]
    miss = lambda s: float((xq @ s.weight.T - x @ w.T).pow(2).sum() / (x @ w.T).pow(2).sum())  # noqa: E731
    assert miss(asym) < 0.5 * miss(plain), (miss(asym), miss(plain))
    for shrink in (0.0, 0.5):
        same = gptq_rows([w], h, grid, shrink=shrink, cross=h)[0]
        assert torch.equal(same.codes, gptq_rows([w], h, grid, shrink=shrink)[0].codes)


def test_shrinking_the_hessian_to_its_diagonal_removes_the_error_feedback():
    """shrink=1 keeps only diag(H): every column is rounded on its own, as an importance matrix
    weighs rounding; in between, the error is between that and full GPTQ's."""
    w, h = problem(k=128)
    grid = UniformGrid(3, 64)
    full, diag = gptq(w, h, grid, act_order=True), gptq(w, h, grid, act_order=True, shrink=1.0)
    for g0 in range(0, 128, 64):
        p = grid.fit(w[:, g0:g0 + 64], torch.diag(h)[g0:g0 + 64])
        assert torch.equal(diag.codes[:, g0:g0 + 64], grid.quantize(w[:, g0:g0 + 64], p))
    half = gptq(w, h, grid, act_order=True, shrink=0.5)
    assert full.error < half.error < diag.error
    assert torch.equal(gptq(w, h, grid, act_order=True, shrink=0.0).codes, full.codes)


@pytest.mark.parametrize("act_order", [True, False])
def test_conditional_scale_fit_weighs_each_column_by_what_later_columns_leave(act_order, monkeypatch):
    """scale_fit="conditional" fits every group's scales with column j weighted by its Schur
    complement against the columns visited after it (in the damped H), GPTQ's own step weight; on a
    diagonal H that is H_jj, so both fits give the same bits."""
    w, h = problem(k=128)
    grid, damp = UniformGrid(3, 64), 0.01
    seen = []
    entry = "fit_groups" if act_order else "fit"  # static groups are fit up front, dynamic ones in turn
    fitter = getattr(grid, entry)
    monkeypatch.setattr(grid, entry, lambda w_, imp: seen.append(imp.clone()) or fitter(w_, imp))
    s = gptq(w, h, grid, damp=damp, act_order=act_order, scale_fit="conditional")
    assert torch.equal(grid.dequantize_matrix(s.codes, s.params), s.weight)
    imp = torch.cat(seen)
    hd = (h + damp * h.diag().mean() * torch.eye(128)).double()
    order = torch.argsort(h.diag(), descending=True).tolist() if act_order else list(range(128))
    for at, j in enumerate(order):
        later = order[at + 1:]
        schur = hd[j, j] - (hd[j, later] @ torch.linalg.solve(hd[later][:, later], hd[later, j]) if later else 0)
        assert imp[j].item() == pytest.approx(schur.item(), rel=1e-3)
    assert (imp / hd.diag().float()).mean() < 0.95  # later columns explain part of the columns
    d = torch.diag(4.0 ** torch.randint(-3, 4, (128,)).float())
    for ao in (True, False):
        diag, cond = (gptq(w, d, grid, damp=0.0, act_order=ao, scale_fit=f) for f in ("diag", "conditional"))
        assert torch.equal(diag.codes, cond.codes) and torch.equal(diag.weight, cond.weight)


@pytest.mark.parametrize("name", ["IQ2_XXS", "IQ3_XXS", "IQ3_S"])  # IQ3_XXS: a parity spans 2 units
@pytest.mark.parametrize("act_order", [False, True])
def test_vector_gptq_on_codebook_grids_is_exact_and_beats_rounding(name, act_order):
    """The LDLQ step on llama.cpp's codebook grids: every unit a codebook point, the decoded
    weights exactly what the solver reports, and a lower Hessian-weighted error than rounding."""
    from d2quant.grids.ggml import ggml_grid

    w, h = problem(n=64, k=512)
    grid = ggml_grid(name)
    s = gptq(w, h, grid, act_order=act_order)
    assert torch.equal(grid.dequantize_matrix(s.codes, s.params), s.weight)
    grid.pack(s.codes, s.params)  # valid codebook points (and sign parity) or it raises
    assert s.error < 0.9 * rtn(w, grid, h).error, (s.error, rtn(w, grid, h).error)


@pytest.mark.parametrize("grid", [UniformGrid(3, 64), "Q4_0", "Q4_K", "IQ3_S"], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_weights_sharing_an_input_solved_as_one_equal_each_alone(grid, act_order):
    """q/k or gate/up stacked into one GPTQ problem: each row is solved as if alone (codes,
    parameters, weights and each weight's own error)."""
    from d2quant.grids.ggml import ggml_grid
    from d2quant.solver import gptq_rows

    grid = ggml_grid(grid) if isinstance(grid, str) else grid
    w, h = problem(n=96, k=512)
    parts = [w[:64], w[64:]]
    alone = [gptq(p, h, grid, act_order=act_order, shrink=0.5) for p in parts]
    for a, b in zip(alone, gptq_rows(parts, h, grid, act_order=act_order, shrink=0.5)):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight) and a.error == b.error
        assert a.params.keys() == b.params.keys() and all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_grids_fitting_across_rows_are_not_stacked():
    from d2quant.errors import D2Error
    from d2quant.solver import gptq_rows

    w, h = problem(k=128)
    with pytest.raises(D2Error, match="across rows"):
        gptq_rows([w[:48], w[48:]], h, ResidualBinaryGrid(2, 64))


@pytest.mark.parametrize("kind", ["q4_0", "q4_k", "q6_k", "iq4_xs"])
def test_whole_matrix_fits_use_the_outer_threads_and_give_the_same_bits(kind):
    """The solver runs on one thread but fits whole matrices on the threads it was given: the
    same params at any thread count."""
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.Laplace(0.0, 0.02).sample((96, 512)) * (0.5 + torch.rand(96, 1, generator=g))
    imp = torch.rand(512, generator=g) ** 2 + 0.1
    grid, before = grid_from_spec({"kind": kind}), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_thread():
            assert torch.get_num_threads() == 1
            with outer_threads():
                assert torch.get_num_threads() == 2
                two = grid.fit_groups(w, imp)
            assert torch.get_num_threads() == 1
            one = grid.fit_groups(w, imp)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(one, two) for k in a)


@pytest.mark.parametrize("kind", ["q4_0", "q3_k", "q6_k", "iq2_xs"])
def test_rtn_in_place_is_the_copying_rtn_without_a_second_table(kind, monkeypatch):
    """The vocabulary tables are rounded in place (the float copy becomes the dequantized one block
    by block): the same codes, weights and error as rounding into a new tensor."""
    import d2quant.solver as solver

    monkeypatch.setattr(solver, "ERROR_ROWS", 7)  # blocks that do not divide the rows
    w = torch.distributions.Laplace(0.0, 0.02).sample((40, 512))
    grid = grid_from_spec({"kind": kind})
    copied = rtn(w.clone(), grid)
    mine = w.clone()
    in_place = rtn(mine, grid, in_place=True)
    assert in_place.weight.data_ptr() == mine.data_ptr()
    assert torch.equal(copied.codes, in_place.codes) and torch.equal(copied.weight, in_place.weight)
    assert copied.error == in_place.error
    assert all(torch.equal(copied.params[k], in_place.params[k]) for k in copied.params)


def test_hessian_weighted_error_by_blocks_is_the_quadratic_form(monkeypatch):
    """weighted_error goes by blocks of rows and of H's columns (no float64 copy of H or of the
    weights): the same e H e^T / w H w^T as the whole einsum, to float64 rounding."""
    import d2quant.solver as solver

    monkeypatch.setattr(solver, "ERROR_ROWS", 13)
    monkeypatch.setattr(solver, "ERROR_COLS", 50)
    w, h = problem(n=40, k=256)
    q = w + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    e, hd = (q - w).double(), h.double()
    whole = float(torch.einsum("nk,kl,nl->", e, hd, e) / torch.einsum("nk,kl,nl->", w.double(), hd, w.double()))
    assert solver.weighted_error(w, q, h) == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize("grid", [UniformGrid(3, 64), "IQ2_XS"], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shrink", [0.0, 0.5])
def test_the_in_place_solve_keeps_its_inputs_and_measures_on_the_shrunk_hessian(grid, act_order, shrink):
    """gptq_rows shrinks and damps its H and updates its weights in place, and reports the error on
    that H without a clone: the caller's tensors keep their bits, and the error is the quadratic
    form on the shrunk H (a dead column's diagonal set to 1) of the given weights, dead columns zeroed."""
    from d2quant.grids.ggml import ggml_grid
    from d2quant.solver import weighted_error

    grid = ggml_grid(grid) if isinstance(grid, str) else grid
    w, h = problem(n=64, k=256)
    h[7, :] = h[:, 7] = 0
    w0, h0 = w.clone(), h.clone()
    s = gptq(w, h, grid, act_order=act_order, shrink=shrink)
    assert torch.equal(w, w0) and torch.equal(h, h0)
    shrunk = (1 - shrink) * h0 + shrink * torch.diag(torch.diag(h0)) if shrink else h0.clone()
    shrunk[7, 7] = 1
    w0[:, 7] = 0
    assert s.error == weighted_error(w0, s.weight, shrunk)
    assert torch.equal(grid.dequantize_matrix(s.codes, s.params), s.weight)


def test_in_place_factor_and_permutation_are_the_plain_formulas_bit_for_bit():
    """GPTQ's k x k steps work in one buffer each (column-major LAPACK, blocked transpose and
    permutation); they must give exactly what the out-of-place formulas give, on sizes that are not
    a multiple of the block."""
    from d2quant.solver import _SQUARE_BLOCK, _damped, _damped_inverse, _inverse_factor, _permuted
    torch.manual_seed(3)
    k = _SQUARE_BLOCK + 188
    x = torch.randn(k + 64, k)
    h = x.T @ x / x.shape[0]
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(_damped(h, 0.01)))
    assert torch.equal(_damped_inverse(h, 0.01), inverse)
    plain = torch.linalg.cholesky(inverse, upper=True)
    got = _inverse_factor(h, 0.01)
    assert got.is_contiguous() and torch.equal(got, plain)
    perm = torch.randperm(k)
    assert torch.equal(_permuted(h, perm), h[perm][:, perm])
    assert torch.equal(_permuted(_permuted(h, perm), torch.argsort(perm)), h)
