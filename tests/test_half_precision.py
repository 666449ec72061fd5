"""A model cast to float16 or bfloat16 (`model.half()`, no autocast) runs from the Python API.

The reference is the same model in float32: the half-precision run must be finite and close to it.
Without autocast nothing widens the inputs, so GroupNorm (float32 statistics) must cast its weights,
the networks must take float32 inputs, and the noise schedule must stay float32.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.generation import GenerationRequest, generate
from ldm.generation.model import load_demo_model
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
from ldm.modules.diffusionmodules.util import GroupNorm32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_groupnorm_with_half_weights_computes_in_float32_and_returns_the_input_dtype(dtype):
    torch.manual_seed(0)
    norm = GroupNorm32(4, 16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 16, 5, 5) * 30 + 100  # large mean: half-precision statistics would lose it
    reference = norm(x)
    norm.to(dtype)
    out = norm(x.to(dtype))
    assert out.dtype == dtype
    expected = torch.nn.functional.group_norm(x.to(dtype).float(), 4, norm.weight.float(), norm.bias.float(),
                                              norm.eps)
    torch.testing.assert_close(out.float(), expected.to(dtype).float())
    assert (out.float() - reference).abs().max() < 0.05


@pytest.fixture(scope="module")
def float32_run():
    model = load_demo_model()
    request = GenerationRequest(prompt="a chair", batch_size=1, steps=2, precision="full")
    return request, generate(model, request).samples[0]


# Stated bounds from one measurement on the v1 demo model (4 steps: float16 latents within 0.022, bfloat16
# within 0.15 of a latent range of 8.4; mean pixel difference 0.05 and 0.48 of 255), with room for other
# step counts: 0.1 and 0.6 of that range of 8.4, written as fractions of the float32 latent's range so that
# they carry over to the demo model v2, whose latents span more (20.3 at this test's 2 steps, scale factor
# 0.27 against v1's 0.48). Measured on v2 at 2 steps: float16 0.034 (0.2% of the range), bfloat16 0.687
# (3.4%); mean pixel difference 0.13 and 2.04.
@pytest.mark.parametrize("dtype, latent_bound, pixel_bound", [(torch.float16, 0.1 / 8.4, 1.0),
                                                             (torch.bfloat16, 0.6 / 8.4, 3.0)])
def test_the_demo_model_runs_end_to_end_in_half_precision(float32_run, dtype, latent_bound, pixel_bound):
    request, reference = float32_run
    model = load_demo_model()
    model.module.to(dtype)
    assert model.module.model.diffusion_model.out[2].weight.dtype == dtype
    assert all(getattr(model.module, name).dtype == torch.float32 for name in SCHEDULE_BUFFERS)
    sample = generate(model, request).samples[0]  # NonFiniteError if anything overflowed
    assert torch.isfinite(sample.latent).all()
    assert sample.metadata["precision"] == str(dtype).removeprefix("torch.")  # what ran, not "float32"
    latent_range = float(reference.latent.max() - reference.latent.min())
    assert (sample.latent - reference.latent).abs().max() < latent_bound * latent_range
    pixels = np.abs(np.asarray(sample.image, dtype=float) - np.asarray(reference.image, dtype=float))
    assert pixels.mean() < pixel_bound


def test_the_schedule_keeps_its_float32_values_through_a_round_trip_in_bfloat16():
    model = load_demo_model().module
    before = model.alphas_cumprod.clone()
    model.to(torch.bfloat16).float()
    assert torch.equal(model.alphas_cumprod, before)  # bfloat16 would round alpha_bar_0 to 1
