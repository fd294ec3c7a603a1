"""Calibration that streams the source's weights layer by layer, offloads its activations and
writes a resumable checkpoint as it goes: each path gives the same bits as the in-memory one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from converters.gguf.target import GGUFTarget
from d2quant.checkpoint import CheckpointWriter, fingerprint
from d2quant.errors import D2Error
from d2quant.pipeline import QuantConfig, quantize
from d2quant.qmodel import QuantizedModel
from d2quant.sources import load_source

torch.manual_seed(0)
CALIB = torch.randint(0, 300, (6, 48))
CFG = dict(method="d2quant", bits=3, group_size=32, batch=2)


def assert_same(a: QuantizedModel, b: QuantizedModel) -> None:
    assert list(a.linears) == list(b.linears) and list(a.tensors) == list(b.tensors)
    for n in a.linears:
        qa, qb = a.linears[n], b.linears[n]
        assert qa.grid.spec() == qb.grid.spec() and torch.equal(qa.codes, qb.codes), n
        assert all(torch.equal(qa.params[k], qb.params[k]) for k in qa.params), n
        assert (qa.bias is None) == (qb.bias is None) and (qa.bias is None or torch.equal(qa.bias, qb.bias)), n
    for n in a.tensors:
        assert torch.equal(a.tensors[n], b.tensors[n]), n


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tiny_hf_dir):
    """The tiny LLaMA re-saved as bf16 in several shards, as large models ship."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("sharded")
    m = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.bfloat16)
    m.save_pretrained(d, max_shard_size="100KB")
    for f in tiny_hf_dir.iterdir():
        if f.name.startswith(("tokenizer", "special")):
            shutil.copy(f, d / f.name)
    assert len(list(d.glob("model-*.safetensors"))) > 2
    return d


def test_streamed_calibration_is_bit_identical(sharded_dir):
    whole = load_source(str(sharded_dir))
    streamed = load_source(str(sharded_dir), stream=True)
    assert all(p.is_meta for p in streamed.model.parameters())  # nothing read yet
    a = quantize(whole, CALIB, QuantConfig(**CFG))
    b = quantize(streamed, CALIB, QuantConfig(**CFG, stream=True))
    assert_same(a, b)
    assert all(p.is_meta for p in streamed.model.model.layers.parameters())  # every layer freed again


def test_float_stream_teacher_matches_the_whole_float_model(tiny_hf_dir):
    """The final-norm DAC shift, from the float layers streamed beside the quantized ones, is what
    the whole float model gives on the same tokens (within float rounding)."""
    src = load_source(str(tiny_hf_dir))
    with torch.no_grad():
        teacher = src.model.model(input_ids=CALIB).last_hidden_state.reshape(-1, src.spec.hidden).mean(0)
    qm = quantize(src, CALIB, QuantConfig(**CFG))
    model = qm.to_torch()
    with torch.no_grad():
        student = model.model(input_ids=CALIB).last_hidden_state.reshape(-1, src.spec.hidden).mean(0)
    head = qm.tensors["model.embed_tokens.weight"]  # tied
    want = (teacher - student) @ head.T
    got = qm.tensors["lm_head.bias"]
    assert got.abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offloaded_activations_are_bit_identical(tiny_hf_dir, offload):
    a = quantize(load_source(str(tiny_hf_dir)), CALIB, QuantConfig(**CFG))
    b = quantize(load_source(str(tiny_hf_dir)), CALIB, QuantConfig(**CFG, offload=offload))
    assert_same(a, b)
    assert b.report["offload"]["where"] == ("disk" if offload == "disk" else "device")
    assert a.report["offload"]["where"] == "device"


def test_offload_refuses_what_does_not_fit(monkeypatch):
    from d2quant import activations

    monkeypatch.setattr(activations, "_free_ram", lambda: 2**30)
    with pytest.raises(D2Error, match="--offload disk"):
        activations.plan_offload("cpu", torch.device("cpu"), 2**31)
    assert activations.plan_offload("auto", torch.device("cpu"), 2**31).where == "disk"
    with pytest.raises(D2Error, match="free space"):
        activations.plan_offload("disk", torch.device("cpu"), 2**62)


class Interrupt(Exception):
    pass


