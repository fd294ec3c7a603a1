"""Memory scaling of calibration and export: peak RSS and wall time against model depth.

Synthetic random LLaMA-shaped models (issue 13's shapes: hidden 2048 / ffn 8192 at 6, 12, 24
layers; hidden 3072 / ffn 8192 at 28 layers, about 3B) are written once as sharded bf16 safetensors
with SmolLM2's tokenizer, one layer at a time, so making them never needs the whole model in memory
(until 2026-12-07 every shard was made before the first was saved: 5.9 GiB for the 3B).
Each run is one ``d2export`` command in a child process; its peak RSS is the child's own highest
VmHWM, sampled every 0.2 s (``rss_trace.ChildPeak``). Rows before 2026-12-07 recorded the child's
``ru_maxrss``, which Linux carries over exec from the parent that started it: a row whose run made
its model in the same bench process reported that making's peak whenever it was higher.
Random weights say nothing about quality: these rows are about memory and time only.

    python bench/scale.py --shapes 2048x8192x6 2048x8192x24 --command gguf --stream
    python bench/scale.py --shapes 2048x8192x12 --command quantize --nproc 2   # torchrun, gloo on CPU
    python bench/scale.py --shapes --models qwen2.5-coder-1.5b --type Q3_K_M --no-stream
    python bench/scale.py --table

With ``--nproc N`` the command runs under ``torchrun --nproc-per-node N``; its peak RSS is then the
largest single process's (the highest VmHWM among the child and its descendants). A run that
is not the streamed 1-process one (``--no-stream`` or ``--nproc``) is compared with that run's output
when it exists (run it first, with the same options): a checkpoint's tensors byte for byte and its manifest up to its timings, a GGUF's
tensors byte for byte (its recipe records the options, so it differs).
"""

from __future__ import annotations

import argparse
import filecmp
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from resultlog import append_row, read_rows  # bench/ is on sys.path when run as a script
from rss_trace import ChildPeak
from d2quant.data import wikitext_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "scale.jsonl"
MODELS = ROOT / "out" / "scale" / "models"
VOCAB = 49152  # SmolLM2's tokenizer


def parse_shape(text: str) -> tuple[int, int, int]:
    hidden, ffn, layers = (int(v) for v in text.split("x"))
    return hidden, ffn, layers


