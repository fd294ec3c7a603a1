"""A native crash in a runtime is one clear error, never a dead process (issue: SIGILL on AMX VMs).

The runtimes run in worker processes (runtime_tests.isolation). These tests replace the class the
worker builds with one that kills itself, and check that every command turns that into one line
naming the crash, its likely cause and the rebuild command, keeps what it wrote, and exits non-zero.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from d2export.cli import app
from d2quant.errors import D2Error
from runtime_tests.isolation import Runtime, RuntimeCrash, Worker, crash_message
from runtime_tests.llamacpp import LlamaCppDecoder
from runtime_tests.llamacpp_build import rebuild_command
from runtime_tests.onnxrt import OrtDecoder
from tests.conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
CAL = ["--calib", str(DATA / "valid.txt"), "--nsamples", "2", "--seqlen", "32"]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _error_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("error:")]


@pytest.fixture
def crashing_llama(monkeypatch):
    monkeypatch.setattr(LlamaCppDecoder, "native", "tests.fake_runtime:CrashingLlama")


def test_a_sigill_in_the_worker_is_a_runtime_crash_with_the_rebuild_command():
    rt = Runtime("llama.cpp", rebuild_command)
    w = Worker("tests.fake_runtime:CrashingLlama", "x.gguf", runtime=rt, label="x.gguf")
    assert w.info == {"n_vocab": 512} and w.call("tokenize", "ab") == [97, 98]
    with pytest.raises(RuntimeCrash) as e:
        w.call("logits", [1, 2, 3])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("llama.cpp crashed (SIGILL) while running logits on x.gguf")
    assert "illegal instruction" in msg and "AMX" in msg
    assert rebuild_command() in msg
    with pytest.raises(D2Error, match="closed"):  # a dead worker is not called again
        w.call("tokenize", "a")


def test_crash_while_loading_and_while_streaming():
    rt = Runtime("llama.cpp", rebuild_command)
    with pytest.raises(RuntimeCrash, match=r"crashed \(SIGILL\) while loading m.gguf"):
        Worker("tests.fake_runtime:CrashingAtLoad", runtime=rt, label="m.gguf")
    w = Worker("tests.fake_runtime:CrashingLlama", "m.gguf", runtime=rt, label="m.gguf")
    got = []
    with pytest.raises(RuntimeCrash, match="while running complete"):
        for piece in w.stream("complete", "hi", 4, True):
            got.append(piece)
    assert got == ["first piece"]


def test_crash_messages_name_cause_and_repair():
    rt = Runtime("onnxruntime", lambda: "pip install --force-reinstall onnxruntime")
    segv = crash_message(rt, -signal.SIGSEGV, "running logits on m")
    assert "SIGSEGV" in segv and "corrupt" in segv and "pip install --force-reinstall onnxruntime" in segv
    assert "out-of-memory" in crash_message(rt, -signal.SIGKILL, "x")
    assert "exit status 3" in crash_message(rt, 3, "x")


def test_runtime_errors_come_back_as_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(D2Error, match="llama.cpp cannot load .*bad.gguf") as e:
        LlamaCppDecoder(bad)
    assert not isinstance(e.value, RuntimeCrash) and "\n" not in str(e.value)
    with pytest.raises(D2Error, match="does not exist"):
        LlamaCppDecoder(tmp_path / "missing.gguf")


def test_a_runtime_library_that_fails_to_load(tmp_path, monkeypatch):
    fake = tmp_path / "llama_cpp"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise OSError('libllama.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the worker imports what this process would
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(D2Error, match="libraries fail to load .*libllama.so.*pip install"):
        LlamaCppDecoder(model)


def test_gguf_keeps_file_and_checkpoint_when_llama_cpp_crashes(crashing_llama, tiny_hf_dir, tmp_path):
    out, ck = tmp_path / "m.gguf", tmp_path / "ck"
    r = invoke("gguf", tiny_hf_dir, "-o", out, "--type", "Q4_0", "--method", "gptq", *CAL,
               "--save-checkpoint", ck)
    assert r.exit_code != 0, r.output
    [line] = _error_lines(r.output)
    assert "kept" in line and str(out) in line and str(ck) in line and "crashed (SIGILL)" in line, line
    assert "CMAKE_ARGS=" in line
    assert out.stat().st_size > 0 and (ck / "manifest.json").is_file()
    # the kept checkpoint and file are whole: verify reports the same crash, in one line
    r = invoke("verify", out, "--reference", ck)
    assert r.exit_code != 0 and len(_error_lines(r.output)) == 1 and "SIGILL" in r.output
    r = invoke("eval", out, "--text", DATA / "test.txt", "--ctx", "64", "--max-windows", "1")
    assert r.exit_code != 0 and "crashed (SIGILL)" in _error_lines(r.output)[0]
    r = invoke("generate", out, "--prompt", "hi", "--max-new-tokens", "4")
    assert r.exit_code != 0 and "crashed (SIGILL)" in _error_lines(r.output)[0], repr(r.output)


def test_onnx_keeps_its_folder_when_onnxruntime_crashes(monkeypatch, tiny_hf_dir, tmp_path):
    monkeypatch.setattr(OrtDecoder, "native", "tests.fake_runtime:CrashingOrt")
    out = tmp_path / "o"
    r = invoke("onnx", tiny_hf_dir, "-o", out, "--method", "rtn", "--block-size", "32")
    assert r.exit_code != 0, r.output
    [line] = _error_lines(r.output)
    assert "kept" in line and "onnxruntime crashed (SIGSEGV)" in line, line
    assert (out / "model.onnx").is_file()


def test_corrupt_files_get_one_line(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    for args in (("eval", junk, "--text", DATA / "test.txt"), ("generate", junk, "--prompt", "x")):
        r = invoke(*args)
        assert r.exit_code == 2 and len(_error_lines(r.output)) == 1, r.output
        assert "cannot load" in r.output, r.output


def test_one_crashing_test_does_not_take_the_suite_down(tmp_path):
    """The project's pytest configuration runs tests in crash-isolated workers (pytest-xdist)."""
    (tmp_path / "test_crash.py").write_text(textwrap.dedent("""
        import os, signal

        def test_dies():
            os.kill(os.getpid(), signal.SIGILL)

        def test_lives():
            assert True
    """))
    r = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"),
                        "--rootdir", str(tmp_path), "-p", "no:cacheprovider", str(tmp_path / "test_crash.py")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "1 failed, 1 passed" in out and "crashed" in out, out
