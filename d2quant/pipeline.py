"""Layer-by-layer calibration: source model + calibration tokens -> QuantizedModel.

The model's family (d2quant.families) names the modules; the order inside each decoder layer
(inputs are the outputs of the already-quantized layers) is the same for every family:
  A. H_qkv on the attention norm's output; DAC teacher = the MLP norm's output with FP attention.
  B. quantize q, k, v (or a fused qkv); H_o on the attention context with quantized q/k/v.
  C. quantize o; student MLP-norm output -> DAC bias b; H_gate_up on (output + b).
  D. quantize gate, up (or a fused gate_up); H_down on their quantized product; quantize down
     (DSQ); fold its column scale into the up rows and b into gate/up biases (b' = W_hat b).
  E. the layer's outputs with all quantized weights become the next layer's inputs.
After the last layer: DAC on the final norm, folded into an lm_head bias.
The ``objective`` of each linear's GPTQ (X: the float model's inputs to it, X~: the quantized model's):
  sequential  ||(Q - W) X~||   H on the quantized stream, as above (GPTQ's)
  float       ||(Q - W) X||    H summed from the float stream run through the layer before it is edited
  asymmetric  ||Q X~ - W X||   as sequential, solved towards the target W + W (C - H) H^-1, with
                               C = X^T X~ the cross moment of the two streams (the GPTAQ objective):
                               the layer also undoes the drift its inputs arrive with
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, NamedTuple

import torch

from d2quant import rotation
from d2quant.activations import OFFLOADS, Activations, plan_offload
from d2quant.checkpoint import CheckpointWriter
from d2quant.cpu import (bound_heap_blocks, native_matmul_dtype, peak_rss_mb, release_free_heap, reset_peak_rss,
                         rss_mb)
from d2quant.distributed import SINGLE, Group
from d2quant.errors import D2Error
from d2quant.grids import (DualScaleGrid, Grid, ResidualBinaryGrid, UniformGrid, grid_from_spec,
                           round_to_fp16, strip_col_scale)
from d2quant.qmodel import QuantizedLinear, QuantizedModel, set_linear
from d2quant.solver import gptq_rows, rtn, single_thread
from d2quant.sources import Source

METHODS = ("rtn", "gptq", "d2quant")
OBJECTIVES = ("sequential", "float", "asymmetric")
SCALE_FITS = ("diag", "conditional")
FORWARD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # and "auto": by the device


@dataclass
class QuantConfig:
    method: str = "d2quant"  # rtn | gptq | d2quant
    bits: int = 3
    group_size: int = 64
    dsq: bool = True  # d2quant only: dual-scale quantizer on down_proj at <= 3 bits
    dsq_form: str = "rbin"  # rbin: the paper's residual-binary grid; dual: column scale on the grid
    dac: bool = True  # d2quant only: deviation-aware bias on post-attention and final norms
    rotate: bool = False
    damp: float = 0.01
    # GPTQ on (1 - shrink) H + shrink diag(H) (solver.gptq). Half-way to the diagonal keeps the
    # error feedback but stops it fitting the calibration text's correlations: padded SmolLM2 Q2_K
    # calibrated on wikitext, GPTQ against llama.cpp + imatrix went from x0.755 / x1.003 / x1.081
    # (wiki-test / gutenberg / pydocs perplexity) at 0 to x0.725 / x0.887 / x0.909 (BENCHMARKS.md)
    shrink: float = 0.5
    # down_proj's own shrink (None: --shrink). Its input (the MLP's gated product, thousands of
    # columns) is the one whose GPTQ solution transfers worst to other text (BENCHMARKS.md probe)
    shrink_down: float | None = None
    # GPTQ visits columns by decreasing Hessian diagonal (static groups): on SmolLM2, whose inputs
    # carry single channels of ~2,700, it took padded Q3_K_S from 33.22 to 30.80 (BENCHMARKS.md)
    act_order: bool = True
    # what each linear's GPTQ minimises (see the module's docstring): GPTQ's sequential error on the
    # quantized model's inputs, the error on the float model's, or the quantized output's distance to
    # the float model's output (asymmetric)
    objective: str = "sequential"
    # the column weights of each group's scale fit (solver.gptq_rows): diag(H), as llama.cpp's imatrix,
    # or what GPTQ's step weighs each column's error with once later columns compensate (conditional)
    scale_fit: str = "diag"
    device: str = "auto"
    batch: int = 8  # calibration samples per forward
    # read the source's weights one decoder layer at a time (d2quant.weights) instead of whole
    stream: bool = False
    offload: str = "auto"  # where activations live: auto | cpu | disk (d2quant.activations)
    # the calibration forwards' matmuls (the layers' inputs and outputs, the DAC teacher); the
    # Hessians are summed and GPTQ solved in float32/64 either way. bfloat16 runs them on AMX / tensor
    # cores (5x float32 on the Sapphire Rapids VM here) at bfloat16's rounding of every linear output
    forward_dtype: str = "float32"
    # per-tensor grid specs by linear name (GGUF presets); None keeps that tensor in float (F16)
    grids: dict[str, dict | None] = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise D2Error(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.bits not in (2, 3, 4, 8):
            raise D2Error(f"--bits must be 2, 3, 4 or 8, got {self.bits}")
        g = self.group_size
        if g < 16 or g > 1024 or g & (g - 1):
            raise D2Error(f"--group-size must be a power of two from 16 to 1024 (runtimes need it), got {g}")
        if self.dsq_form not in ("rbin", "dual"):
            raise D2Error(f"--dsq-form must be rbin or dual, got {self.dsq_form!r}")
        for opt, v in (("--shrink", self.shrink), ("--shrink-down", self.shrink_down)):
            if v is not None and not 0.0 <= v <= 1.0:
                raise D2Error(f"{opt} must lie in 0..1 (1: the diagonal only, as an imatrix), got {v}")
        if not self.damp >= 0.0:
            raise D2Error(f"--damp must be 0 or more (a fraction of mean(diag H); GPTQ's 0.01), got {self.damp}")
        if self.objective not in OBJECTIVES:
            raise D2Error(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.scale_fit not in SCALE_FITS:
            raise D2Error(f"--scale-fit must be one of {', '.join(SCALE_FITS)}, got {self.scale_fit!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise D2Error(f"--device must be auto, cpu or cuda, got {self.device!r}")
        # "auto" is resolved once (the recipe records what ran); bfloat16's quality matched float32's
        # under the domain protocol (BENCHMARKS.md)
        if self.forward_dtype == "auto":
            self.forward_dtype = native_matmul_dtype(self.torch_device())
        if self.forward_dtype not in FORWARD_DTYPES:
            raise D2Error(f"--forward-dtype must be auto or one of {', '.join(FORWARD_DTYPES)}, "
                          f"got {self.forward_dtype!r}")
        if self.offload not in OFFLOADS:
            raise D2Error(f"--offload must be one of {', '.join(OFFLOADS)}, got {self.offload!r}")
        if self.stream and self.rotate:
            raise D2Error("--rotate rotates the whole model before calibration; drop --stream (or --rotate)")

    # options added after files were pinned, recorded only away from these values, so files made
    # without them keep the bytes they had before the option existed
    _RECORDED_WHEN_NOT = {"forward_dtype": "float32", "shrink_down": None, "objective": "sequential",
                          "scale_fit": "diag"}

    def recipe(self) -> dict:
        """The config as files record it."""
        return {k: v for k, v in asdict(self).items()
                if k not in self._RECORDED_WHEN_NOT or v != self._RECORDED_WHEN_NOT[k]}

    def shrink_for(self, is_down: bool) -> float:
        return self.shrink_down if is_down and self.shrink_down is not None else self.shrink

    def forwards(self, device: torch.device):
        """The context the calibration forwards run in."""
        return torch.autocast(device.type, dtype=FORWARD_DTYPES[self.forward_dtype],
                              enabled=self.forward_dtype != "float32")

    @property
    def uses_dsq(self) -> bool:
        return self.method == "d2quant" and self.dsq

    @property
    def uses_dac(self) -> bool:
        return self.method == "d2quant" and self.dac

    @property
    def keeps_float_stream(self) -> bool:
        """Calibration runs the float model beside the quantized one (the DAC teacher, the objective)."""
        return self.uses_dac or self.objective != "sequential"

    def torch_device(self) -> torch.device:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise D2Error("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def grid_for(self, name: str, n: int, k: int, is_down: bool = False) -> Grid:
        """The grid a linear is calibrated onto; ``is_down``: the MLP's down projection (DSQ)."""
        spec = self.grids.get(name) or UniformGrid(self.bits, self.group_size).spec()
        grid = grid_from_spec(spec)
        if self.uses_dsq and is_down and grid.bits <= 3:
            if self.dsq_form == "rbin" and isinstance(grid, UniformGrid):
                grid = ResidualBinaryGrid(grid.bits, grid.group)
            else:
                grid = DualScaleGrid(spec)
        grid.check_shape(n, k)
        return grid


