"""bench/scale.py: the equality it reports (N processes, or loading whole, against the streamed
1-process run) is about results, not timings or recipes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the benchmarks' own imports

import scale  # noqa: E402


def _checkpoint(folder: Path, codes: torch.Tensor, seconds: float) -> Path:
    (folder / "layers").mkdir(parents=True)
    save_file({"codes": codes}, str(folder / "layers" / "00000.safetensors"))
    report = {"layers": [{"layer": 0, "seconds": seconds, "error": {"q": 0.02}}], "peak_mem_mb": seconds * 100}
    (folder / "manifest.json").write_text(json.dumps({"report": report, "grid": "W3 g64"}))
    return folder


def test_same_checkpoint_ignores_timings_and_catches_a_changed_code(tmp_path):
    codes = torch.arange(12, dtype=torch.uint8)
    one = _checkpoint(tmp_path / "one", codes, 1.0)
    assert scale.same_checkpoint(one, _checkpoint(tmp_path / "two", codes, 2.5))
    other = codes.clone()
    other[3] += 1
    assert not scale.same_checkpoint(one, _checkpoint(tmp_path / "three", other, 1.0))
    changed = _checkpoint(tmp_path / "four", codes, 1.0)
    (changed / "manifest.json").write_text((changed / "manifest.json").read_text().replace("0.02", "0.03"))
    assert not scale.same_checkpoint(one, changed)
    extra = _checkpoint(tmp_path / "five", codes, 1.0)
    (extra / "extra.json").write_text("{}")
    assert not scale.same_checkpoint(one, extra)


def _gguf(path: Path, data: np.ndarray, recipe: str) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("d2export.recipe", recipe)
    w.add_tensor("blk.0.ffn_down.weight", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_same_gguf_tensors_ignores_the_recipe_and_catches_a_changed_byte(tmp_path):
    data = np.arange(64, dtype=np.float32).reshape(2, 32)
    one = _gguf(tmp_path / "one.gguf", data, "stream")
    assert scale.same_gguf_tensors(one, _gguf(tmp_path / "two.gguf", data, "whole"))
    other = data.copy()
    other[1, 5] += 1
    assert not scale.same_gguf_tensors(one, _gguf(tmp_path / "three.gguf", other, "stream"))


def test_run_reports_the_childs_own_peak_not_its_parents(tmp_path):
    """A child started after this process peaked: ru_maxrss would carry that peak over exec."""
    import numpy as np
    from d2quant.cpu import peak_rss_mb

    big = np.ones(512 * 2**20 // 8)  # this process past 512 MiB, then back down
    big += 1
    del big
    assert peak_rss_mb() > 512
    child = "import numpy as np, time; a = np.ones(64 * 2**20 // 8); a += 1; time.sleep(1.0)"
    wall, peak, rc = scale.run([sys.executable, "-c", child], tmp_path / "child.log")
    assert rc == 0
    assert 64 <= peak < 400, peak  # numpy and 64 MiB, nowhere near this process's peak


def test_make_model_one_shard_at_a_time_writes_the_old_bytes(tmp_path):
    """The shards as d5628c9's make_model (every shard made before the first was saved) wrote them."""
    import hashlib

    folder = scale.make_model(128, 256, 2, tmp_path / "tiny")
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    assert h.hexdigest() == "2b8f75c8d792886ff71f527d849b32ca0a0c813788ee0240e28c9332f385f1af"
