"""What `d2export gguf` makes, decided once and checked before any calibration.

The format's policy lives here, not in the CLI or the benchmarks: a preset names every tensor's
GGML block type, or an allocation chooses them for a size (converters.gguf.allocate), or a saved
recipe gives them; DSQ is calibrated in its dual-scale form (GGUF holds uniform levels only, the
column scale folds into up_proj); DAC is refused up front for a family whose llama.cpp
architectures cannot load its ffn biases (converters.gguf.arch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from converters.allocation import SizeTarget, check_reachable, check_resident, choose
from converters.gguf.allocate import check_recipe_path, fixed_bytes, options, read_recipe
from converters.gguf.arch import DAC_FFN_BIASES, LAYOUTS
from converters.gguf.presets import PRESETS, preset_grids
from d2quant.errors import D2Error
from d2quant.grids.ggml import ggml_grid
from d2quant.pipeline import QuantConfig
from d2quant.qmodel import ModelSpec


@dataclass(frozen=True)
class GGUFTarget:
    preset: str | None = None  # a --type; None: the types come from below, or from a checkpoint
    force: bool = False  # also make what llama.cpp refuses to: unweighted rounding onto IQ types
    size: SizeTarget = SizeTarget()  # choose every matrix's type for this size (converters.allocation)
    recipe: str | None = None  # reapply the types of a saved recipe (a d2export GGUF or JSON)

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise D2Error(f"unknown --type {self.preset!r}; choose one of {', '.join(PRESETS)}")
        chosen = (["--type"] if self.preset is not None else []) + self.calibration_options
        if len(chosen) > 1:
            raise D2Error(f"{' and '.join(chosen)} each choose the tensor types; pass one of them")
        if self.recipe is not None:
            check_recipe_path(self.recipe)

    @property
    def calibration_options(self) -> list[str]:
        """The options given that only a calibration can honour (a checkpoint keeps its types; a
        --type is checked against them instead)."""
        return self.size.options + (["--recipe"] if self.recipe is not None else [])

    def _model_spec(self, cfg: QuantConfig, spec: ModelSpec) -> ModelSpec:
        """The model as the file will hold it; refuses what cannot be made (before any calibration)."""
        fam = spec.family
        if cfg.uses_dac and not any(DAC_FFN_BIASES <= LAYOUTS[a].optional for a in fam.gguf_archs):
            raise D2Error(f"llama.cpp's {' or '.join(fam.gguf_archs)} architecture cannot hold DAC's ffn "
                          f"biases; pass --no-dac to export {fam.name} to GGUF")
        if cfg.rotate:  # rotation unties a tied lm_head, so the types must be chosen for the untied model
            spec = dataclasses.replace(spec, tie_embeddings=False)
        if self.size.active:
            check_reachable(options(spec), self.size, fixed_bytes(spec), spec.n_params)
        return spec

    def check(self, cfg: QuantConfig, src) -> None:
        """What can be refused once the model is loaded, before calibration tokens are made."""
        self._model_spec(cfg, src.spec)
        if self.size.active:
            check_resident(src)
        if self.recipe is not None:  # another model's recipe is refused before the calibration text is made
            read_recipe(self.recipe, src.spec)

    def quant_config(self, cfg: QuantConfig, src, tokens: torch.Tensor | None,
                     on_allocation=None) -> QuantConfig:
        """``cfg`` made to land exactly on this target's grids for the model ``src``."""
        spec = self._model_spec(cfg, src.spec)
        if self.size.active:
            grids = choose(src.model, tokens, options(spec), self.size, fixed_bytes(spec), spec.n_params,
                           on_allocation).grids()
        elif self.recipe is not None:
            grids = read_recipe(self.recipe, spec)
        elif self.preset is not None:
            grids = preset_grids(self.preset, spec)
        else:
            raise D2Error("calibrating for GGUF needs --type, --target-bpw, --target-size or --recipe")
        needy = sorted({g["kind"].upper() for g in grids.values() if g and ggml_grid(g["kind"]).needs_imatrix})
        if cfg.method == "rtn" and needy and not self.force:
            raise D2Error(f"--method rtn rounds onto {', '.join(needy)} without any importance, which "
                          "llama.cpp refuses to make (it needs an imatrix); calibrate (--method gptq or "
                          "d2quant), or pass --force to make it anyway")
        return dataclasses.replace(cfg, dsq_form="dual", grids=grids)
