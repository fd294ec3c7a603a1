"""bench/frontier.py: the llama.cpp frontier a target is compared with, and recipes that are the
--target-size choice."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the benchmarks' own imports

import frontier  # noqa: E402
import gguf_bench as gb  # noqa: E402
from converters.allocation import SizeTarget  # noqa: E402
from converters.gguf import GGUFTarget  # noqa: E402
from converters.gguf.allocate import options  # noqa: E402
from converters.gguf.presets import FLOAT  # noqa: E402
from d2quant.pipeline import QuantConfig  # noqa: E402
from d2quant.sources import load_source  # noqa: E402


def test_frontier_is_the_pareto_curve_interpolated_in_log_perplexity():
    points = [(100, 50.0, "A"), (120, 60.0, "B"), (150, 30.0, "C"), (200, 20.0, "D")]
    assert [p[2] for p in frontier.pareto(points)] == ["A", "C", "D"]  # B: larger and worse than A
    ppl, between = frontier.frontier_at(points, 125)
    assert between == "A..C" and ppl == pytest.approx(math.sqrt(50.0 * 30.0))
    assert frontier.frontier_at(points, 200) == (pytest.approx(20.0), "C..D")
    assert frontier.frontier_at(points[:1], 100) == (50.0, "A")
    assert frontier.frontier_at(points, 99) == (50.0, "A")  # the smallest preset, a larger file
    assert frontier.frontier_at(points, 201) is None


def test_preset_curves_merge_labels_that_name_the_defaults():
    """The preset plot's lines: a label whose levers are today's defaults is the bare method."""
    assert QuantConfig.shrink == 0.5
    assert gb.default_method("gptq+shrink=0.5") == "gptq"
    assert gb.default_method("d2quant+shrink=0.5+act_order=True") == "d2quant"
    assert gb.default_method("llamacpp-imatrix") == "llamacpp-imatrix"
    assert gb.default_method("gptq+shrink=0") is None
    assert gb.default_method("d2quant+scale_fit=conditional") is None


def test_rows_of_another_generators_text_are_other_rows(monkeypatch, tmp_path):
    """Self-calibrated rows are keyed by the text's generator: text sampled in another dtype or with
    another kernel is neither skipped as done nor paired with this text's imatrix row."""
    monkeypatch.setattr(gb, "generator_id", lambda device: "2-sdpa-float32")
    s = gb.Settings("self", 32, 512, 40, 512, 2, 128, 5, "cpu", True, False, tmp_path)
    wiki = gb.Settings("wiki", 32, 512, 40, 512, 2, 128, 5, "cpu", True, False, tmp_path)

    def row(method, generator, ppl, calib="self"):
        r = {"model": "m", "preset": "Q3_K_M", "method": method, "calib": calib, "nsamples": 32, "seqlen": 512,
             "windows": 40, "ctx": 512, "file_bytes": 2**20, "bpw": 3.9,
             "scores": {"wiki-test": {"ppl": ppl, "mean_kl": 0.1, "p99_kl": 1.0, "top1": 0.9}}}
        return {**r, "generator": generator} if generator else r

    old = [row("llamacpp-imatrix", "2-eager", 40.0), row("d2quant", "2-eager", 30.0)]
    assert gb.key_for("m", "Q3_K_M", "d2quant", s) not in {gb._key(r) for r in old}
    assert gb.key_for("m", "Q3_K_M", "d2quant", s) == gb._key(row("d2quant", "2-sdpa-float32", 1.0))
    assert gb.key_for("m", "Q3_K_M", "d2quant", wiki) == gb._key(row("d2quant", None, 1.0, calib="wiki"))
    table = gb.table(old + [row("llamacpp-imatrix", "2-sdpa-float32", 50.0), row("d2quant", "2-sdpa-float32", 45.0)])
    assert "30.00 (×0.750)" in table and "45.00 (×0.900)" in table and "(gen 2-sdpa-float32)" in table


def test_frontier_recipe_is_what_target_size_chooses(tiny_hf_dir, tmp_path):
    model = str(tiny_hf_dir)
    src = load_source(model)
    s = gb.Settings("wiki", 2, 64, 1, 64, 1, 0, 0, "cpu", False, False, tmp_path)
    kinds = tuple(sorted({o.label for opts in options(src.spec).values() for o in opts} - {FLOAT}))
    cost, _ = frontier.costs(src, model, s, kinds)
    assert frontier.costs(src, model, s, kinds)[0] == cost  # the second time from the cache file
    assert frontier.target_size(src, "mib", 1.5) == 1.5 * 2**20
    size = frontier.target_size(src, "bpw", 5.0)
    assert frontier.target_size(src, "preset", "Q8_0") > frontier.target_size(src, "preset", "Q4_K_M") > size
    alloc = frontier.recipe(src, cost, kinds, size, tmp_path / "recipe.json")
    assert sum(o.nbytes for o in alloc.choice.values()) + alloc.fixed <= size

    tokens = gb._calib_tokens(model, src, s)
    cfg = QuantConfig(method="gptq", device="cpu")
    by_size = GGUFTarget(size=SizeTarget(target_size=size)).quant_config(cfg, src, tokens)
    by_recipe = GGUFTarget(recipe=str(tmp_path / "recipe.json")).quant_config(cfg, src, tokens)
    assert by_recipe.grids == by_size.grids == alloc.grids()
    assert len({g["kind"] if g else FLOAT for g in alloc.grids().values()}) > 1  # a real mix


def test_frontier_costs_add_candidate_types_without_measuring_again(tiny_hf_dir, tmp_path, monkeypatch):
    model = str(tiny_hf_dir)
    src = load_source(model)
    kinds = tuple(sorted({o.label for opts in options(src.spec).values() for o in opts} - {FLOAT}))
    settings = lambda out: gb.Settings("wiki", 2, 64, 1, 64, 1, 0, 0, "cpu", False, False, out)  # noqa: E731
    for d in "ab":
        (tmp_path / d).mkdir()
    at_once, _ = frontier.costs(src, model, settings(tmp_path / "a"), kinds)
    frontier.costs(src, model, settings(tmp_path / "b"), kinds[:2])
    measured = []
    real = frontier.measure
    monkeypatch.setattr(frontier, "measure", lambda *a, **k: measured.append(a[3]) or real(*a, **k))
    added, _ = frontier.costs(src, model, settings(tmp_path / "b"), kinds)
    assert added == at_once
    assert {k for specs in measured[0].values() for k in specs} == set(kinds[2:])  # only the new types
