"""d2export: calibrate LLMs below 4 bits with D²Quant and ship them to GGUF and ONNX."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from d2export.calibrate import (Calibration, Force, ModelArg, Resume, calibrate, calibration_options,
                                console, load_or_calibrate, with_grid)
from converters.gguf.presets import DEFAULT_PRESET, PRESETS
from d2quant.data import wikitext_dir
from d2quant.errors import D2Error
from d2quant.qmodel import check_output, is_checkpoint
from runtime_tests.isolation import RuntimeCrash

DEFAULT_TEXT = wikitext_dir() / "test.txt"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help=__doc__)


def _friendly(fn):
    """One clear line and exit status 2 for user errors, instead of a traceback."""

    @wraps(fn)
    def run(*a, **kw):
        try:
            return fn(*a, **kw)
        except (D2Error, OSError) as e:
            why = str(e)
            if not isinstance(e, D2Error):  # disk full, permissions, a folder where a file goes, ...
                why += "; check that path, its permissions and the free disk space"
            console.print(f"[bold red]error:[/] {escape(why)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
    return run


EMBED_BITS = {"float": None, "q4": 4, "q8": 8}
SaveCheckpoint = Annotated[Path | None, typer.Option(
    help="also keep the calibrated checkpoint here, so `d2export verify` and other exports can reuse it")]
TargetBpw = Annotated[float | None, typer.Option(
    help="choose every tensor's storage for this many bits per weight (all tensors, as llama-quantize counts)")]
TargetSize = Annotated[str | None, typer.Option(help="... or for this file size: 800MB, 1.1GB, 950MiB")]


@app.command()
@_friendly
@calibration_options
def quantize(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="checkpoint directory to write")] = Path("d2quant-ckpt"),
    bits: Annotated[int, typer.Option(help="2 | 3 | 4 | 8")] = 3,
    group_size: Annotated[int, typer.Option(help="weights per quantization group along the input")] = 64,
    resume: Resume = False, force: Force = False, *, calibration: Calibration,
):
    """Calibrate MODEL and save a quantized checkpoint (codes + grid params + folded biases),
    written layer by layer as calibration goes."""
    check_output(output, force)
    dataclasses.replace(calibration.quant, bits=bits, group_size=group_size)  # refuse bad values now
    if calibrate(model, calibration, with_grid(bits, group_size), checkpoint=output, resume=resume, force=force):
        console.print(f"saved checkpoint to [bold]{output}[/]")


@app.command("eval")
@_friendly
def eval_(
    target: Annotated[str | None, typer.Argument(help="source model, checkpoint, .gguf or ONNX dir")] = None,
    text: Annotated[Path, typer.Option(help="evaluation text file")] = DEFAULT_TEXT,
    ctx: Annotated[int, typer.Option(help="tokens per window")] = 512,
    max_windows: Annotated[int | None, typer.Option(help="evaluate at most this many windows")] = None,
    spread: Annotated[bool, typer.Option("--spread/--first", help="windows spread evenly over the "
                                                                  "text, or the first ones")] = False,
    reference: Annotated[str | None, typer.Option(
        help="also report KL divergence from this target (the float model: source, .gguf, ...)")] = None,
    backend: Annotated[str, typer.Option(help="auto | torch | llamacpp | onnxruntime")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
):
    """Perplexity of TARGET over non-overlapping windows of TEXT (and KLD from --reference)."""
    from d2quant.data import read_text
    from d2quant.evaluate import check_windows, divergence, perplexity
    from runtime_tests.targets import open_backend

    check_windows(ctx, max_windows)  # before a model loads
    if not text.is_file():
        raise D2Error(f"evaluation text {text} is not a file; pass --text FILE")
    body = read_text(text)
    be = open_backend(target, backend, ctx=ctx)
    ref = None
    try:
        ref = open_backend(reference, "auto", ctx=ctx) if reference else None
        with console.status(f"perplexity ({be.name})") as st:
            progress = lambda i, n: st.update(f"perplexity ({be.name}) window {i}/{n}")  # noqa: E731
            if ref is None:
                res, kld, ref_res = perplexity(be, body, ctx, max_windows, progress, spread), None, None
            else:
                ref_res, res, kld = divergence(ref, be, body, ctx, max_windows, spread, progress)
    finally:
        for b in (be, ref):
            getattr(b, "close", lambda: None)()
    out = {"ppl": res.ppl, "nll": res.nll, "tokens": res.tokens, "windows": res.windows,
           "backend": res.backend, "target": target or "smollm2-135m", "ctx": ctx, "spread": spread}
    if kld is not None:
        out |= {"reference": reference, "reference_ppl": ref_res.ppl, "kld": kld.as_dict()}
    if as_json:
        sys.stdout.write(json.dumps(out) + "\n")
        return
    console.print(f"perplexity [bold]{res.ppl:.3f}[/] over {res.tokens} tokens "
                  f"({res.windows} windows of {ctx}, {res.backend})")
    if kld is not None:
        console.print(f"KL divergence from {reference} (ppl {ref_res.ppl:.3f}): mean {kld.mean_kl:.5f}, "
                      f"median {kld.median_kl:.5f}, p99 {kld.p99_kl:.4f}, max {kld.max_kl:.3f}, "
                      f"same top-1 {100 * kld.top1:.2f}%")


@app.command()
@_friendly
@calibration_options
def gguf(
    model: ModelArg = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="GGUF file to write")] = None,
    type_: Annotated[str | None, typer.Option("--type", help="GGUF preset: " + " | ".join(PRESETS)
                                               + f" (default {DEFAULT_PRESET}; a checkpoint keeps its own)")] = None,
    target_bpw: TargetBpw = None,
    target_size: TargetSize = None,
    recipe: Annotated[Path | None, typer.Option(
        help="reapply the tensor types of a GGUF written by d2export (or a JSON recipe)")] = None,
    force: Force = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="run llama.cpp parity after writing")] = True,
    save_checkpoint: SaveCheckpoint = None, resume: Resume = False, *, calibration: Calibration,
):
    """Calibrate MODEL onto llama.cpp's native block types (a preset, or chosen per tensor for a
    size) and write a GGUF."""
    from converters.gguf import GGUFTarget, write_gguf

    from_checkpoint = bool(model and is_checkpoint(model))
    size = _size_target(target_bpw, target_size)
    chooses = size.active or recipe is not None
    target = GGUFTarget(type_ or (None if from_checkpoint or chooses else DEFAULT_PRESET), force=force,
                        size=size, recipe=None if recipe is None else str(recipe))
    method = calibration.quant.method
    label = target.preset or (size.label if size.active else ("recipe" if recipe else "ckpt"))
    output = output or Path(f"{Path(model or 'smollm2-135m').stem}-{method}-{label}.gguf")
    qm = _quantized_for(target, model, calibration, output, save_checkpoint, resume, force)
    if qm is None:
        return  # another process of a torchrun calibration; rank 0 writes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_gguf(qm, output, force=force, preset=target.preset)
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}", highlight=False)
    console.print(f"wrote [bold]{output}[/] ({output.stat().st_size / 2**20:.1f} MiB)")
    if verify:
        _verify_and_report(str(output), qm, kept=[output, save_checkpoint])


@app.command()
@_friendly
@calibration_options
def onnx(
    model: ModelArg = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="ONNX folder to write")] = None,
    bits: Annotated[int | None, typer.Option(
        help="2 | 3 | 4 | 8 for every matrix (default 4; 3-bit codes sit exactly in the 4-bit container)")] = None,
    block_size: Annotated[int, typer.Option(help="16 | 32 | 64 | 128 | 256: MatMulNBits block = quantization group")] = 64,
    force: Force = False,
    dsq_layout: Annotated[str, typer.Option(help="how DSQ's residual-binary down_proj is carried: planes | lut")] = "planes",
    accuracy_level: Annotated[int, typer.Option(help="MatMulNBits accuracy_level: 0 exact float, 4 int8 activations")] = 0,
    embed: Annotated[str, typer.Option(help="float | q4 | q8: embedding table (and a tied lm_head) in float32 "
                                            "or RTN-quantized at 4/8 bits (GatherBlockQuantized)")] = "float",
    attention: Annotated[str, typer.Option(help="gqa: contrib GroupQueryAttention (faster) | ops: standard ONNX ops")] = "gqa",
    target_bpw: TargetBpw = None,
    target_size: TargetSize = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="run onnxruntime parity after writing")] = True,
    save_checkpoint: SaveCheckpoint = None, resume: Resume = False, *, calibration: Calibration,
):
    """Calibrate MODEL and write a MatMulNBits decoder with KV cache for stock onnxruntime (one
    width for every matrix, or widths chosen per matrix for a size)."""
    from converters.onnx import ONNXOptions, ONNXTarget, write_onnx
    from d2quant.pipeline import quantize_embeddings

    if embed not in EMBED_BITS:
        raise D2Error(f"unknown --embed {embed!r}; choose one of {', '.join(EMBED_BITS)}")
    target = ONNXTarget(bits, block_size, EMBED_BITS[embed], _size_target(target_bpw, target_size))
    options = ONNXOptions(dsq_layout, accuracy_level, "float" if embed == "float" else "quantized", attention)
    output = output or Path(f"{Path(model or 'smollm2-135m').stem}-{calibration.quant.method}-{target.label}-onnx")
    qm = _quantized_for(target, model, calibration, output, save_checkpoint, resume, force)
    if qm is None:
        return  # another process of a torchrun calibration; rank 0 writes
    if EMBED_BITS[embed]:
        qm = quantize_embeddings(qm, EMBED_BITS[embed], block_size)
    with console.status("writing ONNX"):
        write_onnx(qm, output, force=force, **dataclasses.asdict(options))
    size = sum(f.stat().st_size for f in output.iterdir() if f.is_file())
    console.print(f"wrote [bold]{output}[/] ({size / 2**20:.1f} MiB)")
    if verify:
        _verify_and_report(str(output), qm, kept=[output, save_checkpoint])


@app.command()
@_friendly
def generate(
    target: Annotated[str | None, typer.Argument(help="source model, checkpoint, .gguf or ONNX folder")] = None,
    prompt: Annotated[str, typer.Option(help="what to say to the model")] = "What is the capital of France?",
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 64,
    chat: Annotated[bool, typer.Option("--chat/--raw", help="wrap the prompt in the model's chat template")] = True,
):
    """Stream a greedy continuation of PROMPT from any d2export target."""
    from runtime_tests.generation import stream

    if max_new_tokens < 1:
        raise D2Error(f"--max-new-tokens {max_new_tokens}: ask for at least 1 token")
    try:
        for piece in stream(target, prompt, max_new_tokens, chat):
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:  # also before an error line, so it starts a line of its own
        sys.stdout.write("\n")
        sys.stdout.flush()


@app.command()
@_friendly
def doctor():
    """Check that the runtimes load and run a model on this machine (llama.cpp in a worker process)."""
    from runtime_tests.llamacpp_build import probe

    with console.status("llama.cpp probe"):
        why = probe()
    if why is not None:
        raise D2Error(why)
    console.print("llama.cpp loads and runs a model here")


@app.command("verify")
@_friendly
def verify_(
    target: Annotated[str, typer.Argument(help=".gguf file or ONNX folder written by d2export")],
    reference: Annotated[str, typer.Option(help="the checkpoint (or source model) it was made from")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
):
    """Runtime parity: decoded weights equal the quantized model's; runtime logits match torch's."""
    from d2quant.qmodel import QuantizedModel, is_checkpoint

    if not is_checkpoint(reference):
        raise D2Error(f"--reference {reference} is not a d2export checkpoint; pass the directory "
                      "`d2export quantize` wrote (or export from a checkpoint to keep one)")
    res = _verify_target(target, QuantizedModel.load(reference))
    if as_json:
        sys.stdout.write(json.dumps(res, default=float) + "\n")
    else:
        _report_verify(res)
    if not _passed(res):
        raise typer.Exit(1)


def _size_target(target_bpw: float | None, target_size: str | None):
    from converters.allocation import SizeTarget, parse_size

    return SizeTarget(target_bpw, None if target_size is None else parse_size(target_size))


def _report_allocation(alloc) -> None:
    t = Table(title=f"tensor types for {alloc.bpw:.3f} bits per weight")
    for col in ("tensor", "type", "bytes", "predicted loss"):
        t.add_column(col, justify="left" if col == "tensor" else "right")
    for name, option in alloc.choice.items():
        t.add_row(name, option.label.upper(), f"{option.nbytes:,}", f"{alloc.loss[name]:.3g}")
    console.print(t)


def _quantized_for(target, model: str | None, calibration: Calibration, output: Path,
                   save_checkpoint: Path | None, resume: bool, force: bool):
    """What a writer gets: the output paths refused before the calibration spends minutes, then the
    model loaded from a checkpoint or calibrated onto ``target``'s types (its recipe goes into the
    file's metadata). None on the other processes of a torchrun calibration."""
    check_output(output, force)
    if save_checkpoint is not None:
        if save_checkpoint.resolve() == output.resolve():
            raise D2Error(f"--save-checkpoint and --output are both {output}; give the checkpoint a folder of its own")
        check_output(save_checkpoint, force)

    def shape(cfg, src, tokens):
        return target.quant_config(cfg, src, tokens, on_allocation=_report_allocation)
    qm = load_or_calibrate(model, calibration, shape, target.check, checkpoint=save_checkpoint, resume=resume,
                           force=force, recalibrating=target.calibration_options)
    if qm is not None and save_checkpoint is not None:
        console.print(f"saved checkpoint to [bold]{save_checkpoint}[/]")
    return qm


