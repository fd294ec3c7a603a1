"""The CPU hot spots of the README job, measured one by one (issue 13, item 6).

    python bench/cpu_speed.py           # prints one line per measurement
    python bench/cpu_speed.py codebook  # one section: generation | attention | fits | codebook | forwards

Self-generation of SmolLM2's 32 x 512 calibration tokens as the job does it (and with
transformers' growing KV cache); one decode step's
lm_head matmul (32 rows) in float32 and bfloat16; attention for one query row over 500 cached
keys (GQA 9:3) with torch's SDPA and with the grouped eager attention, in both dtypes;
and the grids' fit of a whole matrix (fit_groups) in cache-sized row chunks against one call.
``codebook``: the IQ types' fit of a 768 x 2048 matrix (heavy-tailed rows, an importance vector)
with the rounding shortcut of ``_CodebookGrid._nearest_points`` and with every unit searched
exhaustively, and whether both give the same params. ``forwards``: the README job's calibration
with float32 and with bfloat16 forwards (--forward-dtype).
"""

from __future__ import annotations

import contextlib
import sys
import time
from unittest import mock

import torch
import torch.nn.functional as F

from d2quant import data
from d2quant.data import CalibConfig, calibration_tokens, generator_id, wikitext_dir
from d2quant.grids import grid_from_spec, iq
from d2quant.sources import load_source


def _per_call(fn, n: int = 20) -> float:
    fn()
    t = time.time()
    for _ in range(n):
        fn()
    return (time.time() - t) / n


def generation() -> None:
    src = load_source("smollm2-135m")
    growing = mock.patch.object(data, "_kv_cache", lambda model, n: data.DynamicCache(config=model.config))
    for what, patch in (("filled in place", contextlib.nullcontext()), ("transformers' DynamicCache", growing)):
        with patch:
            t = time.time()
            calibration_tokens(CalibConfig("self", 32, 512, 0), src.model, src.tokenizer, torch.device("cpu"))
        print(f"self-generation 32 x 512 (KV cache {what}, generator {generator_id(torch.device('cpu'))}): "
              f"{time.time() - t:.1f} s")
    x, w = torch.randn(32, 576), src.model.lm_head.weight.detach().float()
    for dt in (torch.float32, torch.bfloat16):
        xd, wd = x.to(dt), w.to(dt)
        print(f"lm_head step [32, 576] x [49152, 576] {str(dt)[6:]}: {_per_call(lambda: F.linear(xd, wd)) * 1e3:.1f} ms")


def attention() -> None:
    """The two kernels self-generation may sample with (data.sampling_attention), in both dtypes
    (data.sampling_dtype): torch's SDPA and the grouped eager attention."""
    module = torch.nn.Module().eval()
    module.head_dim = 64
    for dt in (torch.float32, torch.bfloat16):
        q = torch.randn(32, 9, 1, 64, dtype=dt)
        k, v = torch.randn(32, 3, 500, 64, dtype=dt), torch.randn(32, 3, 500, 64, dtype=dt)
        sdpa = _per_call(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)) * 1e3
        grouped = _per_call(lambda: data._grouped_eager(module, q, k, v, None)) * 1e3
        print(f"attention, 1 query x 500 keys, 32 x 9 heads, {str(dt)[6:]}: SDPA {sdpa:.2f} ms, "
              f"grouped eager {grouped:.2f} ms")


def fits() -> None:
    torch.set_num_threads(1)  # as the solver runs them
    torch.manual_seed(0)
    for kind, shape in (("q6_k", (8192, 2048)), ("q8_0", (49152, 576))):
        grid, w = grid_from_spec({"kind": kind}), torch.randn(*shape) * 0.02
        cls = type(grid)
        default = cls.fit_chunk
        for chunk, what in ((default, "row chunks"), (shape[0] * shape[1], "one call")):
            cls.fit_chunk = chunk
            t = time.time()
            grid.fit_groups(w)
            print(f"fit_groups {kind} {shape[0]} x {shape[1]}, {what}: {time.time() - t:.1f} s")
        cls.fit_chunk = default


def codebook() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.Laplace(0.0, 0.02).sample((768, 2048)) * (0.5 + 1.5 * torch.rand(768, 1, generator=g))
    imp = (0.1 + 2.9 * torch.rand(2048, generator=g)) ** 2
    tables = iq._rounding_tables

    def no_point_found(name):
        bounds, digits, lookup = tables(name)
        return bounds, digits, torch.full_like(lookup, -1)

    every_unit_searched = mock.patch.object(iq, "_rounding_tables", no_point_found)
    for kind in ("iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m"):
        grid = grid_from_spec({"kind": kind})
        t = time.time()
        fast = grid.fit_groups(w, imp)
        t_fast = time.time() - t
        with every_unit_searched:
            t = time.time()
            full = grid.fit_groups(w, imp)
            t_full = time.time() - t
        same = sum(torch.equal(a[k], b[k]) for a, b in zip(fast, full) for k in a) / sum(len(a) for a in fast)
        print(f"fit_groups {kind} 768 x 2048: {t_fast:.1f} s with the rounding shortcut, {t_full:.1f} s "
              f"searching every unit ({t_full / t_fast:.1f}x); identical params for {same:.2%} of the blocks' values")


def forwards() -> None:
    """The README job's calibration (SmolLM2, D²Quant onto Q3_K_M, 32 x 512 tokens; wikitext-2 valid
    here: the cost does not depend on the text) with float32 and with bfloat16 forwards."""
    from converters.gguf import preset_grids
    from d2quant.pipeline import QuantConfig, quantize

    src = load_source("smollm2-135m")
    tokens = calibration_tokens(CalibConfig(str(wikitext_dir() / "valid.txt"), 32, 512, 0),
                                src.model, src.tokenizer, torch.device("cpu"))
    for dtype in ("float32", "bfloat16"):
        run = load_source("smollm2-135m")
        cfg = QuantConfig(method="d2quant", device="cpu", forward_dtype=dtype,
                          grids=preset_grids("Q3_K_M", run.spec))
        qm = quantize(run, tokens, cfg)
        teacher = sum(s.get("teacher_seconds", 0) for s in qm.report["layers"])
        print(f"calibration d2quant Q3_K_M 32 x 512, {dtype} forwards: {qm.report['seconds']:.1f} s "
              f"(float-stream teacher {teacher:.1f} s)")


SECTIONS = {"generation": generation, "attention": attention, "fits": fits, "codebook": codebook,
            "forwards": forwards}

if __name__ == "__main__":
    unknown = sorted(set(sys.argv[1:]) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"error: unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    for name in sys.argv[1:] or list(SECTIONS):
        SECTIONS[name]()
