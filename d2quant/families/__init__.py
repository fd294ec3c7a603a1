"""Model families (d2quant.families.base): one class per decoder architecture, registered by the
transformers class names it serves."""

from d2quant.families import llama, gemma3, phi3  # noqa: F401,I001  (registers the families; llama first)
from d2quant.families.base import Family, Linear, families, family, family_of_hf, supported_hf_classes

__all__ = ["Family", "Linear", "families", "family", "family_of_hf", "supported_hf_classes"]
