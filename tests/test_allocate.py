"""--target-bpw: measured costs, an exact multiple-choice knapsack, recipes that reproduce a file."""

from __future__ import annotations

import itertools
import json

import gguf
import pytest
import torch
from typer.testing import CliRunner

from converters.allocation import SizeTarget, allocate, parse_size, solve
from converters.gguf.allocate import candidate_kinds, fixed_bytes, options, read_recipe
from converters.gguf.presets import FLOAT
from converters.gguf.target import GGUFTarget
from converters.onnx import ONNXTarget
from d2export.cli import app
from d2quant.errors import D2Error
from d2quant.sensitivity import MatrixCost, measure
from tests.conftest import DATA

runner = CliRunner()
CAL = ["--calib", str(DATA / "valid.txt"), "--nsamples", "2", "--seqlen", "64"]


def test_knapsack_is_the_brute_force_optimum():
    options = {"a": [("x", 10, 5.0), ("y", 20, 1.0), ("z", 30, 0.5)],
               "b": [("x", 15, 9.0), ("y", 25, 2.0)],
               "c": [("x", 5, 3.0), ("y", 12, 2.5), ("z", 40, 0.0)]}
    for limit in (30, 45, 52, 60, 80, 100):
        best = min((sum(o[2] for o in combo), combo) for combo in itertools.product(*options.values())
                   if sum(o[1] for o in combo) <= limit)
        got = solve(options, limit)
        assert sum(options[n][[o[0] for o in options[n]].index(got[n])][2] for n in got) == pytest.approx(best[0])
        assert sum(options[n][[o[0] for o in options[n]].index(got[n])][1] for n in got) <= limit
    with pytest.raises(D2Error, match="below"):
        solve(options, 29)


def test_candidates_respect_llama_cpps_row_rule():
    assert "q4_k" in candidate_kinds(256) and "q4_k" not in candidate_kinds(576)
    assert FLOAT in candidate_kinds(100) and candidate_kinds(100) == [FLOAT]
    assert "iq1_s" not in candidate_kinds(256)


@pytest.fixture(scope="module")
def costs(tiny_hf_dir):
    from d2quant.sources import load_source

    src = load_source(str(tiny_hf_dir))
    tokens = torch.randint(0, src.spec.vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    opts = options(src.spec)
    return src, measure(src.model, tokens, tokens[:1, :32], {n: {o.label: o.spec for o in os} for n, os in opts.items()})


def _gguf_allocation(spec, c, bpw):
    return allocate(options(spec), c, SizeTarget(bpw), fixed_bytes(spec), spec.n_params)


def test_costs_are_measured_and_ordered_by_precision(costs):
    src, c = costs
    assert set(c) == set(options(src.spec))
    for cost in c.values():
        assert cost.alpha > 0
        errs = cost.errors
        assert errs[FLOAT] == 0 and errs["q8_0"] < errs["q4_0"]


def test_allocation_meets_the_budget_and_refuses_what_cannot_be_reached(costs):
    src, c = costs
    spec = src.spec
    for bpw in (4.5, 5.5, 8.0):
        alloc = _gguf_allocation(spec, c, bpw)
        assert alloc.bpw <= bpw + 1e-9
        assert sum(o.nbytes for o in alloc.choice.values()) <= alloc.budget
    low, high = _gguf_allocation(spec, c, 4.5), _gguf_allocation(spec, c, 8.0)
    assert sum(high.loss.values()) < sum(low.loss.values())
    with pytest.raises(D2Error, match="below what the smallest types give: reachable"):
        _gguf_allocation(spec, c, 1.0)
    with pytest.raises(D2Error, match="at or above float"):
        _gguf_allocation(spec, c, 20.0)


def test_target_options_are_checked():
    with pytest.raises(D2Error, match="--type and --target-bpw each choose"):
        GGUFTarget("Q2_K", size=SizeTarget(3.0))
    with pytest.raises(D2Error, match="--target-bpw and --target-size each name"):
        SizeTarget(3.0, 10**6)
    with pytest.raises(D2Error, match="--bits and --target-bpw/--target-size each choose"):
        ONNXTarget(bits=4, size=SizeTarget(3.0))
    assert parse_size("1.1GB") == 1_100_000_000 and parse_size("950MiB") == 950 * 2**20
    with pytest.raises(D2Error, match="no size"):
        parse_size("large")


def test_target_bpw_file_runs_in_llama_cpp_and_its_recipe_reproduces_it(tiny_hf_dir, tmp_path):
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    r = runner.invoke(app, [str(a) for a in ("gguf", tiny_hf_dir, "-o", first, "--target-bpw", "5.0",
                                             "--method", "gptq", *CAL)], catch_exceptions=False)
    assert r.exit_code == 0 and "tensor types for" in r.output and "runtime parity: PASS" in r.output, r.output
    recipe = json.loads(gguf.GGUFReader(str(first)).fields["d2export.recipe"].contents())
    kinds = {g["kind"] if g else FLOAT for g in recipe["grids"].values()}
    assert len(kinds) > 1  # a mixture, not one preset type
    r = runner.invoke(app, [str(a) for a in ("gguf", tiny_hf_dir, "-o", second, "--recipe", first,
                                             "--method", "gptq", "--no-verify", *CAL)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert first.read_bytes() == second.read_bytes()


def test_a_recipe_for_another_model_is_refused(tmp_path, costs):
    src, _ = costs
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"types": {"model.layers.0.self_attn.q_proj": "q4_k"}}))
    with pytest.raises(D2Error, match="for another model"):
        read_recipe(bad, src.spec)
    names = options(src.spec)
    bad.write_text(json.dumps({"types": {n: "q9_z" for n in names}}))
    with pytest.raises(D2Error, match="unknown or does not fit"):
        read_recipe(bad, src.spec)
    assert isinstance(next(iter(MatrixCost("x", (1, 1), 1.0, {"q4_0": 2.0}).errors)), str)


