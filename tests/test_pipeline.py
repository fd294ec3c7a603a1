"""Calibration pipeline on tiny random models: rotation, DAC, DSQ folding, checkpoint round trip."""

import copy
import mmap
from pathlib import Path

import numpy as np
import pytest
import torch

from d2quant import cpu, rotation
from d2quant.grids import ResidualBinaryGrid, UniformGrid
from d2quant.pipeline import QuantConfig, _input_to, quantize
from d2quant.qmodel import QuantizedModel

CALIB = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_rotation_keeps_fp32_logits(arch, tiny_source):
    src = tiny_source(arch)
    ref = copy.deepcopy(src.model)
    rotation.rotate(src.model)
    with torch.no_grad():
        a, b = ref(CALIB[:2]).logits, src.model(CALIB[:2]).logits
    assert ((a - b).abs().max() / a.abs().max()) < 1e-4
    assert src.model.lm_head.weight is not src.model.model.embed_tokens.weight


def _layer0_post_attn_means(model, qmodel_torch):
    """Teacher (FP attention) and student (quantized attention) post-attention norm means, layer 0."""
    def norm_out(m):
        layer, x = m.model.layers[0], m.model.embed_tokens(CALIB)
        pos = torch.arange(CALIB.shape[1])[None]
        pe = m.model.rotary_emb(x, pos)
        mask = torch.full((64, 64), float("-inf")).triu(1)[None, None]
        h = x + layer.self_attn(layer.input_layernorm(x), position_embeddings=pe, attention_mask=mask)[0]
        return layer.post_attention_layernorm(h).reshape(-1, x.shape[-1]).mean(0)
    with torch.no_grad():
        return norm_out(model), norm_out(qmodel_torch)


def test_dac_cancels_mean_deviation(tiny_source):
    src = tiny_source("llama")
    fp = copy.deepcopy(src.model)
    qm = quantize(src, CALIB, QuantConfig(method="d2quant", bits=2, group_size=32, batch=4))
    tm = qm.to_torch()
    teacher, student = _layer0_post_attn_means(fp, tm)
    # the DAC bias b is folded as gate.bias = W_gate_hat b; recover b (W_gate_hat has full column rank)
    gate = tm.model.layers[0].mlp.gate_proj
    b = torch.linalg.lstsq(gate.weight.double(), gate.bias.double()[:, None]).solution[:, 0].float()
    before = (teacher - student).abs().mean()
    after = (teacher - student - b).abs().mean()
    assert after < 1e-3 * max(before, 1e-6) + 1e-6, (before, after)
    up = tm.model.layers[0].mlp.up_proj
    assert torch.allclose(up.weight @ b, up.bias, atol=1e-5)
    assert "lm_head.bias" in qm.tensors and qm.report["final_dac_shift"] > 0


def test_dsq_column_scale_is_folded_into_up(tiny_source):
    src = tiny_source("llama")
    qm = quantize(src, CALIB, QuantConfig(method="d2quant", bits=2, group_size=32, dac=False, batch=4))
    down = qm.linears["model.layers.0.mlp.down_proj"]
    assert isinstance(down.grid, ResidualBinaryGrid) and "col_scale" not in down.params
    assert isinstance(qm.linears["model.layers.0.mlp.up_proj"].grid, UniformGrid)
    assert [s["dsq"] for s in qm.report["layers"]] == [True] * src.spec.layers
    # the in-place calibrated model and the rebuilt one are the same function
    with torch.no_grad():
        assert torch.allclose(src.model(CALIB[:2]).logits, qm.to_torch()(CALIB[:2]).logits, atol=1e-5)


@pytest.mark.parametrize("method,rotate", [("rtn", False), ("gptq", False), ("d2quant", True)])
def test_checkpoint_round_trip(method, rotate, tiny_source, tmp_path):
    qm = quantize(tiny_source("qwen2"), CALIB, QuantConfig(method=method, bits=3, group_size=32,
                                                             rotate=rotate, batch=4))
    qm.save(tmp_path / "ck")
    back = QuantizedModel.load(tmp_path / "ck")
    with torch.no_grad():
        a, b = qm.to_torch()(CALIB[:2]).logits, back.to_torch()(CALIB[:2]).logits
    assert torch.equal(a, b)
    assert back.recipe["method"] == method and len(back.report["layers"]) == 2


