"""Native GGML grids: bytes bit-exact with gguf-py and libggml, and fits at least as good as llama.cpp's."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from d2quant.errors import D2Error
from d2quant.grids import grid_from_spec, registered_kinds
from d2quant.grids.ggml import ggml_grid

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]
CODEBOOK_TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"]
N_ROWS, N_COLS = 16, 512
# Allowed excess of our weighted error over ggml_quantize_chunk's (measured: ours is 5-45% lower).
MARGIN = 1.02


def _random_packed_inputs(grid, rng, n=N_ROWS, k=N_COLS):
    """Arbitrary codes and params in storage form (fp16 d's of both signs, integers over their range)."""
    g = k // grid.block
    codes = torch.from_numpy(rng.integers(0, grid.levels.n, (n, k))).to(torch.int16)
    params = {name: torch.from_numpy(rng.normal(0, 0.02, (n, g)).astype(np.float16).astype(np.float32))
              for name in grid.fp16_params}
    for name, (lo, hi) in grid.int_params.items():
        params[name] = torch.from_numpy(rng.integers(lo, hi + 1, (n, g, grid.n_sub)).astype(np.float32))
    return codes, params


def _heavy_rows(rng, n=N_ROWS, k=N_COLS):
    return torch.from_numpy((rng.standard_t(4, (n, k)) * 0.02).astype(np.float32))


def _rtn(grid, x, importance=None):
    """Fit and round group by group, as the solver does without error feedback."""
    codes, per_group = [], []
    for g0 in range(0, x.shape[1], grid.group):
        blk = x[:, g0:g0 + grid.group]
        p = grid.fit(blk, None if importance is None else importance[g0:g0 + grid.group])
        per_group.append(p)
        codes.append(grid.quantize(blk, p))
    return torch.cat(codes, 1), {k: torch.stack([p[k] for p in per_group], 1) for k in per_group[0]}


def _gguf_decode(name, raw, n, k):
    return gguf_dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(n, k)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The fits run thousands of small ops; intra-op threads only add handoffs (30x on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def libggml():
    from runtime_tests import libggml as lib
    return lib  # missing llama-cpp-python fails here with the install command, never skips


def test_registry_and_geometry():
    for name in TYPES:
        grid = grid_from_spec({"kind": name.lower()})
        assert name.lower() in registered_kinds() and grid.type_name == name
        assert grid.group == grid.block == (256 if name.endswith(("_K", "_XS")) else 32)
        assert grid.bits_per_weight == pytest.approx(grid.block_bytes * 8 / grid.block)
    with pytest.raises(D2Error, match="multiple of 256.*Q4_0"):
        ggml_grid("Q4_K").check_shape(8, 576)
    with pytest.raises(D2Error, match="whole blocks"):
        ggml_grid("Q6_K").fit(torch.randn(4, 64))


@pytest.mark.parametrize("name", TYPES)
def test_pack_decodes_like_gguf_py_and_round_trips(name):
    rng = np.random.default_rng(TYPES.index(name))
    grid = ggml_grid(name)
    codes, params = _random_packed_inputs(grid, rng)
    raw = grid.pack(codes, params)
    assert raw.dtype == np.uint8 and raw.shape == (N_ROWS, N_COLS // grid.block * grid.block_bytes)
    ours = grid.dequantize_matrix(codes, params).numpy()
    assert np.array_equal(_gguf_decode(name, raw, N_ROWS, N_COLS), ours)
    codes2, params2 = grid.unpack(raw.tobytes(), N_ROWS, N_COLS)
    assert torch.equal(codes2, codes) and params2.keys() == params.keys()
    assert all(torch.equal(params2[k], params[k]) for k in params)


@pytest.mark.parametrize("name", TYPES)
def test_pack_decodes_like_libggml(name, libggml):
    rng = np.random.default_rng(100 + TYPES.index(name))
    grid = ggml_grid(name)
    codes, params = _random_packed_inputs(grid, rng)
    raw = grid.pack(codes, params)
    assert libggml.row_size(name, N_COLS) * N_ROWS == raw.size
    ours = grid.dequantize_matrix(codes, params).numpy()
    assert np.array_equal(libggml.dequantize_rows(name, raw, N_ROWS, N_COLS), ours)


@pytest.mark.parametrize("name", TYPES)
def test_ggml_bytes_decode_through_our_unpack(name, libggml):
    rng = np.random.default_rng(200 + TYPES.index(name))
    x = _heavy_rows(rng).numpy()
    raw = libggml.quantize_rows(name, x)
    grid = ggml_grid(name)
    codes, params = grid.unpack(raw, N_ROWS, N_COLS)
    theirs = libggml.dequantize_rows(name, raw, N_ROWS, N_COLS)
    assert np.array_equal(grid.dequantize_matrix(codes, params).numpy(), theirs)
    assert np.array_equal(grid.pack(codes, params).tobytes(), raw)


@pytest.mark.parametrize("name", TYPES)
def test_fit_quantize_pack_is_what_we_dequantize(name):
    rng = np.random.default_rng(300 + TYPES.index(name))
    grid = ggml_grid(name)
    x = _heavy_rows(rng)
    x[3] = 0  # an all-zero row
    codes, params = _rtn(grid, x)
    ours = grid.dequantize_matrix(codes, params)
    assert np.array_equal(_gguf_decode(name, grid.pack(codes, params), N_ROWS, N_COLS), ours.numpy())
    assert torch.all(ours[3] == 0)
    # column by column (as GPTQ calls it) gives the block's codes: col0 picks the sub-block scale
    p0 = {k: v[:, 0] for k, v in params.items()}
    for c in (0, 17, grid.block - 1):
        assert torch.equal(grid.quantize(x[:, c], p0, c), codes[:, c])
        assert torch.equal(grid.dequantize(codes[:, c], p0, c), ours[:, c])
    part = grid.dequantize(codes[:, 5:grid.block], p0, 5)
    assert torch.equal(part, ours[:, 5:grid.block])


@pytest.mark.parametrize("name", TYPES)
def test_fit_error_not_worse_than_ggml(name, libggml):
    rng = np.random.default_rng(400 + TYPES.index(name))
    grid = ggml_grid(name)
    x = _heavy_rows(rng, n=32)
    importance = torch.from_numpy(np.exp(rng.normal(0, 1.5, N_COLS)).astype(np.float32))
    for imp in (None, importance):
        w = torch.ones(N_COLS) if imp is None else imp
        theirs = libggml.dequantize_rows(name, libggml.quantize_rows(name, x.numpy(), None if imp is None
                                                                     else imp.numpy()), 32, N_COLS)
        codes, params = _rtn(grid, x, imp)
        ours = grid.dequantize_matrix(codes, params)

        def rel(y):
            return float((w * (torch.as_tensor(y) - x) ** 2).sum() / (w * x ** 2).sum())
        assert rel(ours) <= MARGIN * rel(theirs), (name, imp is not None, rel(ours), rel(theirs))


@pytest.mark.parametrize("name", ["Q4_1", "Q3_K", "Q4_K", "Q6_K"])
def test_scale_rows(name):
    rng = np.random.default_rng(500)
    grid = ggml_grid(name)
    x = _heavy_rows(rng, k=grid.block)
    p = grid.fit(x)
    q = grid.quantize(x, p)
    c = torch.from_numpy(rng.uniform(0.5, 2.0, N_ROWS).astype(np.float32))
    scaled = grid.scale_rows(p, c)
    for k in grid.fp16_params:
        assert torch.equal(scaled[k].half().float(), scaled[k])
    want = grid.dequantize(q, p) * c[:, None]
    # each fp16 param moves by <= 2^-11 relative, so the decode by that much of the row's magnitude
    tol = 2e-3 * want.abs().amax(1, keepdim=True)
    assert torch.all((grid.dequantize(q, scaled) - want).abs() <= tol)


def test_pack_rejects_params_off_the_grid():
    grid = ggml_grid("Q4_K")
    codes, params = _random_packed_inputs(grid, np.random.default_rng(7), n=2, k=256)
    with pytest.raises(D2Error, match="fp16"):
        grid.pack(codes, {**params, "d": params["d"] + 1e-7})
    with pytest.raises(D2Error, match="0..63"):
        grid.pack(codes, {**params, "sc": params["sc"] + 64})
    with pytest.raises(D2Error, match="codes"):
        grid.pack(codes + 16, params)
    with pytest.raises(D2Error, match="does not fit"):
        grid.unpack(b"\0" * 100, 2, 256)


def test_each_type_class_carries_llama_cpps_facts(libggml):
    from d2quant.grids.ggml import ggml_types

    for name, cls in ggml_types().items():
        lib = libggml._ggml()
        traits = lib.ggml_get_type_traits(libggml._type_id(name)).contents
        assert (cls.block, cls.block_bytes) == (traits.blck_size, traits.type_size), name
        assert cls.needs_imatrix == bool(lib.ggml_quantize_requires_imatrix(libggml._type_id(name))), name
        assert cls.fallback is None or ggml_grid(cls.fallback).block == 32
        assert ggml_grid(name).file_type.name.startswith("MOSTLY_")


def _random_codebook_inputs(grid, rng, n=N_ROWS, k=N_COLS):
    """Valid codes (codebook points; signs with the type's parity) and params in storage form."""
    from d2quant.grids.iq import _codebook

    levels = _codebook(grid.codebook)[1]
    lv = levels[rng.integers(0, len(levels), (n, k // grid.unit))].reshape(n, k)
    params = {"d": torch.from_numpy(rng.normal(0, 0.01, (n, k // 256)).astype(np.float16).astype(np.float32))}
    for name, (lo, hi) in grid.int_params.items():
        runs = 256 // (grid.sub if name == "sc" else grid.delta_run)
        params[name] = torch.from_numpy(rng.integers(lo, hi + 1, (n, k // 256, runs)).astype(np.float32))
    if "dneg" in params:  # ternary: the signs are in the codebook
        return torch.from_numpy(lv).to(torch.int16), params
    neg = rng.integers(0, 2, (n, k))
    if grid.parity:
        neg8 = neg.reshape(n, -1, 8)
        neg8[..., 7] = neg8[..., :7].sum(-1) % 2
    return torch.from_numpy(2 * lv + neg).to(torch.int16), params


@pytest.mark.parametrize("name", CODEBOOK_TYPES)
def test_codebook_types_decode_like_gguf_py_and_libggml(name, libggml):
    rng = np.random.default_rng(CODEBOOK_TYPES.index(name))
    grid = ggml_grid(name)
    codes, params = _random_codebook_inputs(grid, rng)
    raw = grid.pack(codes, params)
    assert raw.shape == (N_ROWS, N_COLS // 256 * grid.block_bytes)
    ours = grid.dequantize_matrix(codes, params).numpy()
    assert np.array_equal(ours, _gguf_decode(name, raw.reshape(-1), N_ROWS, N_COLS))
    assert np.array_equal(ours, libggml.dequantize_rows(name, raw, N_ROWS, N_COLS))
    back_codes, back_params = grid.unpack(raw, N_ROWS, N_COLS)
    assert torch.equal(back_codes, codes) and all(torch.equal(back_params[k], params[k]) for k in params)


@pytest.mark.parametrize("name", CODEBOOK_TYPES)
def test_codebook_fit_beats_llama_cpps_quantizer_with_the_same_importance(name, libggml):
    rng = np.random.default_rng(7 + CODEBOOK_TYPES.index(name))
    grid = ggml_grid(name)
    x = _heavy_rows(rng, 32, 512)
    imp = torch.from_numpy(rng.uniform(0.1, 2, 512).astype(np.float32))
    codes, params = _rtn(grid, x, imp)
    ours = float((((grid.dequantize_matrix(codes, params) - x) ** 2) * imp).sum())
    ref = libggml.dequantize_rows(name, libggml.quantize_rows(name, x.numpy(), imp.numpy()), 32, 512)
    theirs = float((((torch.from_numpy(ref) - x) ** 2) * imp).sum())
    assert ours <= MARGIN * theirs, (ours, theirs)
    grid.pack(codes, params)  # what the fit makes is valid on the grid


@pytest.mark.parametrize("name", CODEBOOK_TYPES)
def test_codebook_search_is_the_exhaustive_argmin(name):
    """The rounding shortcut (per-coordinate nearest level, searched only where that is no point)
    picks exactly the point an exhaustive weighted search does, targets below the smallest level
    (a parity-flipped weight) and above the largest included."""
    grid = ggml_grid(name)
    rng = np.random.default_rng(11 + CODEBOOK_TYPES.index(name))
    top = float(grid.mags.abs().max())
    t = torch.from_numpy(rng.uniform(-0.3 * top, 1.3 * top, (4000, grid.unit)).astype(np.float32))
    wt = torch.from_numpy(rng.uniform(0.01, 3, t.shape).astype(np.float32))
    pts = grid.points
    exhaustive = ((wt[:, None, :] * (t[:, None, :] - pts[None]) ** 2).sum(-1)).argmin(-1)
    got = grid._nearest_points(t, wt)
    assert torch.equal(got, exhaustive)


def test_invalid_codebook_codes_are_refused():
    grid = ggml_grid("IQ2_XXS")
    codes, params = _random_codebook_inputs(grid, np.random.default_rng(0))
    odd = codes.clone()
    odd[0, 0] ^= 1  # one sign flipped: the parity over 8 weights breaks
    with pytest.raises(D2Error, match="even number of negative signs"):
        grid.pack(odd, params)
    from d2quant.grids.iq import _codebook

    levels = {tuple(v) for v in _codebook("IQ2_XXS")[1].tolist()}
    missing = next(v for v in np.ndindex(*[3] * 8) if v not in levels)  # 8 magnitudes no point has
    off = codes.clone()
    off[0, :8] = 2 * torch.tensor(missing) + (codes[0, :8] & 1)
    with pytest.raises(D2Error, match="no point of its codebook"):
        grid.pack(off, params)
    with pytest.raises(D2Error, match="no per-column rounder"):  # the solver codes it unit by unit
        grid.rounder(params)


@pytest.mark.parametrize("name", TYPES + CODEBOOK_TYPES)
def test_fit_groups_is_fit_block_by_block(name, monkeypatch):
    """fit_groups (all blocks at once, in row chunks) gives exactly fit's values per block,
    zero-importance and all-zero blocks included."""
    grid = ggml_grid(name)
    monkeypatch.setattr(type(grid), "fit_chunk", 16 * N_COLS)  # 40 rows: chunks of 16, 16 and 8
    rng = np.random.default_rng(3)
    x = _heavy_rows(rng, n=40)
    x[5, :64] = 0
    imp = torch.from_numpy(rng.random(N_COLS).astype(np.float32)) ** 4
    imp[:grid.group] = 0
    for importance in (None, imp):
        one = [grid.fit(x[:, c:c + grid.group], None if importance is None else importance[c:c + grid.group])
               for c in range(0, N_COLS, grid.group)]
        for a, b in zip(one, grid.fit_groups(x, importance)):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
