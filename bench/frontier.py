"""Perplexity against file size: our per-tensor allocations (issue 14) against llama.cpp's presets.

Ours: for every byte target, the allocation of ``d2export gguf --target-size`` (converters.allocation
over d2quant.sensitivity's measured costs), calibrated onto its types by ``--method`` and scored by
llama.cpp under the domain protocol (bench/protocol.py) exactly as bench/gguf_bench.py scores a
preset. The costs are measured once per model and calibration and kept in --out-dir (a new
candidate type is measured alone and added), so each target costs one calibration; each allocation is saved as a recipe (``{"types": {matrix: kind}}``) and the
file is made through ``GGUFTarget(recipe=...)``, the path ``d2export gguf --recipe`` takes. Given the
same tokens, ``--target-size`` makes the same choice (the measurement and the knapsack are
deterministic).

Targets are sizes of tensor data: ``--targets-preset`` the bytes a preset's tensors take on the
model (a comparison at exactly that preset's size), ``--targets-mib`` in MiB, or ``--targets-bpw``
over the *real* parameters (the unpadded model's, as gguf_bench reports bpw). ``--kinds``
restricts the candidate types (F16 always stays one). The default is the K-quants, Q8_0 and
IQ4_XS, the set the rows in BENCHMARKS.md were measured with; ``--target-size`` also offers the
IQ2/IQ3 codebook types, whose rounding costs take 3-6 s per 768 x 2048 matrix and type on one
core (BENCHMARKS.md, "the codebook search").

The frontier a target is compared against (``--report``): the presets' rows of --preset-results
(gguf_bench's rows: llamacpp-imatrix, llamacpp, our fixed presets) on the same model, calibration
and protocol, reduced to their Pareto points (no smaller file scores better) and interpolated in
log-perplexity between the neighbouring points around the target's size; below the smallest
preset the frontier is that preset (a larger file), above the largest there is none ("outside").

    python bench/frontier.py --models smollm2-135m-pad768 --calib wiki \\
        --methods d2quant+shrink=0.5 --targets-preset Q2_K Q3_K_S IQ2_M
    python bench/frontier.py --report --models smollm2-135m-pad768 --plot bench/results/frontier.png
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import gguf_bench as gb  # bench/ is on sys.path when run as a script
import protocol
from resultlog import append_row, read_rows
from converters.allocation import PROBE_LEN, PROBE_WINDOWS, Allocation, SizeTarget, allocate
from converters.gguf import GGUFTarget
from converters.gguf.allocate import fixed_bytes, options
from converters.gguf.presets import FLOAT, PRESETS as ALL_PRESETS, preset_types, tensor_nbytes
from d2quant.errors import D2Error
from d2quant.grids.ggml import ggml_types
from d2quant.sensitivity import MatrixCost, measure
from d2quant.sources import Source, load_source

RESULTS = gb.ROOT / "bench" / "results" / "frontier.jsonl"
KINDS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "iq4_xs")
FRONTIERS = ("llamacpp-imatrix", "llamacpp")  # llama.cpp's curves, with and without an imatrix


# ---- our points -------------------------------------------------------------------------------

def _options(base: Source, kinds: tuple[str, ...]):
    return {n: [o for o in opts if o.label in kinds or o.label == FLOAT] for n, opts in options(base.spec).items()}


def costs(base: Source, model: str, s: gb.Settings, kinds: tuple[str, ...]) -> tuple[dict[str, MatrixCost], float]:
    """Every matrix's cost on every candidate type, measured on the calibration tokens.

    One cache file per model and tokens holds the probes' alphas and every (matrix, type) error
    measured so far, so a new candidate set measures only the types it adds. The seconds returned
    are those of the measurements its costs came from."""
    tokens = gb._calib_tokens(model, base, s)
    digest = hashlib.sha1(tokens.numpy().tobytes()).hexdigest()[:12]
    path = s.out_dir / f"{gb.file_stem(model)}-costs-{s.calib}{s.nsamples}x{s.seqlen}-{digest}.json"
    saved = json.loads(path.read_text()) if path.is_file() else {"runs": [], "costs": {}}
    wanted = {n: {o.label: o.spec for o in opts} for n, opts in _options(base, kinds).items()}
    missing = {n: {k: v for k, v in specs.items() if k not in saved["costs"].get(n, {}).get("errors", {})}
               for n, specs in wanted.items()}
    missing = {n: specs for n, specs in missing.items() if specs}
    if missing:
        alphas = {n: c["alpha"] for n, c in saved["costs"].items()}
        t0 = time.time()
        with Progress() as bar:
            task = bar.add_task("sensitivity", total=len(missing))
            out = measure(base.model, tokens, tokens[:PROBE_WINDOWS, :PROBE_LEN], missing,
                          on_matrix=lambda i, n: bar.update(task, completed=i),
                          alphas=alphas if set(missing) <= set(alphas) else None)
        for n, c in out.items():
            old = saved["costs"].setdefault(n, {"shape": list(c.shape), "alpha": c.alpha, "errors": {}})
            old["errors"].update(c.errors)
        labels = sorted({k for specs in missing.values() for k in specs})
        saved["runs"].append({"labels": labels, "seconds": round(time.time() - t0, 1)})
        tmp = path.with_suffix(".part")
        tmp.write_text(json.dumps(saved))
        tmp.replace(path)
    used = {k for specs in wanted.values() for k in specs}
    seconds = sum(r["seconds"] for r in saved["runs"] if used & set(r["labels"]))
    return {n: MatrixCost(n, tuple(saved["costs"][n]["shape"]), saved["costs"][n]["alpha"],
                          {k: saved["costs"][n]["errors"][k] for k in specs})
            for n, specs in wanted.items()}, seconds


def target_size(base: Source, unit: str, value) -> int:
    """Tensor bytes of a target: ``value`` MiB, bits per real parameter, or the tensor bytes a
    preset's file holds on this model (the comparison at exactly that preset's size)."""
    if unit == "mib":
        return int(value * 2**20)
    if unit == "bpw":
        return int(value * gb.real_params(base) / 8)
    shapes = base.spec.matrix_shapes()
    return fixed_bytes(base.spec) + sum(tensor_nbytes(kind, *shapes[n]) for n, kind in
                                        preset_types(value, base.spec).items())


def recipe(base: Source, cost: dict[str, MatrixCost], kinds: tuple[str, ...], size: int, path: Path) -> Allocation:
    """The allocation for ``size`` bytes of tensors, saved as a recipe file at ``path``."""
    spec = base.spec
    alloc = allocate(_options(base, kinds), cost, SizeTarget(target_size=size), fixed_bytes(spec), spec.n_params)
    path.write_text(json.dumps({"types": {n: o.label for n, o in alloc.choice.items()}}, indent=0))
    return alloc


def run_targets(a, s: gb.Settings) -> None:
    kinds = tuple(a.kinds)
    done = {(*gb._key(r), tuple(r["kinds"])) for r in read_rows(a.results)}  # the candidates make a row too
    for model in a.models:
        base = load_source(model)
        sizes = [(unit, v) for unit, values in (("preset", a.targets_preset), ("mib", a.targets_mib),
                                                 ("bpw", a.targets_bpw)) for v in values or []]
        labels = {target_size(base, unit, v): f"target-{v}-size" if unit == "preset" else f"target-{v:g}{unit}"
                  for unit, v in sizes}
        todo = [(size, m) for size in labels for m in a.methods
                if (*gb.key_for(model, labels[size], m, s), kinds) not in done]
        if not todo:
            continue
        cost, cost_seconds = costs(base, model, s, kinds)
        sets = gb.eval_sets(base, model, s)
        for size, method in todo:
            path = s.out_dir / f"{gb.file_stem(model)}-{labels[size]}-{'-'.join(kinds)}.recipe.json"
            alloc = recipe(base, cost, kinds, size, path)
            torch.manual_seed(0)
            row = gb.run_row(base, model, labels[size], method, s, sets, GGUFTarget(recipe=str(path)))
            row.update(target_bytes=size, kinds=list(kinds), recipe=str(path),
                       predicted_loss=round(sum(alloc.loss.values()), 6), sensitivity_seconds=cost_seconds)
            append_row(a.results, row)


# ---- the frontier -----------------------------------------------------------------------------

def candidates_note(row: dict) -> str:
    """How a row's candidate types differ from the default set ('' when they do not)."""
    kinds = set(row["kinds"])
    extra, left = sorted(kinds - set(KINDS)), sorted(set(KINDS) - kinds)
    return " ".join([*(f"+{k}" for k in extra), *(f"-{k}" for k in left)])


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """(size, ppl, label) points no smaller point beats, by size."""
    out = []
    for p in sorted(points):
        if not out or p[1] < out[-1][1]:
            out.append(p)
    return out