def _run(src_dir, out, cfg, *, resume=False, force=False, stop_after=None):
    src = load_source(str(src_dir), stream=cfg.stream)
    recipe = {**cfg.__dict__}
    sink = CheckpointWriter(out, fingerprint(recipe, src.spec, src.info, CALIB), resume=resume, force=force)

    def on_layer(i, stats):
        if stop_after is not None and i == stop_after:
            raise Interrupt

    return quantize(src, CALIB, cfg, on_layer=on_layer, sink=sink, recipe=recipe)


def test_resume_equals_an_uninterrupted_run(sharded_dir, tmp_path):
    cfg = QuantConfig(**CFG, stream=True)
    whole = _run(sharded_dir, tmp_path / "whole", cfg)
    with pytest.raises(Interrupt):
        _run(sharded_dir, tmp_path / "cut", cfg, stop_after=0)
    partial = tmp_path / "cut.partial"
    assert json.loads((partial / "progress.json").read_text())["layers"][0]["layer"] == 0
    assert not (tmp_path / "cut").exists()
    with pytest.raises(D2Error, match="--resume"):  # neither resumed nor forced
        _run(sharded_dir, tmp_path / "cut", cfg)
    with pytest.raises(D2Error, match="other options"):
        _run(sharded_dir, tmp_path / "cut", QuantConfig(**{**CFG, "bits": 2}, stream=True), resume=True)
    resumed = _run(sharded_dir, tmp_path / "cut", cfg, resume=True)
    assert not partial.exists()
    assert_same(whole, resumed)
    for f in sorted((tmp_path / "whole").rglob("*.safetensors")):
        other = tmp_path / "cut" / f.relative_to(tmp_path / "whole")
        a, b = load_file(str(f)), load_file(str(other))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
    # the checkpoint read back holds what calibration made, one layer file at a time
    back = QuantizedModel.load(tmp_path / "cut")
    assert len(list((tmp_path / "cut" / "layers").iterdir())) == back.spec.layers
    assert_same(quantize(load_source(str(sharded_dir)), CALIB, QuantConfig(**CFG)), back)


def _tiny_gguf(arch: str, folder):
    """A tiny random ``arch`` in a GGUF as our writer makes them (tokenizer and all), Q4_0."""
    from tests.test_gguf_export import _export, cached_model

    return _export(cached_model(arch, "Q4_0", dac=False), folder, f"{arch}.gguf")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "phi3"])