def _verify_and_report(target: str, qm, kept: list[Path | None]) -> None:
    """Parity right after an export: the file stays, but a failed check fails the command."""
    try:
        res = _verify_target(target, qm)
    except RuntimeCrash as e:  # calibration succeeded: say what is kept, so nobody redoes it
        outputs = " and ".join(str(p) for p in kept if p is not None)
        raise D2Error(f"{outputs} {'are' if ' and ' in outputs else 'is'} kept, but the parity check "
                      f"could not run: {e}") from None
    _report_verify(res)
    if not _passed(res):
        console.print(f"[bold red]parity failed[/] for {target}: see the table; "
                      f"`d2export verify {target} --reference CKPT --json` gives every number")
        raise typer.Exit(1)


def _verify_target(target: str, qm) -> dict:
    from runtime_tests.targets import target_kind

    kind = target_kind(target)
    text = Path(DEFAULT_TEXT).read_text() if Path(DEFAULT_TEXT).is_file() else None
    if kind == "gguf":
        from runtime_tests.llamacpp import verify_gguf
        with console.status("llama.cpp parity"):
            return verify_gguf(target, qm, text=text)
    if kind == "onnx":
        from runtime_tests.onnxrt import verify_onnx
        with console.status("onnxruntime parity"):
            return verify_onnx(target, qm)
    raise D2Error(f"{target} is neither a .gguf file nor an ONNX folder written by d2export")


