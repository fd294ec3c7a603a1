"""The calibration step every export command shares: options -> progress bars -> QuantizedModel.

The calibration options are declared once (``CALIBRATION_OPTIONS``); ``@calibration_options`` adds
them to a command's signature and hands the command one :class:`Calibration`, built and validated
once (QuantConfig and CalibConfig check their own fields).
"""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import shutil
import sys
import tempfile
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from d2quant.checkpoint import CheckpointWriter, fingerprint
from d2quant.data import CalibConfig, calibration_tokens, generator_id
from d2quant.distributed import from_env
from d2quant.errors import D2Error, Interrupted
from d2quant.pipeline import QuantConfig, quantize
from d2quant.qmodel import QuantizedModel, is_checkpoint
from d2quant.sources import load_source

# logs and CI (no terminal) get a table wide enough for the per-layer summary
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

ModelArg = Annotated[str | None, typer.Argument(
    help="HF model dir, .gguf file, alias (smollm2-135m: the default, gemma3-270m, "
         "qwen2.5-coder-1.5b) or a d2export checkpoint")]
Force = Annotated[bool, typer.Option("--force", help="overwrite an existing output")]
Resume = Annotated[bool, typer.Option(help="continue an interrupted calibration from its checkpoint's .partial folder")]

_Q, _C = QuantConfig(), CalibConfig()  # the defaults live in the configs themselves
# name -> (typer option, default, which config it belongs to)
CALIBRATION_OPTIONS = {
    "method": (typer.Option(help="rtn | gptq | d2quant"), _Q.method, "quant"),
    "calib": (typer.Option(help="text file, folder of .txt, 'self' (model-generated), 'self-chat' (its chat "
                                "answers), hf:NAME[:CFG[:SPLIT]], or a mixture: A+B (e.g. notes.txt+self-chat)"),
              _C.calib, "data"),
    "nsamples": (typer.Option(help="calibration sequences"), _C.nsamples, "data"),
    "seqlen": (typer.Option(help="tokens per calibration sequence"), _C.seqlen, "data"),
    "seed": (typer.Option(help="seed for sampling calibration windows / self-generated text"), _C.seed, "data"),
    "device": (typer.Option(help="auto | cpu | cuda"), _Q.device, "quant"),
    "dsq": (typer.Option("--dsq/--no-dsq", help="dual-scale quantizer on down_proj (d2quant; grids of 3 bits or fewer)"), _Q.dsq, "quant"),
    "dsq_form": (typer.Option(help="rbin (paper's residual-binary levels) | dual (column scale on the grid)"),
                 _Q.dsq_form, "quant"),
    "dac": (typer.Option("--dac/--no-dac", help="deviation-aware norm bias correction (d2quant)"), _Q.dac, "quant"),
    "rotate": (typer.Option("--rotate/--no-rotate", help="block-Hadamard rotation of the residual stream"),
               _Q.rotate, "quant"),
    "damp": (typer.Option(help="GPTQ damping as a fraction of mean(diag H)"), _Q.damp, "quant"),
    "shrink": (typer.Option(help="GPTQ on (1 - s) H + s diag(H): 0 full Hessian, 1 its diagonal (as an imatrix)"),
               _Q.shrink, "quant"),
    "shrink_down": (typer.Option(help="down_proj's own shrink (default: --shrink)"), _Q.shrink_down, "quant"),
    "act_order": (typer.Option("--act-order/--no-act-order",
                               help="GPTQ visits columns by decreasing input energy (static groups)"),
                  _Q.act_order, "quant"),
    "objective": (typer.Option(help="what GPTQ minimises per linear, X~ / X its inputs in the quantized / float "
                                    "model: sequential ||(Q-W)X~|| | float ||(Q-W)X|| | asymmetric ||QX~ - WX||"),
                  _Q.objective, "quant"),
    "scale_fit": (typer.Option(help="column weights of each group's scale fit: diag (H_jj, as an imatrix) | "
                                    "conditional (H_jj less what later columns compensate, GPTQ's own weight)"),
                  _Q.scale_fit, "quant"),
    "stream": (typer.Option("--stream/--no-stream",
                            help="read the weights one layer at a time from the safetensors or .gguf (RAM: about one layer)"),
               _Q.stream, "quant"),
    "offload": (typer.Option(help="where calibration activations live: auto (device while they fit) | cpu | disk"),
                _Q.offload, "quant"),
    # the library's default is float32 (the same bits on every machine); the command picks the
    # machine's fast kernel and records it in the file's recipe
    "forward_dtype": (typer.Option(help="auto | float32 | bfloat16: the calibration forwards' matmuls (Hessians "
                                        "and GPTQ stay float32); auto: bfloat16 on CUDA and on CPUs with AMX or "
                                        "AVX-512 BF16"),
                      "auto", "quant"),
}