def frontier_at(points: list[tuple[float, float, str]], size: float) -> tuple[float, str] | None:
    """The frontier's perplexity at ``size``, interpolated in log-ppl between the Pareto points
    around it, and which points it came from. Below the smallest point: that point (the best at
    equal or larger size, a larger file); above the largest: None (no frontier there)."""
    front = pareto(points)
    if front and size <= front[0][0]:
        return front[0][1], front[0][2]
    for (x0, y0, l0), (x1, y1, l1) in zip(front, front[1:]):
        if x0 <= size <= x1:
            t = (size - x0) / (x1 - x0)
            return math.exp((1 - t) * math.log(y0) + t * math.log(y1)), f"{l0}..{l1}"
    return None


def _same_protocol(r: dict, t: dict) -> bool:
    return all(r[k] == t[k] for k in ("model", "nsamples", "seqlen", "windows", "ctx")) and \
        (r["method"] == "llamacpp" or r["calib"] == t["calib"])


def curves(target: dict, preset_rows: list[dict], eval_set: str) -> dict[str, list[tuple[float, float, str]]]:
    """The preset curves a target row is compared with: llama.cpp's (with and without an imatrix)
    and ours (its own method on fixed presets)."""
    out: dict[str, list] = {}
    for r in preset_rows:
        if r["method"] in (*FRONTIERS, target["method"]) and _same_protocol(r, target) and eval_set in r["scores"]:
            key = "ours-fixed" if r["method"] == target["method"] else r["method"]
            out.setdefault(key, []).append((r["file_bytes"], r["scores"][eval_set]["ppl"], r["preset"]))
    return out