class _Target(NamedTuple):
    """A linear to quantize: its name, module, grid (None: kept in float by the preset) and the
    shrink its Hessian is solved with."""
    name: str
    module: torch.nn.Module
    grid: Grid | None
    shrink: float = 0.0


_ROWS = 1024  # rows of a k x k float64 sum handled at a time (8 960 wide: 73 MB)


class _Total:
    """A sum of per-batch terms in batch order: added as they come in one process, or kept and
    chained across ranks in the same order (d2quant.distributed), so both give the same bits."""

    def __init__(self, shape, device, group: Group):
        self.shape, self.device, self.group = shape, device, group
        self._acc = torch.zeros(shape, dtype=torch.float64, device=device)
        self._terms: list[torch.Tensor] | None = [] if group.active else None

    def add(self, term: torch.Tensor) -> None:
        if self._terms is None:  # by rows: a float32 term is widened to float64 on the way in
            for i in range(0, term.shape[0], _ROWS):
                self._acc[i:i + _ROWS] += term[i:i + _ROWS]
        else:
            self._terms.append(term)

    def total(self) -> torch.Tensor:
        if self._terms is not None:
            self._acc = self.group.ordered_sum(self._terms, self.shape, self.device)
            self._terms = None
        return self._acc


class _Moments:
    """X^T X, sum(x) and count of a layer input over all samples, so H for (x + b) is exact for any
    later b. With ``partner`` (the float model's inputs to the same linear, batch by batch) also the
    cross moment X_float^T X and sum(x_float), for the asymmetric objective."""

    def __init__(self, k: int, device, group: Group = SINGLE, partner: Activations | None = None):
        self._xtx, self._sum = _Total((k, k), device, group), _Total((k,), device, group)
        self._n, self.group, self._count = 0, group, None
        self._partner, self._batches = partner, 0
        if partner is not None:
            self._cross, self._fsum = _Total((k, k), device, group), _Total((k,), device, group)

    @classmethod
    def of(cls, xs: Activations, device, group: Group) -> "_Moments":
        m = cls(xs[0].shape[-1], device, group)
        for x in xs:
            m.add(x)
        return m

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        with torch.autocast(x.device.type, enabled=False):  # called from hooks inside the forwards
            self._xtx.add(x.T @ x)  # fp32 products per batch, fp64 running sum
            if self._partner is not None:  # the same tokens in the float model
                f = self._partner[self._batches].reshape(x.shape).to(x.device, torch.float32)
                self._cross.add(f.T @ x)
                self._fsum.add(f.sum(0).double())
        self._sum.add(x.sum(0).double())
        self._n += x.shape[0]
        self._batches += 1

    @property
    def n(self) -> int:
        if self._count is None:
            self._count = self.group.count(self._n)
        return self._count

    def mean(self) -> torch.Tensor:
        return (self._sum.total() / self.n).float()

    def energy(self) -> torch.Tensor:
        """Mean square of the input's entries."""
        return torch.diagonal(self._xtx.total()).sum() / (self.n * self._sum.shape[0])

    def hessian(self, shift: torch.Tensor | None = None) -> torch.Tensor:
        xtx = self._xtx.total()
        if shift is None:
            return self._halved(xtx.shape, lambda r: xtx[r])
        b, s = shift.double(), self._sum.total()
        return self._halved(xtx.shape, lambda r: xtx[r] + torch.outer(b[r], s) + torch.outer(s[r], b)
                            + self.n * torch.outer(b[r], b))

    def cross(self, shift: torch.Tensor | None = None) -> torch.Tensor:
        """2/n X_float^T (X + shift), the counterpart of hessian() for the asymmetric objective."""
        c = self._cross.total()
        if shift is None:
            return self._halved(c.shape, lambda r: c[r])
        f, b = self._fsum.total(), shift.double()
        return self._halved(c.shape, lambda r: c[r] + torch.outer(f[r], b))

    def _halved(self, shape, rows) -> torch.Tensor:
        """float32 of 2 rows(r) / n, _ROWS rows at a time: whole, the float64 temporaries were 1.2 GB
        beside the sums at 8 960 inputs (Qwen's down_proj). Each entry is computed as before."""
        out = torch.empty(shape, dtype=torch.float32, device=self._xtx.device)
        for i in range(0, shape[0], _ROWS):
            r = slice(i, i + _ROWS)
            out[r] = 2 * rows(r) / self.n
        return out

    def close(self) -> None:
        """Frees the sums once H is taken: 0.6 GB of float64 at 8 960 inputs, before GPTQ's peak."""
        self._xtx = self._sum = self._cross = self._fsum = None


