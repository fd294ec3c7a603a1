"""The real Gemma 3 270M (alias gemma3-270m, from its PyPI chunk packages) through `d2export gguf`
and `d2export onnx`, each ending in the runtime's parity check (slow: minutes on two cores)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from d2export.cli import app
from tests.conftest import DATA

pytestmark = pytest.mark.slow
runner = CliRunner()


def _run(*args):
    r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0 and "runtime parity: PASS" in r.output, r.output
    return r


def test_gemma3_270m_gguf_gptq_passes_llama_cpp_parity(tmp_path):
    # DAC's ffn biases have no carrier in llama.cpp's gemma3 (converters/gguf/arch.py): --no-dac
    _run("gguf", "gemma3-270m", "-o", tmp_path / "g.gguf", "--type", "Q4_K_M", "--method", "gptq",
         "--calib", DATA / "valid.txt", "--nsamples", "4", "--seqlen", "128")


def test_gemma3_270m_onnx_passes_onnxruntime_parity(tmp_path):
    _run("onnx", "gemma3-270m", "-o", tmp_path / "o", "--method", "rtn", "--bits", "4", "--block-size", "32",
         "--embed", "q4")