def report(rows: list[dict], preset_rows: list[dict]) -> str:
    """Markdown: per target and eval set, our perplexity and its ratio to each frontier there."""
    head = ("| model | target | calib | method | MiB | bpw | eval set | ppl | KLD mean | "
            "×imatrix frontier | ×llama.cpp frontier | ×ours fixed | sensitivity + calibration s |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for t in sorted(rows, key=lambda r: (r["model"], r["calib"], r["method"], r["file_bytes"])):
        for n in protocol.EVAL_SETS:
            if n not in t["scores"]:
                continue
            ppl = t["scores"][n]["ppl"]
            ratios = []
            cur = curves(t, preset_rows, n)
            for key in ("llamacpp-imatrix", "llamacpp", "ours-fixed"):
                f = frontier_at(cur.get(key, []), t["file_bytes"])
                ratios.append("no rows" if key not in cur else "outside" if f is None else f"{ppl / f[0]:.3f} ({f[1]})")
            out.append(f"| {t['model']} | {' '.join(filter(None, (t['preset'], candidates_note(t))))} | {t['calib']} {protocol.domain(t['calib'], n)} | "
                       f"{t['method']} | {t['file_bytes'] / 2**20:.2f} | {t['bpw']:.3f} | {n} | {ppl:.2f} | "
                       f"{t['scores'][n]['mean_kl']:.4f} | {' | '.join(ratios)} | "
                       f"{t['sensitivity_seconds']:.0f} + {t['quant_seconds']:.0f} |")
    return "\n".join(out)


def plot(rows: list[dict], preset_rows: list[dict], path: Path, eval_set: str) -> None:
    """Perplexity against file size: llama.cpp's preset curves, our fixed presets, our targets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    group = lambda r: (r["model"], r["calib"], r["method"], candidates_note(r))  # noqa: E731
    drawn = set()  # the preset curves once per model, calibration and method
    for g in sorted({group(r) for r in rows}):
        model, calib, method, note = g
        ours = sorted((r["file_bytes"], r["scores"][eval_set]["ppl"]) for r in rows
                      if group(r) == g and eval_set in r["scores"])
        like = next(r for r in rows if group(r) == g)
        preset_curves = {} if g[:3] in drawn else curves(like, preset_rows, eval_set)
        drawn.add(g[:3])
        for key, pts in sorted(preset_curves.items()):
            pts.sort()
            style = "--" if key == "llamacpp" else "-"
            ax.plot([p[0] / 2**20 for p in pts], [p[1] for p in pts], style, marker="s", alpha=0.8,
                    label=f"{key if key != 'ours-fixed' else method + ' presets'} ({calib})")
            for x, y, preset in pts:
                ax.annotate(preset, (x / 2**20, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.plot([p[0] / 2**20 for p in ours], [p[1] for p in ours], marker="o", linewidth=2,
                label=f"{method} at targets{' ' + note if note else ''} ({calib})")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel(f"llama.cpp perplexity, {eval_set}")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(", ".join(sorted({r["model"] for r in rows})))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(rows: list[dict]) -> None:
    table = Table(title="targets")
    for col in ("model", "target", "method", "MiB", "bpw", *protocol.EVAL_SETS):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["preset"], r["method"], f"{r['file_bytes'] / 2**20:.2f}", f"{r['bpw']:.3f}",
                      *(f"{r['scores'][n]['ppl']:.2f}" if n in r["scores"] else "-" for n in protocol.EVAL_SETS))
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-pad768"])
    ap.add_argument("--methods", nargs="+", default=["d2quant+shrink=0.5"],
                    help="gptq | d2quant, optionally +KEY=VALUE levers (as gguf_bench)")
    ap.add_argument("--targets-preset", nargs="+", choices=ALL_PRESETS,
                    help="the tensor bytes these presets take on the model")
    ap.add_argument("--targets-mib", nargs="+", type=float, help="tensor data sizes in MiB")
    ap.add_argument("--targets-bpw", nargs="+", type=float, help="bits per real parameter")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), help="candidate GGML types (F16 always)")
    ap.add_argument("--calib", default="wiki", choices=protocol.CALIBRATIONS)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out-dir", type=Path, default=gb.OUT_DIR)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--preset-results", nargs="+", type=Path, default=[gb.RESULTS],
                    help="gguf_bench result files holding the presets' rows")
    ap.add_argument("--report", action="store_true", help="print the ratios to the frontiers and exit")
    ap.add_argument("--plot", type=Path, metavar="PNG", help="with --report: also write the curves")
    ap.add_argument("--plot-set", default="wiki-test", choices=protocol.EVAL_SETS)
    a = ap.parse_args(argv)
    if a.report:
        rows = [r for r in read_rows(a.results) if r["model"] in a.models]
        preset_rows = [r for f in a.preset_results for r in read_rows(f)]
        print(report(rows, preset_rows))
        if a.plot and rows:
            plot(rows, preset_rows, a.plot, a.plot_set)
        return
    if not (a.targets_preset or a.targets_mib or a.targets_bpw):
        raise SystemExit("error: name the sizes with --targets-preset, --targets-mib or --targets-bpw "
                         "(or pass --report)")
    for m in a.methods:
        if gb.method_config(m)[0].startswith("llamacpp"):
            raise SystemExit(f"error: {m}: a target is calibrated by our methods; llama.cpp's presets "
                             "come from bench/gguf_bench.py")
    unknown = sorted(set(a.kinds) - {name.lower() for name in ggml_types()})
    if unknown:
        raise SystemExit(f"error: unknown --kinds {', '.join(unknown)}")
    s = gb.Settings(a.calib, a.nsamples, a.seqlen, a.windows, a.ctx, a.threads, 0, 0, a.device, True,
                    False, a.out_dir)
    s.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        run_targets(a, s)
    except D2Error as e:
        raise SystemExit(f"error: {e}") from None
    summary([r for r in read_rows(a.results) if r["model"] in a.models])


if __name__ == "__main__":
    main()
