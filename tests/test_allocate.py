"""--target-bpw: measured costs, an exact multiple-choice knapsack, recipes that reproduce a file."""

from __future__ import annotations

import itertools
import json

import gguf
import pytest
import torch
from typer.testing import CliRunner

from converters.gguf.allocate import (allocate, budget, candidate_kinds, candidates, file_bpw, read_recipe,
                                      solve)
from converters.gguf.presets import FLOAT
from converters.gguf.target import GGUFTarget, parse_size
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
    return src, measure(src.model, tokens, tokens[:1, :32], candidates(src.spec))


def test_costs_are_measured_and_ordered_by_precision(costs):
    src, c = costs
    assert set(c) == set(candidates(src.spec))
    for cost in c.values():
        assert cost.alpha > 0
        errs = cost.errors
        assert errs[FLOAT] == 0 and errs["q8_0"] < errs["q4_0"]


def test_allocation_meets_the_budget_and_refuses_what_cannot_be_reached(costs):
    src, c = costs
    spec = src.spec
    for bpw in (4.5, 5.5, 8.0):
        alloc = allocate(spec, c, budget(spec, bpw))
        assert file_bpw(spec, alloc) <= bpw + 1e-9
        assert sum(alloc.nbytes.values()) <= budget(spec, bpw)
    low, high = allocate(spec, c, budget(spec, 4.5)), allocate(spec, c, budget(spec, 8.0))
    assert sum(high.loss.values()) < sum(low.loss.values())
    with pytest.raises(D2Error, match="below what the smallest types give: reachable"):
        allocate(spec, c, budget(spec, 1.0))
    with pytest.raises(D2Error, match="at or above F16"):
        allocate(spec, c, budget(spec, 20.0))


def test_target_options_are_checked():
    with pytest.raises(D2Error, match="--type and --target-bpw each choose"):
        GGUFTarget("Q2_K", target_bpw=3.0)
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
    names = candidates(src.spec)
    bad.write_text(json.dumps({"types": {n: "q9_z" for n in names}}))
    with pytest.raises(D2Error, match="unknown or does not fit"):
        read_recipe(bad, src.spec)
    assert isinstance(next(iter(MatrixCost("x", (1, 1), 1.0, {"q4_0": 2.0}).errors)), str)
