"""--target-bpw / --target-size for either format: a grid for every matrix, meeting a byte budget at
the least predicted cost (d2quant.sensitivity measures the costs on the calibration tokens).

Each format says how a matrix may be stored and what each way costs in bytes (its ``Option``s:
converters.gguf.allocate for GGML types, converters.onnx.allocate for MatMulNBits bits) and which
bytes it does not choose (norms, biases, a table kept as the user asked). The budget is
``target_bpw x parameters / 8`` bytes for the whole file's tensors, embeddings and output included,
as llama-quantize reports bits per weight, or ``--target-size`` bytes; the matrices share what the
fixed bytes leave.

The choice is a multiple-choice knapsack, solved exactly by dynamic programming over the budget in
``RESOLUTION`` steps (each matrix's bytes rounded up to a step, so the budget holds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from d2quant.errors import D2Error

RESOLUTION = 20_000  # budget steps of the dynamic programme
PROBE_WINDOWS, PROBE_LEN = 2, 256  # calibration tokens the sensitivity probes run on
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1.1GB' / '800MiB' / '123456' -> bytes (GB = 10^9, GiB = 2^30)."""
    m = _SIZE.match(text or "")
    if not m:
        raise D2Error(f"--target-size {text!r} is no size; write e.g. 800MB, 1.1GB or 950MiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}.get(unit)
    if scale is None:
        raise D2Error(f"--target-size {text!r}: unknown unit {m.group(2)!r}; use B, KB, MB, GB, KiB, MiB or GiB")
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class SizeTarget:
    """A size the user names: bits per weight or bytes (at most one; neither: no allocation)."""

    target_bpw: float | None = None
    target_size: int | None = None

    def __post_init__(self):
        if self.target_bpw is not None and self.target_size is not None:
            raise D2Error("--target-bpw and --target-size each name the size; pass one of them")
        if self.target_bpw is not None and not 1.0 <= self.target_bpw <= 32.0:
            raise D2Error(f"--target-bpw {self.target_bpw} is outside 1..32 bits per weight")
        if self.target_size is not None and self.target_size <= 0:
            raise D2Error(f"--target-size must be positive, got {self.target_size} bytes")

    @property
    def active(self) -> bool:
        return self.target_bpw is not None or self.target_size is not None

    @property
    def options(self) -> list[str]:
        """The command-line options that set this size."""
        return [n for n, v in (("--target-bpw", self.target_bpw), ("--target-size", self.target_size)) if v is not None]

    @property
    def label(self) -> str:
        return f"{self.target_bpw}bpw" if self.target_bpw is not None else f"{self.target_size}B"

    def total_bytes(self, n_params: int) -> int:
        return self.target_size if self.target_size is not None else int(self.target_bpw * n_params / 8)


@dataclass(frozen=True)
class Option:
    """One way to store a matrix: its label (what costs are keyed by and the table prints), its grid
    spec (None: float) and the bytes it takes in the file."""

    label: str
    spec: dict | None
    nbytes: int


@dataclass
class Allocation:
    choice: dict[str, Option]  # matrix name -> how it is stored
    loss: dict[str, float]  # predicted cost of each choice
    budget: int  # bytes the matrices could take
    fixed: int  # bytes the allocation does not choose
    n_params: int

    def grids(self) -> dict[str, dict | None]:
        return {n: o.spec for n, o in self.choice.items()}

    @property
    def bpw(self) -> float:
        return 8 * (sum(o.nbytes for o in self.choice.values()) + self.fixed) / self.n_params


def solve(options: dict[str, list[tuple[str, int, float]]], budget_bytes: int) -> dict[str, str]:
    """The multiple-choice knapsack: one option (label, bytes, loss) per matrix, total bytes within
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
        label, nbytes, _ = options[names[t]][c]
        out[names[t]] = label
        u -= -(-nbytes // step)
    return out


def check_resident(src) -> None:
    """The sensitivity probes replay the whole model in memory."""
    if src.weights.streams:
        raise D2Error("--target-bpw / --target-size measure every tensor's sensitivity on the whole model "
                      "in memory; drop --stream, or give a --type")


def check_reachable(options: dict[str, list[Option]], target: SizeTarget, fixed: int, n_params: int) -> int:
    """The matrices' byte budget for ``target``, or the reachable range as an error (known from
    the bytes alone, so it is checked before any cost is measured)."""
    budget_bytes = target.total_bytes(n_params) - fixed
    bpw = lambda matrix_bytes: 8 * (matrix_bytes + fixed) / n_params  # noqa: E731
    lo = sum(min(o.nbytes for o in opts) for opts in options.values())
    hi = sum(max(o.nbytes for o in opts) for opts in options.values())
    if budget_bytes < lo:
        raise D2Error(f"the target is below what the smallest types give: reachable "
                      f"{bpw(lo):.3f} to {bpw(hi):.3f} bits per weight")
    if budget_bytes >= hi:
        raise D2Error(f"the target is at or above float for every matrix ({bpw(hi):.3f} bits per "
                      f"weight); reachable from {bpw(lo):.3f}")
    return budget_bytes


def allocate(options: dict[str, list[Option]], costs: dict, target: SizeTarget, fixed: int,
             n_params: int) -> Allocation:
    """How to store every matrix, from measured costs (d2quant.sensitivity.MatrixCost per matrix)."""
    budget_bytes = check_reachable(options, target, fixed, n_params)
    labels = solve({n: [(o.label, o.nbytes, costs[n].loss(o.label)) for o in opts]
                    for n, opts in options.items()}, budget_bytes)
    choice = {n: next(o for o in options[n] if o.label == labels[n]) for n in options}
    return Allocation(choice, {n: costs[n].loss(labels[n]) for n in options}, budget_bytes, fixed, n_params)


def choose(model, tokens, options: dict[str, list[Option]], target: SizeTarget, fixed: int,
           n_params: int, on_allocation=None) -> Allocation:
    """Measure every option's cost on the calibration tokens, then allocate for ``target`` (the
    targets have checked it is reachable when the model was loaded); ``on_allocation`` sees it."""
    from d2quant.sensitivity import measure

    if tokens is None:
        raise D2Error("--target-bpw measures each tensor's sensitivity on calibration data; "
                      "use --method gptq or d2quant")
    costs = measure(model, tokens, tokens[:PROBE_WINDOWS, :PROBE_LEN],
                    {n: {o.label: o.spec for o in opts} for n, opts in options.items()})
    alloc = allocate(options, costs, target, fixed, n_params)
    if on_allocation:
        on_allocation(alloc)
    return alloc
