"""--target-bpw / --target-size: a GGML type for every matrix, meeting a byte budget at the least
predicted cost (d2quant.sensitivity measures the costs on the calibration tokens).

* Candidates: every GGML type we calibrate onto whose block divides the matrix's rows (llama.cpp
  cannot store it otherwise), and F16, which always fits. IQ1_S / IQ1_M are left out: on the
  models measured here they cost more than their bytes save (and their fits are slow).
* Budget: ``target_bpw x parameters / 8`` bytes for every tensor of the file, embeddings and
  output included, norms in F32, as llama-quantize reports bits per weight; or ``--target-size``
  bytes. The norms and biases are fixed; the matrices share the rest.
* The choice is a multiple-choice knapsack, solved exactly by dynamic programming over the
  budget in ``RESOLUTION`` steps (each matrix's bytes rounded up to a step, so the budget holds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.gguf.presets import FLOAT, linear_shapes, spec_param_count, tensor_nbytes
from d2quant.errors import D2Error
from d2quant.grids.ggml import ggml_types
from d2quant.qmodel import ModelSpec

RESOLUTION = 20_000  # budget steps of the dynamic programme
_EXCLUDED = {"IQ1_S", "IQ1_M"}


def candidate_kinds(n_cols: int) -> list[str]:
    """The types a matrix with rows of ``n_cols`` weights can be stored as (FLOAT: F16)."""
    kinds = [name.lower() for name, cls in ggml_types().items() if name not in _EXCLUDED and n_cols % cls.block == 0]
    return [*kinds, FLOAT]


def candidates(spec: ModelSpec) -> dict[str, list[dict | None]]:
    """Matrix name -> grid specs it may take (None: F16)."""
    return {name: [None if k == FLOAT else {"kind": k} for k in candidate_kinds(cols)]
            for name, (_, cols) in linear_shapes(spec).items()}


def fixed_bytes(spec: ModelSpec) -> int:
    """What the allocation does not choose: the norms, in F32."""
    return 4 * (spec_param_count(spec) - sum(n * k for n, k in linear_shapes(spec).values()))


def budget(spec: ModelSpec, target_bpw: float | None = None, target_size: int | None = None) -> int:
    """Bytes the matrices may take for a target (exactly one of the two)."""
    total = target_size if target_size is not None else int(target_bpw * spec_param_count(spec) / 8)
    return total - fixed_bytes(spec)


@dataclass
class Allocation:
    types: dict[str, str]  # matrix name -> grid kind (or FLOAT)
    nbytes: dict[str, int]
    loss: dict[str, float]  # predicted cost of each choice
    budget: int

    def grids(self) -> dict[str, dict | None]:
        return {n: None if k == FLOAT else {"kind": k} for n, k in self.types.items()}


def solve(options: dict[str, list[tuple[str, int, float]]], budget_bytes: int) -> dict[str, str]:
    """The multiple-choice knapsack: one option (kind, bytes, loss) per matrix, total bytes within
    ``budget_bytes``, least total loss. Exact up to the rounding of bytes to budget steps."""
    names = list(options)
    step = max(1, -(-budget_bytes // RESOLUTION))
    units = budget_bytes // step
    lowest = sum(min(b for _, b, _ in options[n]) for n in names)
    if lowest > budget_bytes:
        raise D2Error("budget below what the smallest types give")
    best = np.zeros(units + 1)  # least loss with at most u steps, over the matrices so far
    choice = np.zeros((len(names), units + 1), dtype=np.int16)
    for t, name in enumerate(names):
        nxt = np.full(units + 1, np.inf)
        for c, (_, nbytes, loss) in enumerate(options[name]):
            need = -(-nbytes // step)
            if need > units:
                continue
            cand = np.full(units + 1, np.inf)
            cand[need:] = best[:units + 1 - need] + loss
            take = cand < nxt
            nxt[take], choice[t, take] = cand[take], c
        best = nxt
    if not np.isfinite(best[units]):
        raise D2Error("no combination of types fits the budget once bytes are rounded; raise the target")
    out, u = {}, units
    for t in range(len(names) - 1, -1, -1):
        c = int(choice[t, u])
        kind, nbytes, _ = options[names[t]][c]
        out[names[t]] = kind
        u -= -(-nbytes // step)
    return out


def allocate(spec: ModelSpec, costs: dict, budget_bytes: int) -> Allocation:
    """Types for every matrix of ``spec`` from measured costs (d2quant.sensitivity.MatrixCost)."""
    shapes = linear_shapes(spec)
    options = {n: [(k, tensor_nbytes(k, *shapes[n]), costs[n].loss(k)) for k in costs[n].errors] for n in shapes}
    lo = sum(min(b for _, b, _ in opt) for opt in options.values())
    hi = sum(max(b for _, b, _ in opt) for opt in options.values())
    if budget_bytes < lo:
        raise D2Error(f"the target is below what the smallest types give: reachable "
                      f"{_bpw(spec, lo):.3f} to {_bpw(spec, hi):.3f} bits per weight")
    if budget_bytes >= hi:
        raise D2Error(f"the target is at or above F16 for every matrix ({_bpw(spec, hi):.3f} bits per "
                      f"weight); reachable from {_bpw(spec, lo):.3f}")
    types = solve(options, budget_bytes)
    nbytes = {n: tensor_nbytes(types[n], *shapes[n]) for n in shapes}
    return Allocation(types, nbytes, {n: costs[n].loss(types[n]) for n in shapes}, budget_bytes)


def _bpw(spec: ModelSpec, matrix_bytes: int) -> float:
    return 8 * (matrix_bytes + fixed_bytes(spec)) / spec_param_count(spec)


def file_bpw(spec: ModelSpec, alloc: Allocation) -> float:
    return _bpw(spec, sum(alloc.nbytes.values()))


def read_recipe(path: str | Path, spec: ModelSpec) -> dict[str, dict | None]:
    """Grids of a saved recipe: a GGUF written by d2export (its d2export.recipe field) or a JSON
    file ({"types": {matrix: kind}}), checked against the model."""
    path = Path(path)
    if not path.is_file():
        raise D2Error(f"recipe file {path} does not exist")
    try:
        if path.suffix == ".gguf":
            import gguf

            field = gguf.GGUFReader(str(path)).fields.get("d2export.recipe")
            if field is None:
                raise D2Error(f"{path} holds no d2export recipe; pass a GGUF written by d2export")
            grids = json.loads(field.contents()).get("grids") or {}
            types = {n: "float" if g is None else g["kind"] for n, g in grids.items()}
        else:
            types = json.loads(path.read_text())["types"]
    except D2Error:
        raise
    except Exception as e:
        raise D2Error(f"recipe {path} is unreadable ({type(e).__name__}: {e})") from None
    shapes = linear_shapes(spec)
    if set(types) != set(shapes):
        missing, extra = sorted(set(shapes) - set(types)), sorted(set(types) - set(shapes))
        raise D2Error(f"recipe {path} is for another model: it lacks {missing[:2]} and names {extra[:2]}")
    for name, kind in types.items():
        if kind not in candidate_kinds(shapes[name][1]):
            raise D2Error(f"recipe {path} gives {name} the type {kind!r}, which is unknown or does not "
                          f"fit its rows; known: {', '.join(candidate_kinds(shapes[name][1]))}")
    return {n: None if k == FLOAT else {"kind": k} for n, k in types.items()}