def _passed(res: dict) -> bool:
    return bool(res.get("pass"))


_BRIEF = ("mean_kl", "max_kl", "ppl_ratio")  # context, not gated: the table stays one screen
_SECTIONS = (("weights", None), ("tokenizer", None), ("logits", None), ("kv_cache", None),
             ("generation", None), ("activation_rounding", _BRIEF), ("vs_emulated", (*_BRIEF, "pass")),
             ("rounding_chaos", _BRIEF), ("dropped_cost", _BRIEF))


def _report_verify(res: dict) -> None:
    """One table for both reports: the ONNX one nests its runtime checks per accuracy level."""
    t = Table(title=f"runtime parity: {'PASS' if _passed(res) else 'FAIL'}")
    t.add_column("check")
    t.add_column("value", justify="right")
    parts = [("", res)] + [(f"{k.removeprefix('accuracy_')}.", v) for k, v in res.items()
                           if k.startswith("accuracy_level_") and isinstance(v, dict)]
    for prefix, part in parts:
        for section, keys in _SECTIONS:
            for k, v in (part.get(section) or {}).items():
                if isinstance(v, (int, float, bool, str)) and (keys is None or k in keys):
                    t.add_row(f"{prefix}{section}.{k}", f"{v:.4g}" if isinstance(v, float) else str(v))
        if prefix:
            t.add_row(f"{prefix}pass", "not judged" if part.get("pass") is None else str(part["pass"]))
    console.print(t)
