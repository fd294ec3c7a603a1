"""What `d2export gguf` makes, decided once and checked before any calibration.

The format's policy lives here, not in the CLI or the benchmarks: the preset names every tensor's
GGML block type; DSQ is calibrated in its dual-scale form (GGUF holds uniform levels only, the
column scale folds into up_proj); DAC is refused up front for a family whose llama.cpp
architectures cannot load its ffn biases (converters.gguf.arch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from converters.gguf.arch import DAC_FFN_BIASES, LAYOUTS
from converters.gguf.presets import DEFAULT_PRESET, PRESETS, preset_grids
from d2quant.errors import D2Error
from d2quant.grids.ggml import ggml_grid
from d2quant.pipeline import QuantConfig
from d2quant.qmodel import ModelSpec


@dataclass(frozen=True)
class GGUFTarget:
    preset: str | None = DEFAULT_PRESET  # None: a checkpoint is written with the types it holds
    force: bool = False  # also make what llama.cpp refuses to: unweighted rounding onto IQ types

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise D2Error(f"unknown --type {self.preset!r}; choose one of {', '.join(PRESETS)}")

    def quant_config(self, cfg: QuantConfig, spec: ModelSpec) -> QuantConfig:
        """``cfg`` made to land exactly on this target's grids for a model of ``spec``."""
        if self.preset is None:
            raise D2Error("calibrating for GGUF needs a --type preset")
        fam = spec.family
        if cfg.uses_dac and not any(DAC_FFN_BIASES <= LAYOUTS[a].optional for a in fam.gguf_archs):
            raise D2Error(f"llama.cpp's {' or '.join(fam.gguf_archs)} architecture cannot hold DAC's ffn "
                          f"biases; pass --no-dac to export {fam.name} to GGUF")
        if cfg.rotate:  # rotation unties a tied lm_head, so the preset must see the untied model
            spec = dataclasses.replace(spec, tie_embeddings=False)
        grids = preset_grids(self.preset, spec)
        needy = sorted({g["kind"].upper() for g in grids.values() if g and ggml_grid(g["kind"]).needs_imatrix})
        if cfg.method == "rtn" and needy and not self.force:
            raise D2Error(f"--method rtn rounds onto {', '.join(needy)} without any importance, which "
                          "llama.cpp refuses to make (it needs an imatrix); calibrate (--method gptq or "
                          "d2quant), or pass --force to make it anyway")
        return dataclasses.replace(cfg, dsq_form="dual", grids=grids)