# ---- ONNX: per-matrix MatMulNBits widths ---------------------------------------------------------
def test_matmulnbits_bytes_are_what_the_writer_stores(tmp_path):
    """The byte count the allocation budgets with is the one of the written initializers."""
    import numpy as np

    from converters.onnx.packing import matmulnbits_nbytes, pack_codes, pack_zero_points

    rng = np.random.default_rng(0)
    for bits, n, k, block in ((2, 6, 128, 32), (4, 5, 96, 64), (8, 3, 64, 16), (3, 4, 256, 128)):
        cb = {2: 2, 3: 4, 4: 4, 8: 8}[bits]
        blocks = -(-k // block)
        codes = rng.integers(0, 1 << bits, (n, k))
        stored = (pack_codes(codes, cb, block).nbytes + np.zeros((n, blocks), np.float16).nbytes
                  + pack_zero_points(rng.integers(0, 1 << bits, (n, blocks)), cb).nbytes)
        assert matmulnbits_nbytes(n, k, bits, block) == stored


def test_onnx_target_bpw_mixes_widths_and_passes_onnxruntime_parity(tiny_hf_dir, tmp_path, monkeypatch):
    import onnx

    from converters.onnx import MODEL_FILE, read_metadata
    from converters.onnx.packing import matmulnbits_nbytes

    out = tmp_path / "o"
    r = runner.invoke(app, [str(a) for a in ("onnx", tiny_hf_dir, "-o", out, "--target-bpw", "9.0",
                                             "--block-size", "32", "--method", "gptq", *CAL)],
                      catch_exceptions=False)
    assert r.exit_code == 0 and "tensor types for" in r.output and "PASS" in r.output, r.output
    model = onnx.load(str(out / MODEL_FILE))
    linears = read_metadata(model)["linears"]
    widths = {m.get("bits", "float") for n, m in linears.items() if n.startswith("model.layers.")}
    assert len(widths) > 1, widths  # a mixture, not one width
    stored = {t.name: onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    for m in linears.values():  # the bytes the allocation counted are the bytes written
        if m["layout"] == "matmulnbits":
            assert stored[m["B"]] + stored[m["scales"]] + stored[m["zero_points"]] == \
                matmulnbits_nbytes(m["N"], m["K"], m["bits"], m["block_size"])
    bpw = float(r.output.split("tensor types for ")[1].split()[0])
    assert bpw <= 9.0
    import d2export.calibrate

    def no_tokens(*a, **k):
        raise AssertionError("calibration tokens were made for a size out of reach")

    monkeypatch.setattr(d2export.calibrate, "calibration_tokens", no_tokens)
    for cmd in ("onnx", "gguf"):  # refused as soon as the model is loaded
        r = runner.invoke(app, [str(a) for a in (cmd, tiny_hf_dir, "-o", tmp_path / f"p-{cmd}", "--target-bpw",
                                                 "1.5", "--method", "gptq", *CAL)])
        assert r.exit_code == 2 and "below what the smallest types give: reachable" in r.output, r.output
        assert not (tmp_path / f"p-{cmd}").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "phi3"])
def test_kl_probes_replay_from_the_perturbed_layer_exactly(arch):
    """A probe runs the layers from the perturbed matrix's on, from inputs captured unperturbed:
    the same log-probabilities as the whole model's forward, perturbed or not."""
    from d2quant.sensitivity import _Replay
    from tests.conftest import tiny_model

    m = tiny_model(arch, tie_word_embeddings=False)
    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    full = lambda: torch.log_softmax(m(input_ids=tokens, use_cache=False).logits.double(), -1)  # noqa: E731
    with torch.no_grad():
        replay = _Replay(m, tokens)
        n = len(replay.layers)
        for start in (None, 0, 1, n):
            torch.testing.assert_close(replay.log_probs(start), replay.ref, rtol=0, atol=1e-9)
        for name, start in (("model.layers.1.mlp.down_proj", 1), ("lm_head", n)):
            w = m.get_submodule(name).weight
            saved = w.clone()
            w.add_(0.05 * torch.randn_like(w))
            torch.testing.assert_close(replay.log_probs(start), full(), rtol=0, atol=1e-9)
            assert (replay.log_probs(start) - replay.ref).abs().max() > 1e-4
            w.copy_(saved)
