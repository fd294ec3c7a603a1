"""The GGML side of --target-bpw / --target-size (converters.allocation chooses): the types a
matrix may take and their bytes, and saved recipes.

* Options: every GGML type we calibrate onto whose block divides the matrix's rows (llama.cpp
  cannot store it otherwise), and F16, which always fits. IQ1_S / IQ1_M are left out: on the
  models measured here they cost more than their bytes save.
* Fixed bytes: the norms, in F32 (biases are not counted, as llama-quantize's bpw does not).
"""

from __future__ import annotations

import json
from pathlib import Path

from converters.allocation import Option
from converters.gguf.presets import FLOAT, tensor_nbytes
from d2quant.errors import D2Error
from d2quant.grids.ggml import ggml_types
from d2quant.qmodel import ModelSpec

_EXCLUDED = {"IQ1_S", "IQ1_M"}


def candidate_kinds(n_cols: int) -> list[str]:
    """The types a matrix with rows of ``n_cols`` weights can be stored as (FLOAT: F16)."""
    kinds = [name.lower() for name, cls in ggml_types().items() if name not in _EXCLUDED and n_cols % cls.block == 0]
    return [*kinds, FLOAT]


def options(spec: ModelSpec) -> dict[str, list[Option]]:
    """Matrix name -> the GGML types (and F16) it may be stored as, with their bytes."""
    return {name: [Option(k, None if k == FLOAT else {"kind": k}, tensor_nbytes(k, n, cols))
                   for k in candidate_kinds(cols)]
            for name, (n, cols) in spec.matrix_shapes().items()}


def fixed_bytes(spec: ModelSpec) -> int:
    """What the allocation does not choose: the norms, in F32."""
    return 4 * (spec.n_params - sum(n * k for n, k in spec.matrix_shapes().values()))


def check_recipe_path(path: str | Path) -> Path:
    """The recipe file, refused before any work when it is not there."""
    path = Path(path)
    if not path.is_file():
        raise D2Error(f"--recipe {path} is not a file; give a GGUF written by d2export or a JSON "
                      "recipe ({\"types\": {matrix: type}})")
    return path


def read_recipe(path: str | Path, spec: ModelSpec) -> dict[str, dict | None]:
    """Grids of a saved recipe: a GGUF written by d2export (its d2export.recipe field) or a JSON
    file ({"types": {matrix: kind}}), checked against the model."""
    path = check_recipe_path(path)
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
    shapes = spec.matrix_shapes()
    if set(types) != set(shapes):
        missing, extra = sorted(set(shapes) - set(types)), sorted(set(types) - set(shapes))
        raise D2Error(f"recipe {path} is for another model: it lacks {missing[:2]} and names {extra[:2]}")
    for name, kind in types.items():
        if kind not in candidate_kinds(shapes[name][1]):
            raise D2Error(f"recipe {path} gives {name} the type {kind!r}, which is unknown or does not "
                          f"fit its rows; known: {', '.join(candidate_kinds(shapes[name][1]))}")
    return {n: None if k == FLOAT else {"kind": k} for n, k in types.items()}
