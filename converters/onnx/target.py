"""What `d2export onnx` makes, validated once (before any calibration, and by the writer itself):
the MatMulNBits container a grid needs, the grids the calibration lands on (one width, or widths
chosen per matrix for a size) and the graph's options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from converters.allocation import SizeTarget, check_reachable, check_resident, choose
from converters.onnx.allocate import fixed_bytes, options
from converters.onnx.layouts import DSQ_LAYOUTS
from converters.onnx.packing import check_block_size, container_bits
from d2quant.errors import D2Error
from d2quant.pipeline import QuantConfig

DEFAULT_BITS = 4

ACCURACY_LEVELS = (0, 1, 2, 3, 4)
EMBED_MODES = ("float", "quantized")
ATTENTION_MODES = ("gqa", "ops")  # contrib GroupQueryAttention | standard ONNX ops


def check_grid(bits: int, block_size: int) -> None:
    """A uniform grid of ``bits`` and group ``block_size`` has a MatMulNBits form."""
    container_bits(bits)
    check_block_size(block_size)


@dataclass(frozen=True)
class ONNXTarget:
    """The grids of the decoder's matrices: ``bits`` for all, or chosen per matrix for ``size``."""

    bits: int | None = None  # None: DEFAULT_BITS, unless the size chooses
    block_size: int = 64
    embed_bits: int | None = None  # what --embed stores the table as (its bytes count in the size)
    size: SizeTarget = SizeTarget()

    def __post_init__(self):
        if self.bits is not None and self.size.active:
            raise D2Error("--bits and --target-bpw/--target-size each choose the matrices' widths; pass one of them")
        check_grid(self.bits or DEFAULT_BITS, self.block_size)

    @property
    def calibration_options(self) -> list[str]:
        """The options given that only a calibration can honour (a checkpoint keeps its widths)."""
        return (["--bits"] if self.bits is not None else []) + self.size.options

    @property
    def label(self) -> str:
        return self.size.label if self.size.active else f"w{self.bits or DEFAULT_BITS}g{self.block_size}"

    def _model_spec(self, cfg: QuantConfig, spec):
        """The model as the graph will hold it; a size out of reach is refused before any calibration."""
        if cfg.rotate:  # rotation unties a tied lm_head, which then is a matrix to choose for
            spec = dataclasses.replace(spec, tie_embeddings=False)
        if self.size.active:
            check_reachable(options(spec, self.block_size), self.size,
                            fixed_bytes(spec, self.block_size, self.embed_bits), spec.n_params)
        return spec

    def check(self, cfg: QuantConfig, src) -> None:
        """What can be refused once the model is loaded, before calibration tokens are made."""
        self._model_spec(cfg, src.spec)
        if self.size.active:
            check_resident(src)

    def quant_config(self, cfg: QuantConfig, src, tokens, on_allocation=None) -> QuantConfig:
        """``cfg`` made to land on this target's grids for the model ``src``."""
        cfg = dataclasses.replace(cfg, bits=self.bits or DEFAULT_BITS, group_size=self.block_size)
        if not self.size.active:
            return cfg
        spec = self._model_spec(cfg, src.spec)
        alloc = choose(src.model, tokens, options(spec, self.block_size), self.size,
                       fixed_bytes(spec, self.block_size, self.embed_bits), spec.n_params, on_allocation)
        # DSQ's dual form keeps down_proj on its chosen uniform grid (the column scale folds into up_proj)
        return dataclasses.replace(cfg, dsq_form="dual", grids=alloc.grids())


@dataclass(frozen=True)
class ONNXOptions:
    dsq_layout: str = "planes"  # how DSQ's residual-binary down_proj is carried (layouts.py)
    accuracy_level: int = 0  # MatMulNBits: 0 float activations (exact), 4 int8 activations (faster)
    embed: str = "float"  # float (Gather) | quantized (GatherBlockQuantized)
    attention: str = "gqa"

    def __post_init__(self):
        for name, value, allowed in (("--dsq-layout", self.dsq_layout, DSQ_LAYOUTS),
                                     ("--accuracy-level", self.accuracy_level, ACCURACY_LEVELS),
                                     ("embedding mode", self.embed, EMBED_MODES),
                                     ("--attention", self.attention, ATTENTION_MODES)):
            if value not in allowed:
                raise D2Error(f"unknown {name} {value!r}; choose one of {', '.join(map(str, allowed))}")