# an option whose default is None takes its config field's type (typer reads `float | None`)
_FIELD_TYPES = {**typing.get_type_hints(QuantConfig), **typing.get_type_hints(CalibConfig)}


@dataclass(frozen=True)
class Calibration:
    """The calibration a command was asked for: the method's config and the data's."""

    quant: QuantConfig
    data: CalibConfig
    given: tuple[str, ...] = ()  # the options set away from their defaults, as typed ("--no-dac")


def calibration_options(fn):
    """Give a typer command the shared calibration options; it receives ``calibration``."""
    sig, hints = inspect.signature(fn), typing.get_type_hints(fn, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
           if p.name != "calibration"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                               annotation=Annotated[_FIELD_TYPES[name] if default is None else type(default), option])
             for name, (option, default, _) in CALIBRATION_OPTIONS.items()]

    @wraps(fn)
    def run(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in CALIBRATION_OPTIONS}
        by = lambda which: {n: v for n, v in values.items() if CALIBRATION_OPTIONS[n][2] == which}  # noqa: E731
        given = tuple(_typed(n, v) for n, v in values.items() if v != CALIBRATION_OPTIONS[n][1])
        return fn(*args, calibration=Calibration(QuantConfig(**by("quant")), CalibConfig(**by("data")), given),
                  **kwargs)

    run.__signature__ = sig.replace(parameters=[*own, *extra], return_annotation=inspect.Signature.empty)
    run.__annotations__ = {p.name: p.annotation for p in [*own, *extra]}
    return run


def _typed(name: str, value) -> str:
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def calibrate(model: str | None, calibration: Calibration, shape=None, check=None, *,
              checkpoint: Path | None = None, resume: bool = False, force: bool = False) -> QuantizedModel | None:
    """Load the source, make calibration tokens, run the pipeline with progress, print a summary.

    shape: (QuantConfig, Source, tokens) -> QuantConfig, the target's say once the model and its
    calibration tokens are known (a GGUF preset's grids, or an allocation for a size), or None.
    check: (QuantConfig, Source) -> None, the target's refusals once the model is loaded, before
    the calibration tokens are made (a size out of reach, an architecture that cannot hold DAC).
    checkpoint: written layer by layer as calibration goes (``resume``: continue an interrupted one).
    Under ``torchrun`` every process calibrates its share; only rank 0 gets the model (the others
    get None and write nothing).
    """
    ccfg, qcfg = calibration.data, calibration.quant
    group = from_env(qcfg.device)  # torchrun's processes, or this one alone
    console.quiet = not group.writes
    if qcfg.stream and ccfg.generated:
        raise D2Error(f"--calib {ccfg.calib} generates text with the whole model; give a text file "
                      "(or hf:NAME) with --stream, or drop --stream")
    with console.status("loading model"):
        src = load_source(model, stream=qcfg.stream)
    if check:
        check(qcfg, src)
    tokens = None
    if qcfg.method != "rtn" and group.writes:
        what = f"calibration data ({ccfg.calib}: {ccfg.nsamples} x {ccfg.seqlen} tokens)"
        t0 = time.time()
        with console.status(what):
            tokens = calibration_tokens(ccfg, src.model, src.tokenizer, qcfg.torch_device())
        console.print(f"{what} in {time.time() - t0:.1f} s", highlight=False)
    tokens = group.share(tokens, 0)
    if shape:
        qcfg = shape(qcfg, src, tokens)
    calib = dataclasses.asdict(ccfg)
    if ccfg.generated:  # which kernel wrote the text: it differs by hardware
        calib["generator"] = generator_id(qcfg.torch_device())
    recipe = {**qcfg.recipe(), "calibration": calib}
    sink = None
    if checkpoint is not None:
        sink = CheckpointWriter(checkpoint, fingerprint(recipe, src.spec, src.info, tokens),
                                resume=resume, force=force, group=group)
        if sink.done:
            console.print(f"resuming {sink.partial} after layer {sink.done}/{src.spec.layers}")
    fresh = sink is not None and not sink.done
    try:
        with _progress() as prog:
            label = f"{qcfg.method} W{qcfg.bits} g{qcfg.group_size}" if not qcfg.grids else f"{qcfg.method} (preset grids)"
            task = prog.add_task(label, total=src.spec.layers, completed=sink.done if sink else 0)

            def on_layer(i: int, stats: dict) -> None:
                prog.advance(task)
                if not console.is_terminal:  # logs and CI get one line per layer instead of a live bar
                    console.print(f"layer {i + 1}/{src.spec.layers} {stats['seconds']:.1f} s", highlight=False)
            qm = quantize(src, tokens, qcfg, on_layer=on_layer, sink=sink, recipe=recipe, group=group)
    except Interrupted:
        raise
    except D2Error:
        if fresh and group.writes:  # the same options would fail the same way: nothing to --resume
            sink.abandon()
        raise
    if not group.writes:
        return None  # rank 0 prints and writes
    print_summary(qm)
    return qm


