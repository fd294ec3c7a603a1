"""The calibration step every export command shares: options -> progress bars -> QuantizedModel."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Annotated, Callable

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from d2quant.data import CalibConfig, calibration_tokens
from d2quant.pipeline import QuantConfig, quantize
from d2quant.qmodel import ModelSpec, QuantizedModel, is_checkpoint
from d2quant.sources import load_source

# logs and CI (no terminal) get a table wide enough for the per-layer summary
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

# Options shared by `quantize`, `gguf` and `onnx` (typer reads them from the signatures).
ModelArg = Annotated[str | None, typer.Argument(
    help="HF model dir, .gguf file, alias 'smollm2-135m' (default) or a d2export checkpoint")]
Method = Annotated[str, typer.Option(help="rtn | gptq | d2quant")]
Calib = Annotated[str, typer.Option(help="text file, folder of .txt, 'self' (model-generated) or hf:NAME[:CFG[:SPLIT]]")]
NSamples = Annotated[int, typer.Option(help="calibration sequences")]
SeqLen = Annotated[int, typer.Option(help="tokens per calibration sequence")]
Seed = Annotated[int, typer.Option(help="seed for sampling calibration windows / self-generated text")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda")]
Dsq = Annotated[bool, typer.Option("--dsq/--no-dsq", help="dual-scale quantizer on down_proj (d2quant)")]
DsqForm = Annotated[str, typer.Option(help="rbin (paper's residual-binary levels) | dual (column scale on the grid)")]
Dac = Annotated[bool, typer.Option("--dac/--no-dac", help="deviation-aware norm bias correction (d2quant)")]
Rotate = Annotated[bool, typer.Option("--rotate/--no-rotate", help="block-Hadamard rotation of the residual stream")]
Damp = Annotated[float, typer.Option(help="GPTQ damping as a fraction of mean(diag H)")]
ActOrder = Annotated[bool, typer.Option("--act-order/--no-act-order",
                                        help="GPTQ visits columns by decreasing input energy (static groups)")]
Force = Annotated[bool, typer.Option("--force", help="overwrite an existing output")]


@dataclass
class CalibOptions:
    method: str
    calib: str
    nsamples: int
    seqlen: int
    seed: int
    device: str
    dsq: bool
    dsq_form: str
    dac: bool
    rotate: bool
    damp: float
    act_order: bool


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


GridPolicy = Callable[[ModelSpec], dict[str, dict | None]]


def calibrate(model: str | None, opts: CalibOptions, bits: int, group_size: int,
              grids: GridPolicy | None = None) -> QuantizedModel:
    """Load the source, make calibration tokens, run the pipeline with progress, print a summary.

    grids: per-tensor grid specs made from the model's spec (a GGUF preset), else uniform grids.
    """
    qcfg = QuantConfig(method=opts.method, bits=bits, group_size=group_size, dsq=opts.dsq,
                       dsq_form=opts.dsq_form, dac=opts.dac, rotate=opts.rotate, damp=opts.damp,
                       act_order=opts.act_order, device=opts.device)
    ccfg = CalibConfig(calib=opts.calib, nsamples=opts.nsamples, seqlen=opts.seqlen, seed=opts.seed)
    with console.status("loading model"):
        src = load_source(model)
    if grids:  # rotation unties a tied lm_head, so the policy must see the untied model
        qcfg.grids = grids(dataclasses.replace(src.spec, tie_embeddings=False) if qcfg.rotate else src.spec)
    tokens = None
    if qcfg.method != "rtn":
        with console.status(f"calibration data ({ccfg.calib}: {ccfg.nsamples} x {ccfg.seqlen} tokens)"):
            tokens = calibration_tokens(ccfg, src.model, src.tokenizer, qcfg.torch_device())
    with _progress() as prog:
        task = prog.add_task(f"{qcfg.method} W{bits} g{group_size}", total=src.spec.layers)
        def on_layer(i: int, stats: dict) -> None:
            prog.advance(task)
            if not console.is_terminal:  # logs and CI get one line per layer instead of a live bar
                console.print(f"layer {i + 1}/{src.spec.layers} {stats['seconds']:.1f} s", highlight=False)
        qm = quantize(src, tokens, qcfg, on_layer=on_layer)
    qm.recipe["calibration"] = {"calib": ccfg.calib, "nsamples": ccfg.nsamples,
                                "seqlen": ccfg.seqlen, "seed": ccfg.seed}
    print_summary(qm)
    return qm


def load_or_calibrate(model: str | None, opts: CalibOptions, bits: int, group_size: int,
                      grids: GridPolicy | None = None) -> QuantizedModel:
    if model and is_checkpoint(model):
        return QuantizedModel.load(model)
    return calibrate(model, opts, bits, group_size, grids)


def print_summary(qm: QuantizedModel) -> None:
    rep = qm.report
    t = Table(title="calibration summary", show_lines=False)
    t.add_column("layer", justify="right")
    names = list(rep["layers"][0]["error"]) if rep.get("layers") else []
    for n in names:
        t.add_column(n.replace("_proj", ""), justify="right")
    t.add_column("DAC shift", justify="right")
    t.add_column("s", justify="right")
    for s in rep.get("layers", []):
        t.add_row(str(s["layer"]), *[f"{s['error'][n]:.4f}" for n in names],
                  f"{s['dac_shift']:.3f}" if "dac_shift" in s else "-", f"{s['seconds']:.1f}")
    console.print(t)
    extra = f", final-norm DAC shift {rep['final_dac_shift']:.4f}" if "final_dac_shift" in rep else ""
    console.print(f"[bold]time {rep.get('seconds')} s, peak memory {rep.get('peak_mem_mb')} MiB{extra}[/] "
                  "(errors: Hessian-weighted relative squared error per linear)")