def test_gptq_beats_rtn_on_calibration_kl(tiny_source):
    fp = tiny_source("llama").model
    with torch.no_grad():
        ref = fp(CALIB).logits.log_softmax(-1)

    def kl(qm):
        with torch.no_grad():
            lp = qm.to_torch()(CALIB).logits.log_softmax(-1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())
    r = kl(quantize(tiny_source("llama"), CALIB, QuantConfig(method="rtn", bits=3, group_size=32)))
    g = kl(quantize(tiny_source("llama"), CALIB, QuantConfig(method="gptq", bits=3, group_size=32)))
    assert g < r, (g, r)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak-RSS reset is Linux's")
def test_calibration_reports_its_own_peak_memory_not_the_processs(tiny_source):
    from d2quant.cpu import peak_rss_mb
    # 512 MiB touched by work before calibration, then freed; an anonymous map of its own, so that
    # it is certainly returned to the kernel (the heap's free space need not be, after other tests)
    earlier = mmap.mmap(-1, 512 * 2**20)
    touched = np.frombuffer(earlier, dtype=np.uint8)
    touched[::4096] = 1
    process_peak = peak_rss_mb()
    del touched
    earlier.close()
    qm = quantize(tiny_source("llama"), CALIB, QuantConfig(method="gptq", bits=3, group_size=32))
    assert qm.report["peak_mem_of"] == "rss" and 0 < qm.report["start_mem_mb"] <= qm.report["peak_mem_mb"]
    assert 0 < qm.report["peak_mem_mb"] < process_peak - 256, (qm.report["peak_mem_mb"], process_peak)
    # each layer records the peak so far: it never falls, and the head's work comes after the last
    layer_peaks = [s["peak_mem_mb"] for s in qm.report["layers"]]
    assert layer_peaks == sorted(layer_peaks) and layer_peaks[-1] <= qm.report["peak_mem_mb"], layer_peaks


_HEAP_PROBE = """
import ctypes, sys
from d2quant.cpu import _glibc, bound_heap_blocks, rss_mb
libc = _glibc()
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
if sys.argv[1] == "bounded":
    assert bound_heap_blocks()
p = libc.malloc(24 << 20)  # freeing an mmapped 24 MiB block raises glibc's threshold to 24 MiB
libc.free(p)
before = rss_mb()
p = libc.malloc(16 << 20)
guard = libc.malloc(4096)  # so that the freed block is not the heap's top, which may be trimmed
ctypes.memset(p, 1, 16 << 20)
libc.free(p)
print(rss_mb() - before)
"""


@pytest.mark.skipif(cpu._glibc() is None, reason="mallopt is glibc's")
def test_bounded_heap_blocks_go_back_to_the_os_when_freed():
    """A 16 MiB block freed after glibc's threshold has risen stays resident on the heap; with
    bound_heap_blocks (which every streamed calibration calls) it is a mapping of its own and leaves."""
    import subprocess
    import sys

    def kept(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True)
        return float(out.stdout)
    assert kept("default") > 12 and kept("bounded") < 4