def load_or_calibrate(model: str | None, calibration: Calibration, shape=None, check=None, *,
                      checkpoint: Path | None = None, resume: bool = False, force: bool = False,
                      recalibrating: Sequence[str] = ()) -> QuantizedModel | None:
    """A checkpoint as it is, or a fresh calibration; ``checkpoint``: also kept there. A streamed
    calibration always goes through a checkpoint on disk (a temporary one without ``checkpoint``),
    so that no more than a layer of codes is ever held in memory.

    recalibrating: the target's options that only a calibration honours; with a checkpoint as the
    model they (and any calibration option) are refused, not ignored."""
    if resume and checkpoint is None:
        raise D2Error("--resume continues the calibration kept with --save-checkpoint DIR; pass the same "
                      "--save-checkpoint DIR as the interrupted run")
    if model and is_checkpoint(model):
        given = [*recalibrating, *calibration.given] + (["--resume"] if resume else [])
        if given:
            raise D2Error(f"{model} is a d2export checkpoint, which keeps the calibration and types it was made "
                          f"with; drop {', '.join(given)}, or pass the source model to calibrate again")
        if not from_env(calibration.quant.device).writes:
            return None
        qm = QuantizedModel.load(model)
        if checkpoint is not None:
            qm.save(checkpoint, force=force)
        return qm
    if checkpoint is None and calibration.quant.stream:
        checkpoint = Path(tempfile.mkdtemp(prefix="d2export-ckpt-")) / "ckpt"
        atexit.register(shutil.rmtree, checkpoint.parent, True)
    return calibrate(model, calibration, shape, check, checkpoint=checkpoint, resume=resume, force=force)


def with_grid(bits: int, group_size: int):
    """A ``shape`` for calibrate(): uniform grids of ``bits`` and ``group_size`` (checked once)."""
    def shape(cfg: QuantConfig, src, tokens) -> QuantConfig:
        return dataclasses.replace(cfg, bits=bits, group_size=group_size)
    return shape


def print_summary(qm: QuantizedModel) -> None:
    rep = qm.report
    t = Table(title="calibration summary", show_lines=False)
    t.add_column("layer", justify="right")
    names = list(rep["layers"][0]["error"]) if rep.get("layers") else []
    for n in names:
        t.add_column(n.replace("_proj", ""), justify="right")
    t.add_column("DAC shift", justify="right")
    t.add_column("s", justify="right")
    t.add_column("peak MiB", justify="right")  # the calibration's, up to this layer's end
    for s in rep.get("layers", []):
        t.add_row(str(s["layer"]), *[f"{s['error'][n]:.4f}" for n in names],
                  f"{s['dac_shift']:.3f}" if "dac_shift" in s else "-", f"{s['seconds']:.1f}",
                  f"{s['peak_mem_mb']:.0f}" if "peak_mem_mb" in s else "-")
    console.print(t)
    extra = f", final-norm DAC shift {rep['final_dac_shift']:.4f}" if "final_dac_shift" in rep else ""
    teacher = sum(s.get("teacher_seconds", 0) for s in rep.get("layers", []))
    if teacher:
        extra += f" (its float-stream teacher {teacher:.1f} s)"
    if dsq := [s["dsq"] for s in rep.get("layers", []) if "dsq" in s]:
        console.print(f"DSQ on {sum(dsq)} of {len(dsq)} down_proj"
                      + ("" if all(dsq) else " (only grids of 3 bits or fewer get it)"),
                      highlight=False)
    if off := rep.get("offload"):
        console.print(f"activations kept on {off['where']} ({off['gib']} GiB: {off['why']})", highlight=False)
    held = f", {rep['start_mem_mb']} MiB of it held before" if "start_mem_mb" in rep else ""
    console.print(f"[bold]time {rep.get('seconds')} s, peak memory {rep.get('peak_mem_mb')} MiB "
                  f"({rep.get('peak_mem_of', 'rss')}{held}){extra}[/] "
                  "(errors: Hessian-weighted relative squared error per linear)")
