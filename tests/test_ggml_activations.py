"""llama.cpp's activation rounding reproduced in torch (the parity reference of runtime_tests)."""

import numpy as np
import pytest
import torch

from runtime_tests import libggml
from d2quant.grids.ggml import ggml_types
from runtime_tests.ggml_activations import emulate_llamacpp, round_activations


def _outlier_rows(n_rows: int, n: int) -> np.ndarray:
    """Gaussian rows with a few massive channels, as LLM activations have."""
    x = np.random.default_rng(0).standard_normal((n_rows, n)).astype(np.float32)
    x[:, ::97] *= 300
    return x


def test_q8_0_rounding_is_libggml_bit_for_bit():
    x = _outlier_rows(8, 512)
    ours = round_activations(torch.from_numpy(x), "Q4_0").numpy()
    theirs = libggml.dequantize_rows("Q8_0", libggml.quantize_rows("Q8_0", x), 8, 512)
    assert np.array_equal(ours, theirs)


def test_q8_k_rounding_puts_the_peak_on_the_grid():
    x = torch.from_numpy(_outlier_rows(4, 512))
    y = round_activations(x, "Q3_K")
    xb, yb = x.reshape(4, 2, 256), y.reshape(4, 2, 256)
    peak_at = xb.abs().argmax(-1, keepdim=True)
    # the peak lands on code -127 with scale -max/127: back to max up to the float ops' rounding
    assert torch.allclose(yb.gather(-1, peak_at), xb.gather(-1, peak_at), rtol=1e-6, atol=0)
    step = xb.abs().amax(-1, keepdim=True) / 127
    assert ((yb - xb).abs() <= step / 2 * (1 + 1e-6)).all()
    assert not torch.equal(x, y)


@pytest.mark.parametrize("wtype", [*sorted(ggml_types()), "F16", "F32"])
def test_every_weight_type_rounds_a_row(wtype):
    x = torch.from_numpy(_outlier_rows(2, 256))
    y = round_activations(x, wtype)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.equal(y, x) == (wtype == "F32")


def test_emulation_hooks_are_removed():
    lin = torch.nn.Linear(256, 4, bias=False)
    model = torch.nn.Sequential()
    model.add_module("lm_head", lin)
    x = torch.from_numpy(_outlier_rows(3, 256))
    exact = model(x)
    with emulate_llamacpp(model, {"lm_head": "Q6_K"}):
        rounded = model(x)
    assert not torch.equal(exact, rounded)
    assert torch.equal(model(x), exact)