def test_gguf_tensors_stream_as_transformers_loads_them(arch, tmp_path, monkeypatch):
    """Each tensor, dequantized alone from its offset (a few rows at a time, as a vocabulary table
    is), is the one transformers' whole-file load gives: llama's q/k RoPE order undone, Gemma's norm
    offset removed, Phi-3's fused linears."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from d2quant import weights as weights_module
    from d2quant.weights import GGUFWeights, skeleton

    monkeypatch.setattr(weights_module, "DEQUANTIZE_ROWS", 5)

    path = _tiny_gguf(arch, tmp_path)
    model = skeleton(AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name))
    whole = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    weights = GGUFWeights(path, model)
    names = [n for n, _ in model.named_parameters()]
    assert names and set(names) <= set(whole)
    for n in names:
        assert torch.equal(weights.tensor(n), whole[n].float()), n


def test_streamed_gguf_calibrates_as_the_whole_load(tmp_path, monkeypatch):
    monkeypatch.setenv("D2EXPORT_CACHE", str(tmp_path / "cache"))
    path = _tiny_gguf("llama", tmp_path)
    streamed = load_source(str(path), stream=True)
    assert all(p.is_meta for p in streamed.model.parameters())
    assert not (tmp_path / "cache").exists()  # no float copy of the file is made
    whole = load_source(str(path))
    q4_0 = GGUFTarget("Q4_0")  # a preset that quantizes the vocabulary table too
    whole_q = quantize(whole, CALIB, q4_0.quant_config(QuantConfig(**CFG), whole, CALIB))
    streamed_q = quantize(streamed, CALIB, q4_0.quant_config(QuantConfig(**CFG, stream=True), streamed, CALIB))
    assert "model.embed_tokens" in streamed_q.linears
    assert_same(whole_q, streamed_q)
    assert streamed.model.model.embed_tokens.weight.is_meta  # the quantized table's float copy is freed
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 4096])  # the last tensors cut short
    with pytest.raises(D2Error, match="truncated|corrupt"):
        load_source(str(path), stream=True).weights.tensor("model.norm.weight")


def test_streaming_refusals(sharded_dir, tmp_path):
    with pytest.raises(D2Error, match="drop --stream"):
        load_source("smollm2-135m-pad768", stream=True)
    with pytest.raises(D2Error, match="--rotate"):
        QuantConfig(stream=True, rotate=True)
    with pytest.raises(D2Error, match="--offload"):
        QuantConfig(offload="tape")
    broken = tmp_path / "broken"
    shutil.copytree(sharded_dir, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(D2Error, match="missing"):
        load_source(str(broken), stream=True)
    shard.write_bytes(b"\x10\x00")
    with pytest.raises(D2Error, match="corrupt"):
        load_source(str(broken), stream=True)


def test_cli_streams_into_a_gguf_llama_cpp_loads(tiny_hf_dir, tmp_path):
    from tests.test_cli import CAL, invoke

    g = tmp_path / "m.gguf"
    r = invoke("gguf", tiny_hf_dir, "--stream", "--offload", "disk", "-o", g, "--type", "Q4_0",
               "--method", "gptq", *CAL)
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output and "disk" in r.output
    r = invoke("onnx", tiny_hf_dir, "--stream", "-o", tmp_path / "onnx", "--bits", "4", "--method", "d2quant", *CAL)
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output
    r = invoke("quantize", tiny_hf_dir, "--stream", "--calib", "self", "-o", tmp_path / "ck")
    assert r.exit_code == 2 and "whole model" in r.output
    r = invoke("quantize", tiny_hf_dir, "--resume", "-o", tmp_path / "ck", *CAL)
    assert r.exit_code == 2 and "no interrupted run" in r.output
    assert not (tmp_path / "ck").exists()


def test_an_interrupted_gguf_export_resumes_from_its_saved_checkpoint(tiny_hf_dir, tmp_path, monkeypatch):
    from d2quant.pipeline import Calibrator
    from tests.test_cli import CAL, invoke

    args = ["gguf", tiny_hf_dir, "--type", "Q4_0", "--method", "gptq", "--no-verify", *CAL]
    whole = tmp_path / "whole.gguf"
    assert invoke(*args, "-o", whole, "--save-checkpoint", tmp_path / "ck0").exit_code == 0
    finish = Calibrator._finish_layer

    def finish_then_stop(self, i, *a):
        finish(self, i, *a)
        raise Interrupt
    monkeypatch.setattr(Calibrator, "_finish_layer", finish_then_stop)
    g, ck = tmp_path / "m.gguf", tmp_path / "ck"
    with pytest.raises(Interrupt):
        invoke(*args, "-o", g, "--save-checkpoint", ck)
    monkeypatch.undo()
    assert (tmp_path / "ck.partial").is_dir() and not g.exists()
    r = invoke(*args, "-o", g, "--save-checkpoint", ck)
    assert r.exit_code == 2 and "--resume" in r.output, r.output
    r = invoke(*args, "-o", g, "--save-checkpoint", ck, "--resume")
    assert r.exit_code == 0 and "resuming" in r.output, r.output
    assert g.read_bytes() == whole.read_bytes()


def test_two_gloo_processes_give_the_same_checkpoint(sharded_dir, tmp_path):
    """torchrun --nproc-per-node 2 (gloo on CPU): samples split over the ranks, sums chained in
    batch order, linears solved on both ranks: every checkpoint file equals one process's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_cli import CAL, invoke

    args = ["quantize", str(sharded_dir), "--method", "d2quant", "--bits", "3", "--group-size", "32",
            "--stream", *[str(a) for a in CAL], "--nsamples", "24"]  # 3 batches of 8: 1 + 2 per rank
    r = invoke(*args, "-o", tmp_path / "one")
    assert r.exit_code == 0, r.output
    exe = Path(sys.executable).with_name("d2export")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", "29533", str(exe), *args, "-o", str(tmp_path / "two")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    one, two = tmp_path / "one", tmp_path / "two"
    files = sorted(f.relative_to(one) for f in one.rglob("*.safetensors"))
    assert files == sorted(f.relative_to(two) for f in two.rglob("*.safetensors")) and len(files) == 3
    for f in files:
        a, b = load_file(str(one / f)), load_file(str(two / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert [x["error"] for x in ma["report"]["layers"]] == [x["error"] for x in mb["report"]["layers"]]


def _ranks(script: list[str], args: list[str], port: int, extra_env: dict | None = None):
    """Two calibration processes started as torchrun starts them (env://), without its agent, which
    would kill the survivors of a dead rank before they could report it."""
    import os
    import subprocess

    procs = [subprocess.Popen([*script, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(r),
                                   "LOCAL_RANK": str(r), **(extra_env or {})})
             for r in range(2)]
    return [(p.wait(timeout=300), p.stdout.read()) for p in procs]


def test_a_dead_rank_stops_the_others_with_one_line_and_the_checkpoint_resumes(sharded_dir, tmp_path):
    import sys
    from pathlib import Path

    from tests.test_cli import CAL, invoke

    args = ["quantize", str(sharded_dir), "--method", "d2quant", "--bits", "3", "--group-size", "32",
            "--stream", *[str(a) for a in CAL], "--nsamples", "24"]
    assert invoke(*args, "-o", tmp_path / "one").exit_code == 0
    dying = [sys.executable, str(Path(__file__).with_name("dying_rank.py"))]
    (rc0, out0), (rc1, _) = _ranks(dying, [*args, "-o", str(tmp_path / "two")], 29541, {"D2_TEST_DIE_RANK": "1"})
    assert rc1 == 9 and rc0 == 2, out0[-2000:]
    assert "lost contact with the other calibration processes" in out0 and "--resume" in out0, out0[-2000:]
    assert "Traceback" not in out0
    partial = tmp_path / "two.partial"
    assert json.loads((partial / "progress.json").read_text())["layers"][0]["layer"] == 0
    assert not (tmp_path / "two").exists()

    exe = [str(Path(sys.executable).with_name("d2export"))]
    (rc0, out0), (rc1, out1) = _ranks(exe, [*args, "-o", str(tmp_path / "two"), "--resume"], 29542)
    assert rc0 == rc1 == 0, out0[-2000:] + out1[-2000:]
    one, two = tmp_path / "one", tmp_path / "two"
    files = sorted(f.relative_to(one) for f in one.rglob("*.safetensors"))
    assert files == sorted(f.relative_to(two) for f in two.rglob("*.safetensors"))
    for f in files:
        a, b = load_file(str(one / f)), load_file(str(two / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_a_streamed_vocabulary_table_is_rounded_by_blocks_of_rows_as_whole(kind, sharded_dir, tmp_path, monkeypatch):
    """The quantized table (and the head's DAC bias through it) read and rounded a few rows at a
    time, never whole: the same bits as the in-memory model's, which goes by the same blocks, and
    the codes of the table rounded whole."""
    import d2quant.weights as weights

    path = sharded_dir if kind == "safetensors" else _tiny_gguf("llama", tmp_path)
    q4_0 = GGUFTarget("Q4_0")

    def run(stream: bool) -> QuantizedModel:
        src = load_source(str(path), stream=stream)
        return quantize(src, CALIB, q4_0.quant_config(QuantConfig(**CFG, stream=stream), src, CALIB))
    one_block = run(False)
    read = []
    real = weights._StreamedWeights.row_blocks

    def spy(self, module, prefix):
        for rows, w in real(self, module, prefix):
            read.append(rows)
            yield rows, w
    monkeypatch.setattr(weights, "ROW_BLOCK", 37)
    monkeypatch.setattr(weights._StreamedWeights, "row_blocks", spy)
    whole, streamed = run(False), run(True)
    vocab = one_block.linears["model.embed_tokens"].codes.shape[0]
    assert len(read) == -(-vocab // 37) > 1 and read[-1].stop == vocab
    assert streamed.report["final_dac_shift"] > 0
    assert_same(whole, streamed)
    for name in {"model.embed_tokens", "lm_head"} & set(streamed.linears):
        a, b = one_block.linears[name], streamed.linears[name]
        assert torch.equal(a.codes, b.codes) and all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    bias = [qm.linears["lm_head"].bias if "lm_head" in qm.linears else qm.tensors["lm_head.bias"]
            for qm in (one_block, streamed)]
    assert torch.allclose(*bias, rtol=1e-5, atol=1e-7)