@contextmanager
def _taking_inputs(takes: dict[torch.nn.Module, Callable[[torch.Tensor], None]]):
    """Each module's input handed to its taker, batch by batch, over the forwards run inside the block."""
    hooks = [mod.register_forward_hook(lambda m, inp, out, take=take: take(inp[0])) for mod, take in takes.items()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class _Reached(Exception):
    """Raised by the pre-hook of :func:`_input_to` once it holds the module's input."""


def _input_to(mod: torch.nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """``mod``'s input in the forward ``run``, which stops there: the module and whatever follows it
    are never computed (o_proj in the attention pass, down_proj in the MLP pass: 10 s of the README
    job), since the callers want only this input."""
    got = []

    def take(m, inp):
        got.append(inp[0])
        raise _Reached

    hook = mod.register_forward_pre_hook(take)
    try:
        run()
    except _Reached:
        pass
    finally:
        hook.remove()
    if not got:
        raise RuntimeError(f"the forward never reached {type(mod).__name__}")
    return got[0]


def _causal_mask(t: int, device, window: int | None = None) -> torch.Tensor:
    """Additive [1, 1, t, t] mask; with ``window`` a query sees itself and window - 1 keys before."""
    mask = torch.full((t, t), float("-inf"), device=device).triu(1)
    if window is not None and window < t:
        mask = mask + torch.full((t, t), float("-inf"), device=device).tril(-window)
    return mask[None, None]


def _token_mean(xs, group: Group) -> torch.Tensor:
    """Mean over every token of every rank's batches."""
    total, n = None, 0
    for x in xs:
        x = x.reshape(-1, x.shape[-1])
        total = total or _Total((x.shape[-1],), x.device, group)
        total.add(x.double().sum(0))
        n += x.shape[0]
    return (total.total() / group.count(n)).float()


def _reset_peak_mem(device: torch.device) -> tuple[str, float | None]:
    """Start the peak-memory count for this calibration: (what the peak measures, what the process
    holds already, in MiB: a bench's scoring data, a caller's tensors)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda allocated", torch.cuda.memory_allocated(device) / 2**20
    return ("rss" if reset_peak_rss() else "process rss"), rss_mb()


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


class Calibrator:
    def __init__(self, src: Source, cfg: QuantConfig, on_layer: Callable[[int, dict], None] | None,
                 sink: CheckpointWriter | None = None, recipe: dict | None = None, group: Group = SINGLE):
        self.src, self.cfg, self.sink, self.group = src, cfg, sink, group
        self.recipe = recipe or cfg.recipe()
        self.family = src.spec.family
        self.model = src.model
        self.weights = src.weights
        if cfg.stream and not self.weights.streams:
            raise D2Error("--stream reads a model's safetensors, but this source is held in memory "
                          "(a padded model, or one built in code); drop --stream")
        self.dev = cfg.torch_device()
        self.on_layer = on_layer or (lambda i, s: None)
        self.linears: dict[str, QuantizedLinear] = {}
        self.floats: dict[str, torch.Tensor] = {}  # tensors kept in float, by name
        # the model's parameter names in its own order (a tied lm_head once, as the embeddings)
        self.order = [n for n, _ in self.model.named_parameters()]
        self.report: dict = {"layers": []}
        self._peak = 0.0  # MiB, see _peak_so_far

    # ---- one linear ----------------------------------------------------------------------
    def _plan(self, prefix: str, layer, lins) -> list[list[_Target]]:
        """Linears reading one input as units of work: the ones on the same row-independent grid
        together (solved as one GPTQ problem), every other one alone."""
        units: dict = {}
        for lin in lins:
            t = self._target(prefix + lin.path, layer.get_submodule(lin.path), is_down=lin is self.family.down)
            key = (repr(t.grid), t.shrink) if t.grid is not None and t.grid.rows_independent else t.name
            units.setdefault(key, []).append(t)
        return list(units.values())

    def _target(self, name: str, mod, is_down: bool = False) -> _Target:
        if name in self.cfg.grids and self.cfg.grids[name] is None:
            return _Target(name, mod, None)  # a preset keeps it in float (rows no block fits)
        return _Target(name, mod, self.cfg.grid_for(name, *mod.weight.shape, is_down=is_down),
                       self.cfg.shrink_for(is_down))

    def _solve(self, unit: list[_Target], h: torch.Tensor | None,
               cross: torch.Tensor | None = None) -> dict[str, float]:
        """Quantize one unit of linears in place (see _plan); their Hessian-weighted relative errors."""
        grid = unit[0].grid
        if grid is None:  # stored as F16, so round to it
            w = unit[0].module.weight
            w.data.copy_(round_to_fp16(w.detach().float()).to(w.dtype))
            return {unit[0].name: 0.0}
        ws = [t.module.weight.detach().float() for t in unit]
        with single_thread():
            if self.cfg.method == "rtn" or h is None:
                solved = [rtn(w, grid, h, in_place=True) for w in ws]  # w takes these values below anyway
            else:
                solved = gptq_rows(ws, h, grid, damp=self.cfg.damp, act_order=self.cfg.act_order,
                                   shrink=unit[0].shrink, cross=cross, scale_fit=self.cfg.scale_fit)
        for t, s in zip(unit, solved):
            t.module.weight.data.copy_(s.weight.to(t.module.weight.dtype))
            bias = getattr(t.module, "bias", None)  # embeddings have none
            bias = None if bias is None else bias.detach().float().cpu()
            self.linears[t.name] = QuantizedLinear(grid, s.codes.cpu(), {k: v.cpu() for k, v in s.params.items()}, bias)
        return {t.name: s.error for t, s in zip(unit, solved)}

    def _fold_col_scale(self, prefix: str, layer) -> bool:
        """Move down's column scale c into the up rows: down(act(g) * c*u) == (down*c)(act(g)*u).
        Returns whether down_proj was on a DSQ grid (only those carry a column scale)."""
        fam = self.family
        down = self.linears.get(prefix + fam.down.path)
        if down is None or "col_scale" not in down.params:
            return False
        up_path, rows = fam.up_rows(down.shape[1])
        up = self.linears.get(prefix + up_path)
        if up is None:
            raise D2Error(f"{prefix}{up_path} is kept in float, so DSQ's column scale has nowhere to go; "
                          "use --no-dsq for this model")
        grid, params, c = strip_col_scale(down.grid, down.params, down.shape[1])
        if rows != slice(0, up.shape[0]):  # a fused gate_up: only the up half is scaled
            c = torch.ones(up.shape[0]).index_put_((torch.arange(up.shape[0])[rows],), c)
        up.params = up.grid.scale_rows(up.params, c)
        up_mod = layer.get_submodule(up_path)
        if up.bias is not None:
            up.bias = up.bias * c
            up_mod.bias.data.copy_(up.bias.to(self.dev))
        self.linears[prefix + fam.down.path] = QuantizedLinear(grid, down.codes, params, down.bias)
        up_mod.weight.data.copy_(up.weight().to(self.dev))
        layer.get_submodule(fam.down.path).weight.data.copy_(
            self.linears[prefix + fam.down.path].weight().to(self.dev))
        return True

    def _fold_dac(self, prefix: str, layer, b: torch.Tensor) -> None:
        for lin in self.family.gate_up:
            ql = self.linears.get(prefix + lin.path)
            if ql is None:
                raise D2Error(f"{prefix}{lin.path} is kept in float by the preset; use --no-dac for this model")
            extra = ql.weight() @ b.cpu()
            ql.bias = extra if ql.bias is None else ql.bias + extra
            set_linear(layer, lin.path, layer.get_submodule(lin.path).weight.data, ql.bias.to(self.dev))

    # ---- one decoder layer ----------------------------------------------------------------
    @torch.no_grad()
    def _layer(self, i: int, layer, x: Activations, pe, mask,
               float_in: dict[str, Activations] | None = None) -> tuple[Activations, dict]:
        """float_in: the float model's inputs to the layer's linears by site (family.input_sites),
        for the float and asymmetric objectives."""
        t0 = time.time()
        p, fam, cfg = f"model.layers.{i}.", self.family, self.cfg
        attn, mlp = layer.self_attn, layer.mlp
        o_proj, down_proj = layer.get_submodule(fam.o.path), layer.get_submodule(fam.down.path)
        n1, n2 = layer.get_submodule(fam.attn_norm), layer.get_submodule(fam.mlp_norm)
        post_attn = layer.get_submodule(fam.attn_post_norm) if fam.attn_post_norm else (lambda t: t)
        post_mlp = layer.get_submodule(fam.mlp_post_norm) if fam.mlp_post_norm else (lambda t: t)
        hid = self.src.spec.hidden
        err = {}
        fwd = lambda: cfg.forwards(self.dev)  # noqa: E731

        def run_attn(xb):
            with fwd():
                return attn(hidden_states=n1(xb), position_embeddings=pe, attention_mask=mask)[0]

        def moments(k, site) -> _Moments:
            return _Moments(k, self.dev, self.group, float_in[site] if cfg.objective == "asymmetric" else None)

        def solve(lins, m: _Moments, site, shift=None):
            """Linears reading the same input: each unit solved on its rank, then shared."""
            if cfg.objective == "float":
                h = _Moments.of(float_in[site], self.dev, self.group).hessian()
            else:
                h = m.hessian(shift)
            cross = m.cross(shift) if cfg.objective == "asymmetric" else None
            m.close()
            units = self._plan(p, layer, lins if isinstance(lins, tuple) else (lins,))
            mine = {}
            for j, unit in enumerate(units):
                if self.group.owner(j) == self.group.rank:
                    mine.update(self._solve(unit, h, cross))
            for j, unit in enumerate(units):
                for name, mod, *_ in unit:
                    if self.group.active:  # the owner's result (codes, weight, error) to every rank
                        got = (self.linears.get(name), mod.weight.detach().cpu(), mine[name]) \
                            if name in mine else None
                        ql, w, mine[name] = self.group.share(got, self.group.owner(j))
                        if self.group.owner(j) != self.group.rank:
                            mod.weight.data.copy_(w.to(self.dev))
                            if ql is not None:
                                self.linears[name] = ql
                    err[name.rpartition(".")[2]] = mine[name]

        # A: H for q/k/v; DAC teacher with full-precision attention on the quantized stream
        m_qkv, teacher = moments(hid, "qkv"), _Total((hid,), self.dev, self.group)
        for xb in x:
            m_qkv.add(n1(xb))
            if cfg.uses_dac:
                teacher.add(n2(xb + post_attn(run_attn(xb))).reshape(-1, hid).double().sum(0))
        solve(fam.qkv, m_qkv, "qkv")
        # B: H for o on the context of quantized q/k/v
        ctx = Activations.like(x)
        for xb in x:
            ctx.append(_input_to(o_proj, lambda: run_attn(xb)))
        m_o = moments(o_proj.in_features, "o")
        for c in ctx:
            m_o.add(c)
        solve(fam.o, m_o, "o")
        # C: student norm output, DAC bias, H for gate/up on the corrected activations
        with fwd():
            hs = Activations.like(x, (xb + post_attn(o_proj(c)) for xb, c in zip(x, ctx)))
        ctx.close()
        m_gu = moments(hid, "gate_up")
        for hb in hs:
            m_gu.add(n2(hb))
        b = None
        stats = {}
        if cfg.uses_dac:
            b = (teacher.total() / m_gu.n).float() - m_gu.mean()
            rms = m_gu.energy().sqrt().float()
            stats["dac_shift"] = float(b.norm() / math.sqrt(hid) / rms)
        solve(fam.gate_up, m_gu, "gate_up", b)
        # D: H for down on the quantized gate/up product (summed as it is made, never kept)
        shift = 0 if b is None else b
        m_d = moments(down_proj.in_features, "down")
        with fwd():
            for hb in hs:
                m_d.add(_input_to(down_proj, lambda: mlp(n2(hb) + shift)))
        solve(fam.down, m_d, "down")
        dsq = self._fold_col_scale(p, layer)
        if cfg.uses_dsq:  # DSQ reaches only a down_proj on a grid of <= 3 bits: say where it did
            stats["dsq"] = dsq
        if b is not None:
            self._fold_dac(p, layer, b)
        # E: outputs of the quantized layer
        with fwd():
            out = Activations.like(x, (hb + post_mlp(mlp(n2(hb))) for hb in hs))
        hs.close()
        stats.update({"layer": i, "seconds": round(time.time() - t0, 2),
                      "error": {k: round(v, 5) for k, v in err.items()}})
        return out, stats

    def _rtn_layer(self, i: int, layer) -> dict:
        t0, fam, p = time.time(), self.family, f"model.layers.{i}."
        err = {name.rpartition(".")[2]: e for unit in self._plan(p, layer, fam.layer_linears())
               for name, e in self._solve(unit, None).items()}
        self._fold_col_scale(p, layer)
        return {"layer": i, "seconds": round(time.time() - t0, 2),
                "error": {k: round(v, 5) for k, v in err.items()}}

    def _finish_layer(self, i: int, layer, stats: dict, stream: dict | None) -> None:
        """Keep the layer's float tensors, hand it to the checkpoint (then forget its codes), free it."""
        p = f"model.layers.{i}."
        # the calibration's peak so far: where it rises says which layer (or, after the last, the
        # head) set it
        stats["peak_mem_mb"] = self._peak_so_far()
        floats = {p + n: t.detach().float().cpu().clone() for n, t in layer.named_parameters()
                  if (p + n).rpartition(".")[0] not in self.linears}
        if self.sink is not None:
            mine = [n for n in self.linears if n.startswith(p)]
            self.sink.layer(i, {n: self.linears.pop(n) for n in mine}, floats, stats, stream)
        else:
            self.floats.update(floats)
        self.weights.release(layer)
        release_free_heap()
        self.report["layers"].append(stats)
        self.on_layer(i, stats)

    def _peak_so_far(self) -> float:
        """The calibration's peak memory so far, in MiB. A running maximum: the kernel's RSS
        counters are approximate to a few hundred kB, so VmHWM read after the free heap was handed
        back can fall below an earlier reading."""
        self._peak = max(self._peak, round(_peak_mem_mb(self.dev), 1))
        return self._peak

    @torch.no_grad()
    def run(self, calib: torch.Tensor | None) -> QuantizedModel:
        cfg, model, t0 = self.cfg, self.model, time.time()
        if cfg.stream:  # memory first: 8-32 MiB temporaries become fresh mappings, 25% slower on SmolLM2
            bound_heap_blocks()
        self.report["peak_mem_of"], held = _reset_peak_mem(self.dev)
        if held is not None:
            self.report["start_mem_mb"] = round(held, 1)
        spec = self.src.spec
        if cfg.rotate:
            self.report["rotation_block"] = rotation.rotate(model)
            spec.tie_embeddings = False
            spec.hf_config["tie_word_embeddings"] = False
            self.order = [n for n, _ in model.named_parameters()]
        final_bias = None
        if cfg.method == "rtn":
            for i, layer in enumerate(model.model.layers):  # no activations: on the CPU
                self.weights.load(layer, f"model.layers.{i}.", torch.device("cpu"))
                self._finish_layer(i, layer, self._rtn_layer(i, layer), None)
        else:
            if calib is None:
                raise D2Error(f"--method {cfg.method} needs calibration data")
            final_bias = self._calibrate_layers(calib)
        head_bias = self._head(final_bias)
        self.report["seconds"] = round(time.time() - t0, 1)
        self.report["peak_mem_mb"] = self._peak_so_far()
        return self._build(spec, head_bias)

    def _offload(self, calib: torch.Tensor) -> str:
        """Where the activations go (printed in the report): the streams a layer holds at once."""
        spec, n = self.src.spec, calib.numel()
        streams = 3 + self.cfg.keeps_float_stream  # inputs, outputs / residual, the float stream
        need = 4 * n * (streams * spec.hidden + spec.heads * spec.head_dim)
        if self.cfg.objective != "sequential":  # the float layer's inputs to its linears, kept for the layer
            need += 4 * n * (2 * spec.hidden + spec.heads * spec.head_dim + spec.ffn)
        plan = plan_offload(self.cfg.offload, self.dev, need)
        self.report["offload"] = {"where": plan.where, "gib": round(need / 2**30, 3), "why": plan.reason}
        return plan.where

    def _calibrate_layers(self, calib: torch.Tensor) -> torch.Tensor | None:
        model, cfg, dev, W = self.model, self.cfg, self.dev, self.weights
        inner = model.model
        where = self._offload(calib)
        x, xf = Activations(where, dev), None
        start = 0
        resumed = self.sink.stream() if self.sink is not None and self.sink.done else None
        if resumed is not None:  # the activations entering the first layer not yet written
            start = self.sink.done
            self.report["layers"] = list(self.sink.layers)
            for t in resumed["x"]:
                x.append(t.to(dev))
            if resumed["xf"] is not None:
                xf = Activations.like(x, (t.to(dev) for t in resumed["xf"]))
        else:
            W.load(inner.embed_tokens, "model.embed_tokens.", dev)
            starts = range(0, calib.shape[0], cfg.batch)
            for j in self.group.share_of(len(starts)):  # this rank's batches (all of them in one process)
                x.append(inner.embed_tokens(calib[starts[j]:starts[j] + cfg.batch].to(dev)))
            W.release(inner.embed_tokens)  # a streamed table leaves the device (the head reads it again)
            if cfg.keeps_float_stream:  # the float model's own stream
                xf = Activations.like(x, x)
        t = calib.shape[1]
        pos = torch.arange(t, device=dev)[None]
        fam, hf = self.family, self.src.spec.hf_config
        types = fam.layer_types(hf, len(inner.layers))
        probe = torch.zeros(1, t, self.src.spec.hidden, device=dev)
        pes = {ty: fam.position_embeddings(inner, probe, pos, ty) for ty in dict.fromkeys(types)}
        windows = fam.sliding_windows(hf, len(types))
        masks = {w: _causal_mask(t, dev, w) for w in dict.fromkeys(windows)}
        for i in range(start, len(inner.layers)):
            layer = inner.layers[i]
            W.load(layer, f"model.layers.{i}.", dev)
            pe, mask = pes[types[i]], masks[windows[i]]
            t_teacher, float_in = time.time(), {}
            if xf is not None:  # before calibration edits the layer
                sites = fam.input_sites() if cfg.objective != "sequential" else {}
                float_in = {site: Activations.like(x) for site in sites}
                with cfg.forwards(dev), _taking_inputs({layer.get_submodule(path): float_in[site].append
                                                        for site, path in sites.items()}):
                    xf_next = Activations.like(x, (layer(h, attention_mask=mask, position_embeddings=pe)
                                                   for h in xf))
                xf.close()
                xf = xf_next
            t_teacher = time.time() - t_teacher
            x_next, stats = self._layer(i, layer, x, pe, mask, float_in)
            for acts in float_in.values():
                acts.close()
            if xf is not None:  # what the float stream's forward costs (and its moments)
                stats["teacher_seconds"] = round(t_teacher, 3)
            x.close()
            x = x_next
            stream = None if self.sink is None else {"x": x.cpu(), "xf": None if xf is None else xf.cpu()}
            self._finish_layer(i, layer, stats, stream)
        if not cfg.uses_dac:
            return None
        W.load(inner.norm, "model.norm.", dev)
        b = _token_mean((inner.norm(h) for h in xf), self.group) - _token_mean((inner.norm(h) for h in x), self.group)
        self.report["final_dac_shift"] = float(b.norm() / math.sqrt(b.numel()))
        return b

    def _head(self, final_bias: torch.Tensor | None) -> torch.Tensor | None:
        """Quantize embeddings / lm_head when a preset asks (RTN) and fold the final DAC shift.

        Returns the lm_head bias when lm_head stays float (it then lives in the float tensors).
        """
        cpu, W, model = torch.device("cpu"), self.weights, self.model
        if not W.streams:  # a streamed model's layers are freed already; its head is read below
            model.cpu()
        emb, head = model.model.embed_tokens, model.lm_head
        tied = "lm_head.weight" not in self.order
        W.load(model.model.norm, "model.norm.", cpu)
        # one vocabulary table at a time: for a streamed model, a quantized table's float copy
        # leaves as soon as nothing reads it (its codes are in self.linears)
        b = None
        for name, mod, prefix in [("model.embed_tokens", emb, "model.embed_tokens.")] + (
                [] if tied else [("lm_head", head, "lm_head.")]):
            through = final_bias.cpu() if final_bias is not None and (tied or name == "lm_head") else None
            target = self._target(name, mod) if name in self.cfg.grids else None
            if target is not None and target.grid is not None and target.grid.rows_independent:
                b = self._round_table(target, prefix, through)  # None but for the last table, the head
                W.release(mod)
                continue
            W.load(mod, prefix, cpu)
            if target is not None:
                self._solve([target], None)
            if through is not None:  # through the head as written (tied embeddings' dequantized weight)
                b = through @ mod.weight.detach().float().T
            if name in self.linears:
                W.release(mod)
        if b is not None and "lm_head" in self.linears:
            self.linears["lm_head"].bias = b
            return None
        return b

    def _round_table(self, t: _Target, prefix: str, through: torch.Tensor | None) -> torch.Tensor | None:
        """RTN of a vocabulary table on a row-independent grid, a block of rows at a time as the
        weights give them (a streamed table is then never whole in float32: 0.9 GB for Qwen2.5's).
        The same codes as the whole table's. Returns ``through`` through the rounded table (the
        head's DAC bias) when given."""
        n, parts = t.module.weight.shape[0], []
        codes = b = None
        for rows, w in self.weights.row_blocks(t.module, prefix):
            block_codes, block_params = t.grid.quantize_matrix(w)  # elementwise: the same bits at any thread count
            w.copy_(t.grid.dequantize_matrix(block_codes, block_params))
            if codes is None:
                codes = torch.empty(n, w.shape[1], dtype=block_codes.dtype)
                b = None if through is None else torch.empty(n)
            codes[rows] = block_codes
            parts.append(block_params)
            if b is not None:
                b[rows] = through @ w.T
        params = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        self.linears[t.name] = QuantizedLinear(t.grid, codes, params, None)
        return b

    def _build(self, spec, head_bias: torch.Tensor | None) -> QuantizedModel:
        params = dict(self.model.named_parameters())
        tensors = {}
        for n in self.order:
            if n.rpartition(".")[0] in self.linears or (self.sink is not None and n.startswith("model.layers.")):
                continue  # a quantized linear's, or a layer the checkpoint already holds
            tensors[n] = self.floats[n] if n in self.floats else params[n].detach().float().clone()
        if head_bias is not None:
            tensors["lm_head.bias"] = head_bias
        qm = QuantizedModel(spec=spec, linears=self.linears, tensors=tensors,
                            recipe=self.recipe, report=self.report,
                            source=dict(self.src.info), tokenizer=self.src.tokenizer)
        if self.sink is None:
            return qm
        written = {n for n in self.sink.files if n not in self.sink.meta}  # the layers' float tensors
        names = [n for n in self.order if n in written or n in tensors] + [n for n in tensors if n not in self.order]
        out = self.sink.finish(self.linears, tensors, {**qm.manifest(), "tensors": names}, qm.tokenizer)
        return QuantizedModel.load(out)


def quantize_embeddings(qm: QuantizedModel, bits: int, group: int) -> QuantizedModel:
    """The embedding table rounded (RTN) onto a uniform grid; a tied lm_head reads the same codes.

    Needs no calibration data, so it applies to a fresh calibration and a saved checkpoint alike and
    is re-derived exactly from the checkpoint when an export is verified.
    """
    if "model.embed_tokens" in qm.linears:
        raise D2Error("the embeddings are already quantized in this model")
    w = qm.tensors["model.embed_tokens.weight"].float()
    grid = UniformGrid(bits, group)
    grid.check_shape(*w.shape)
    with single_thread():
        s = rtn(w, grid)
    tensors = {k: v for k, v in qm.tensors.items() if k != "model.embed_tokens.weight"}
    if qm.spec.tie_embeddings and "lm_head.weight" in tensors:
        raise D2Error("the model ties its embeddings but also carries an lm_head.weight; inconsistent")
    return replace(qm, linears={**qm.linears, "model.embed_tokens": QuantizedLinear(grid, s.codes, s.params)},
                   tensors=tensors, recipe={**qm.recipe, "embed_bits": bits, "embed_group": group})


def quantize(src: Source, calib: torch.Tensor | None, cfg: QuantConfig,
             on_layer: Callable[[int, dict], None] | None = None,
             sink: CheckpointWriter | None = None, recipe: dict | None = None,
             group: Group = SINGLE) -> QuantizedModel:
    """Calibrate ``src.model`` in place and return the quantized model; with ``sink`` each layer
    is written to the checkpoint as it is finished and the result is read back from it.
    ``recipe``: how it was made, as recorded (default: ``cfg`` as a dict). ``group``: the
    processes calibrating together (d2quant.distributed); each passes its own ``sink``."""
    return Calibrator(src, cfg, on_layer, sink, recipe, group).run(calib)
