"""D²Quant: GPTQ with dual-scale quantization (DSQ) and deviation-aware correction (DAC).

Pipeline: sources -> data -> pipeline (solver over grids, dac, rotation) -> qmodel -> evaluate.
This package knows no file format and no screen.
"""