_REUSE_PROBE = """
import ctypes, resource
from d2quant.cpu import _glibc, bound_heap_blocks
libc = _glibc()
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
assert bound_heap_blocks()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a 4 MiB block at the heap's top, as a search's chunk of distances
    p = libc.malloc(4 << 20)
    ctypes.memset(p, 1, 4 << 20)
    libc.free(p)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


@pytest.mark.skipif(cpu._glibc() is None, reason="mallopt is glibc's")
def test_bounded_heap_keeps_its_top_for_the_next_block():
    """Under bound_heap_blocks a freed block below the limit stays on the heap for the next one: its
    pages are touched once, not zeroed again at every allocation (MALLOC_TRIM_THRESHOLD_ at glibc's
    128 KiB shows the churn the call avoids)."""
    import os
    import subprocess
    import sys

    def faults(**env: str) -> int:
        out = subprocess.run([sys.executable, "-c", _REUSE_PROBE], capture_output=True, text=True, check=True,
                             env={**os.environ, **env})
        return int(out.stdout)
    page_faults_per_block = (4 << 20) // 4096
    assert faults() < 3 * page_faults_per_block < 10 * page_faults_per_block < faults(MALLOC_TRIM_THRESHOLD_="131072")


def test_d2quant_without_dac_is_gptq_where_down_proj_has_4_bits(tiny_source):
    """DSQ reaches only a down_proj on a grid of <= 3 bits (as in llama.cpp's Q3_K_M and up, whose
    ffn_down is Q4_K or more): there D²Quant without DAC is GPTQ, code for code, and says so."""
    src = tiny_source("llama")
    d2 = quantize(src, CALIB, QuantConfig(method="d2quant", bits=4, group_size=32, dac=False, batch=4))
    gptq = quantize(tiny_source("llama"), CALIB, QuantConfig(method="gptq", bits=4, group_size=32, batch=4))
    assert [s["dsq"] for s in d2.report["layers"]] == [False] * src.spec.layers
    assert all("dsq" not in s for s in gptq.report["layers"])
    for name, ql in gptq.linears.items():
        assert torch.equal(ql.codes, d2.linears[name].codes), name


def test_d2quant_onto_a_codebook_preset_folds_dsq(tiny_source):
    """D²Quant on llama.cpp's IQ2_XXS preset: GPTQ unit by unit, DSQ's column scale (on the
    codebook grid) folded into up_proj, the folded model the same function as the calibrated one."""
    from converters.gguf import preset_grids

    src = tiny_source("llama", hidden_size=256, intermediate_size=512, head_dim=64)
    qm = quantize(src, CALIB, QuantConfig(method="d2quant", dsq_form="dual", dac=False, batch=4,
                                          grids=preset_grids("IQ2_XXS", src.spec)))
    kinds = {ql.grid.kind for ql in qm.linears.values()}
    assert "iq2_xxs" in kinds and all("col_scale" not in ql.params for ql in qm.linears.values())
    with torch.no_grad():
        assert torch.allclose(src.model(CALIB[:2]).logits, qm.to_torch()(CALIB[:2]).logits, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bfloat16_forwards_calibrate_as_well_as_float32(arch, tiny_source):
    """--forward-dtype bfloat16: the forwards round their linears' outputs to bfloat16 (the codes
    move), the Hessians and GPTQ stay float32, the result is as good on the calibration KL, and
    the recipe says so (a float32 recipe keeps its old keys)."""
    fp = tiny_source(arch).model
    with torch.no_grad():
        ref = fp(CALIB).logits.log_softmax(-1)
    out = {}
    for dtype in ("float32", "bfloat16"):
        qm = quantize(tiny_source(arch), CALIB, QuantConfig(method="d2quant", bits=3, group_size=32,
                                                            batch=4, forward_dtype=dtype))
        with torch.no_grad():
            lp = qm.to_torch()(CALIB).logits.log_softmax(-1)
        out[dtype] = qm, float((ref.exp() * (ref - lp)).sum(-1).mean())
    (q32, kl32), (q16, kl16) = out["float32"], out["bfloat16"]
    assert "forward_dtype" not in q32.recipe and q16.recipe["forward_dtype"] == "bfloat16"
    assert any(not torch.equal(q32.linears[n].codes, q16.linears[n].codes) for n in q32.linears)
    assert abs(kl16 - kl32) < 0.05 * kl32, (kl16, kl32)
    with pytest.raises(Exception, match="--forward-dtype"):
        QuantConfig(forward_dtype="float16")


@pytest.mark.parametrize("bf16,want", [(True, "bfloat16"), (False, "float32")])
def test_auto_forwards_follow_the_cpu_and_the_recipe_records_them(bf16, want, monkeypatch):
    monkeypatch.setattr(cpu, "has_bf16_matmul", lambda: bf16)
    cfg = QuantConfig(device="cpu", forward_dtype="auto")
    assert cfg.forward_dtype == want
    assert cfg.recipe().get("forward_dtype", "float32") == want


def test_bf16_matmuls_are_amx_or_avx512_bf16():
    from d2quant.cpu import has_bf16_matmul

    assert has_bf16_matmul(frozenset({"avx512f", "avx512_bf16"}))
    assert has_bf16_matmul(frozenset({"amx_tile", "amx_bf16"}))
    assert not has_bf16_matmul(frozenset({"avx512f", "avx2"}))


def _solved_hessians(monkeypatch, src, cfg) -> dict[str, torch.Tensor]:
    """The H each linear was solved with, by name, and the model."""
    from d2quant.pipeline import Calibrator
    seen, solve = {}, Calibrator._solve

    def spy(self, unit, h, *rest):
        seen.update({t.name: h.clone() for t in unit})
        return solve(self, unit, h, *rest)
    with monkeypatch.context() as m:
        m.setattr(Calibrator, "_solve", spy)
        qm = quantize(src, CALIB, cfg)
    return seen, qm


@pytest.mark.parametrize("arch,method", [("llama", "gptq"), ("phi3", "gptq"), ("gemma3", "d2quant")])
def test_float_objective_solves_on_the_float_models_own_inputs(arch, method, tiny_source, monkeypatch):
    """--objective float: every linear is solved on H = 2 X^T X / n of its inputs in the float
    model (read here by hooks on an untouched copy running Hugging Face's forward), also in layers
    whose quantized-stream H has drifted away from it; the recipe records the option only when set."""
    cfg = dict(method=method, bits=3, group_size=32, batch=4)
    src = tiny_source(arch)
    ref = copy.deepcopy(src.model)
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, mod in ref.named_modules():
        if name.startswith("model.layers.") and isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(lambda m, i, o, name=name: inputs.setdefault(name, []).append(i[0]))
    with torch.no_grad():
        for b in range(0, CALIB.shape[0], 4):
            ref(CALIB[b:b + 4])
    seen, qm = _solved_hessians(monkeypatch, src, QuantConfig(**cfg, objective="float"))
    assert set(seen) == set(inputs)
    for name, xs in inputs.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
        want = (2 * x.T @ x / x.shape[0]).float()
        assert torch.allclose(seen[name], want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), name
    assert qm.recipe["objective"] == "float"
    drifted, base = _solved_hessians(monkeypatch, tiny_source(arch), QuantConfig(**cfg))
    last = max(n for n in inputs if n.startswith("model.layers.1."))
    assert not torch.allclose(drifted[last], seen[last], rtol=1e-3)
    assert "objective" not in base.recipe
    with pytest.raises(Exception, match="--objective must be one of sequential, float, asymmetric"):
        QuantConfig(objective="teacher")


@pytest.mark.parametrize("arch,method", [("llama", "gptq"), ("gemma3", "d2quant")])
def test_asymmetric_objective_moves_only_what_drifted(arch, method, tiny_source):
    """--objective asymmetric: layer 0's q/k/v read the embeddings, the same in the float and the
    quantized model, so their cross moment is their H and they keep GPTQ's codes bit for bit; every
    later input has drifted, so the rest of the model moves."""
    cfg = dict(method=method, bits=3, group_size=32, batch=4)
    base = quantize(tiny_source(arch), CALIB, QuantConfig(**cfg))
    asym = quantize(tiny_source(arch), CALIB, QuantConfig(**cfg, objective="asymmetric"))
    same = {n for n in base.linears if torch.equal(base.linears[n].codes, asym.linears[n].codes)}
    qkv0 = {n for n in base.linears if n.startswith("model.layers.0.self_attn.") and "o_proj" not in n}
    assert same == qkv0
    assert asym.recipe["objective"] == "asymmetric"


def test_scale_fit_reaches_every_solve_and_the_recipe(tiny_source):
    """--scale-fit conditional changes the fitted scales (so codes) and is recorded only when set."""
    cfg = dict(method="gptq", bits=3, group_size=32, batch=4)
    base = quantize(tiny_source("llama"), CALIB, QuantConfig(**cfg))
    cond = quantize(tiny_source("llama"), CALIB, QuantConfig(**cfg, scale_fit="conditional"))
    moved = [n for n in base.linears if not torch.equal(base.linears[n].params["scale"], cond.linears[n].params["scale"])]
    assert len(moved) == len(base.linears)
    assert cond.recipe["scale_fit"] == "conditional" and "scale_fit" not in base.recipe
    with pytest.raises(Exception, match="--scale-fit must be one of diag, conditional"):
        QuantConfig(scale_fit="hessian")


def test_shrink_down_solves_only_down_proj_with_its_own_shrink(tiny_source):
    """--shrink-down: down_proj's Hessian shrinks by its own value, every other linear by --shrink.
    Layer 0's linears before down see the same inputs either way, so only its down_proj moves; the
    recipe records the option only when it is set (older files keep their bytes)."""
    cfg = dict(method="gptq", bits=3, group_size=32, batch=4, shrink=0.0)
    base = quantize(tiny_source("llama"), CALIB, QuantConfig(**cfg))
    own = quantize(tiny_source("llama"), CALIB, QuantConfig(**cfg, shrink_down=1.0))
    layer0 = [n for n in base.linears if n.startswith("model.layers.0.")]
    moved = {n for n in layer0 if not torch.equal(base.linears[n].codes, own.linears[n].codes)}
    assert moved == {"model.layers.0.mlp.down_proj"}
    assert "shrink_down" not in base.recipe and own.recipe["shrink_down"] == 1.0
    assert QuantConfig(shrink=0.5, shrink_down=0.9).shrink_for(False) == 0.5
    with pytest.raises(Exception, match="--shrink-down must lie in 0..1"):
        QuantConfig(shrink_down=1.5)


def test_input_to_stops_the_forward_at_the_module():
    """The o_proj / down_proj passes take that module's input and compute nothing after it."""
    first, second, calls = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), []
    second.register_forward_hook(lambda *a: calls.append("second"))
    x = torch.randn(5, 4)
    got = _input_to(second, lambda: calls.append("after") if second(first(x)) is not None else None)
    assert torch.equal(got, first(x)) and calls == []
    with pytest.raises(RuntimeError, match="never reached"):
        _input_to(second, lambda: first(x))