def make_model(hidden: int, ffn: int, layers: int, folder: Path) -> Path:
    """A random bf16 LLaMA of this shape, one shard per decoder layer (plus one for the rest)."""
    from transformers import LlamaConfig

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    heads = hidden // 128
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=128,
                      vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=4096,
                      architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    kv = cfg.num_key_value_heads * 128
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    def shards():  # generated in this order, so the random values do not depend on how they are saved
        yield {"model.embed_tokens.weight": rnd(VOCAB, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        for i in range(layers):
            p = f"model.layers.{i}."
            yield {p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                   p + "self_attn.q_proj.weight": rnd(hidden, hidden), p + "self_attn.k_proj.weight": rnd(kv, hidden),
                   p + "self_attn.v_proj.weight": rnd(kv, hidden), p + "self_attn.o_proj.weight": rnd(hidden, hidden),
                   p + "mlp.gate_proj.weight": rnd(ffn, hidden), p + "mlp.up_proj.weight": rnd(ffn, hidden),
                   p + "mlp.down_proj.weight": rnd(hidden, ffn)}

    weight_map, total, n = {}, 0, layers + 1
    for j, shard in enumerate(shards()):  # one shard in memory at a time
        name = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * 2 for t in shard.values())
        del shard  # before the next is made
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(folder)
    from d2quant.sources import load_source
    load_source("smollm2-135m").tokenizer.save_pretrained(folder)
    return folder


def float32_bytes(folder: Path) -> int:
    return json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"] * 2


def synthetic(text: str) -> tuple[str, str, int, float]:
    """(label, source argument, layers, float32 GiB) of a synthetic shape, made on first use."""
    hidden, ffn, layers = parse_shape(text)
    folder = make_model(hidden, ffn, layers, MODELS / text)
    return f"{hidden}/{ffn}", str(folder), layers, float32_bytes(folder) / 2**30


def real(name: str) -> tuple[str, str, int, float]:
    """The same for a real model given as a GGUF alias or file (its float32 size, not the file's)."""
    from d2quant.sources import resolve
    from d2quant.weights import open_gguf

    kind, path = resolve(name)
    if kind != "gguf":
        raise SystemExit(f"--models takes GGUF aliases or files, not {name}; synthetic models go in --shapes")
    reader, arch = open_gguf(path)
    layers = int(reader.fields[f"{arch}.block_count"].parts[-1][0])
    return name, name, layers, sum(int(t.n_elements) for t in reader.tensors) * 4 / 2**30


def run(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """(wall s, peak RSS MiB, exit code) of one command in a child process; the peak is the child's
    own (``rss_trace.ChildPeak``: not its ``ru_maxrss``, which carried this process's peak)."""
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        watch = ChildPeak(p.pid)
        _, status, _ = os.wait4(p.pid, 0)
        peak = watch.stop()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        print(log.read_text()[-3000:])
    return time.time() - t0, peak, p.returncode


def commit() -> str:
    """The code a row was measured with: HEAD, marked when tracked files differ from it."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "-uno") else "")


MEASURED = {"seconds", "peak_mem_mb", "start_mem_mb"}  # the manifest's clock and memory readings


def _results(node):
    """A manifest without its clock and memory readings, which differ between any two runs."""
    if isinstance(node, dict):
        return {k: _results(v) for k, v in node.items() if k not in MEASURED}
    return [_results(v) for v in node] if isinstance(node, list) else node


def same_checkpoint(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold the same files: tensors byte for byte, manifests up to timings."""
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if names != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return False
    manifest = Path("manifest.json")
    return (all(filecmp.cmp(a / n, b / n, shallow=False) for n in names if n != manifest)
            and _results(json.loads((a / manifest).read_text())) == _results(json.loads((b / manifest).read_text())))


def same_gguf_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUF files hold the same tensors: names, types and data bytes."""
    import numpy as np
    from gguf import GGUFReader

    ta, tb = ({t.name: t for t in GGUFReader(str(f)).tensors} for f in (a, b))
    return ta.keys() == tb.keys() and all(
        ta[n].tensor_type == tb[n].tensor_type
        and np.array_equal(np.asarray(ta[n].data).view(np.uint8), np.asarray(tb[n].data).view(np.uint8)) for n in ta)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", default=["2048x8192x6", "2048x8192x12", "2048x8192x24", "3072x8192x28"],
                    help="HIDDENxFFNxLAYERS")
    ap.add_argument("--models", nargs="*", default=[], help="real models (GGUF aliases or files), after the shapes")
    ap.add_argument("--command", default="gguf", choices=("gguf", "quantize"))
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--type", default="Q4_K_M", help="GGUF preset (gguf command)")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--nproc", type=int, default=1, help="processes under torchrun (gloo on CPU)")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args(argv)
    if a.table:
        print("| model | layers | float32 GiB | command | stream | processes | calibration | wall s | "
              "peak RSS GiB | RSS / float32 | same result as streamed 1 process | commit |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in read_rows(a.results):
            same = {True: "yes", False: "**no**", None: "-"}[r.get("equal_to_reference")]
            print(f"| {r['shape']} | {r['layers']} | {r['float32_gib']:.2f} | {r['command']} {r.get('type', '')} | "
                  f"{r['stream']} | {r.get('nproc', 1)} | {r['nsamples']}×{r['seqlen']} | {r['wall_s']:.0f} | "
                  f"{r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] / r['float32_gib']:.0%} | {same} | {r.get('commit', '-')} |")
        return
    exe = str(Path(sys.executable).with_name("d2export"))
    launch = [exe] if a.nproc == 1 else [str(Path(sys.executable).with_name("torchrun")),
                                         f"--nproc-per-node={a.nproc}", exe]
    runs, ext = ROOT / "out" / "scale", ".gguf" if a.command == "gguf" else ""
    code = commit()  # now: the tree may change while the runs go
    reals = [(Path(m).name.removesuffix(".gguf"), real(m)) for m in a.models]  # a bad name fails before any run
    for stem, (label, source, layers, gib) in itertools.chain(((t, synthetic(t)) for t in a.shapes), reals):
        name = f"{stem}-{a.command}"
        reference = runs / (name + ext)  # the streamed 1-process run's output, the reference for equality
        out = runs / (name + ("" if a.stream else "-whole") + (f"-np{a.nproc}" if a.nproc > 1 else "") + ext)
        cmd = [*launch, a.command, source, "--method", a.method, "--calib", str(wikitext_dir() / "valid.txt"),
               "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--force",
               "--stream" if a.stream else "--no-stream", "-o", str(out)]
        if a.command == "gguf":
            cmd += ["--type", a.type, "--no-verify"]
        wall, rss, rc = run(cmd, out.with_name(out.name.removesuffix(ext) + ".log"))
        row = {"shape": label, "layers": layers, "float32_gib": gib,
               "command": a.command, "type": a.type if a.command == "gguf" else "", "stream": a.stream,
               "method": a.method, "nsamples": a.nsamples, "seqlen": a.seqlen, "wall_s": round(wall, 1),
               "peak_rss_gib": round(rss / 1024, 3), "peak_from": "VmHWM", "nproc": a.nproc, "rc": rc, "commit": code,
               "cmd": " ".join(cmd)}
        if rc == 0 and out != reference and reference.exists():
            same = same_gguf_tensors if a.command == "gguf" else same_checkpoint
            row["equal_to_reference"] = same(reference, out)
        print(json.dumps(row), flush=True)
        if rc == 0:
            append_row(a.results, row)


if __name__ == "__main__":
    main()
