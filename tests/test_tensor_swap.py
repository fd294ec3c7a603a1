"""bench/tensor_swap.py: a GGUF with some tensors re-rounded by llama.cpp, everything else as it was."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the benchmarks' own imports

import tensor_swap  # noqa: E402
from d2quant.errors import D2Error  # noqa: E402
from runtime_tests.libggml import quantize_rows  # noqa: E402
from runtime_tests.llamacpp import LlamaCppDecoder  # noqa: E402
from tests.test_gguf_export import _export, cached_model  # noqa: E402


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


def test_swap_rerounds_only_the_named_tensors(tmp_path):
    qm = cached_model("llama", "Q8_0")
    ours = _export(qm, tmp_path, "ours.gguf", preset="Q8_0")
    floats = {f"{n}.weight": lin.weight().float() for n, lin in qm.linears.items()}
    float_path = _export(dataclasses.replace(qm, linears={}, tensors={**qm.tensors, **floats}), tmp_path,
                         "float.gguf")
    out = tmp_path / "swapped.gguf"
    tensor_swap.swapped_file(ours, float_path, {"blk.0.ffn_up.weight": "llamacpp",
                                                "blk.1.attn_q.weight": "Q4_0"}, out)
    before, after, flt = _tensors(ours), _tensors(out), gguf.GGUFReader(str(float_path))
    assert before.keys() == after.keys()
    for name, how in (("blk.0.ffn_up.weight", "Q8_0"), ("blk.1.attn_q.weight", "Q4_0")):
        w = np.asarray(next(t for t in flt.tensors if t.name == name).data, dtype=np.float32)
        assert after[name] == (how, quantize_rows(how, w))
    assert all(after[n] == before[n] for n in before if n not in ("blk.0.ffn_up.weight", "blk.1.attn_q.weight"))
    r0, r1 = gguf.GGUFReader(str(ours)).fields, gguf.GGUFReader(str(out)).fields
    assert {k: r0[k].contents() for k in r0 if not k.startswith("GGUF.")} == \
           {k: r1[k].contents() for k in r1 if not k.startswith("GGUF.")}
    dec = LlamaCppDecoder(out, n_ctx=64)  # stock llama.cpp loads the rewritten file
    try:
        assert np.isfinite(dec.logits([1, 5, 9, 3])).all()
    finally:
        dec.close()

    # a donor's layer exactly, chosen by glob: the float file's layer 1 into ours; our DAC biases
    # there, which the donor lacks, go with it
    tensor_swap.swapped_file(ours, float_path, {"blk.1.*": str(float_path)}, out)
    after, donor = _tensors(out), _tensors(float_path)
    assert {n for n in before if n.startswith("blk.1.") and n not in donor} == {"blk.1.ffn_gate.bias",
                                                                               "blk.1.ffn_up.bias"}
    assert after == {**{n: v for n, v in before.items() if not n.startswith("blk.1.")},
                     **{n: v for n, v in donor.items() if n.startswith("blk.1.")}}
    assert after["blk.1.ffn_down.weight"][0] == "F32" and before["blk.1.ffn_down.weight"][0] == "Q8_0"

    for bad, match in (({"blk.9.*": "Q8_0"}, "blk.9.* matches no tensor"),
                       ({"blk.0.*": "Q9_K"}, "say llamacpp, a GGML type"),
                       ({"blk.0.*": str(tmp_path / "none.gguf")}, "donor file does not exist")):
        with pytest.raises(D2Error, match=match):
            tensor_swap.swapped_file(ours, float_path, bad, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob("*.part"))