def test_moments_by_row_blocks_give_the_whole_matrix_formulas_bits(monkeypatch):
    """Sums, H and the cross moment go _ROWS rows at a time (no k x k float64 temporaries): each
    entry is the whole-matrix formula's, bit for bit, with and without a shift."""
    import d2quant.pipeline as pipeline
    from d2quant.pipeline import _Moments

    monkeypatch.setattr(pipeline, "_ROWS", 7)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 16, 40, generator=g) for _ in range(3)]
    fs = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xs]
    m = _Moments(40, torch.device("cpu"), partner=fs)
    for x in xs:
        m.add(x)
    xs, fs = [t.reshape(-1, 40) for t in xs], [t.reshape(-1, 40) for t in fs]
    xtx = sum((t.T @ t).double() for t in xs)  # float32 products per batch, float64 sums
    cross = sum((a.T @ x).double() for a, x in zip(fs, xs))
    s, fsum, n = sum(t.sum(0).double() for t in xs), sum(t.sum(0).double() for t in fs), 144
    shift = torch.randn(40, generator=g)
    b = shift.double()
    assert torch.equal(m.hessian(), (2 * xtx / n).float())
    assert torch.equal(m.hessian(shift), (2 * (xtx + torch.outer(b, s) + torch.outer(s, b)
                                               + n * torch.outer(b, b)) / n).float())
    assert torch.equal(m.cross(shift), (2 * (cross + torch.outer(fsum, b)) / n).float())
    m.close()
    with pytest.raises(AttributeError):
        m.hessian()
