"""The noise schedule comes from the config, never from the checkpoint file.

A float16 checkpoint (the demo's, and many SD v1.x files) holds the schedule buffers rounded; loading them
moved samples. The reference here is the schedule computed in float64 by numpy from the config's
linear_start / linear_end, independent of the model code.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import safetensors.torch
import torch

from ldm.checkpoint import load_model_from_config
from ldm.generation.model import DEMO_CKPT, DEMO_V1_CKPT
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
from ldm.util import instantiate_from_config
from tests.conftest import randomize_


@pytest.fixture(scope="module")
def tiny_state_dict(tiny_config) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_(instantiate_from_config(tiny_config.model))
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}


def reference_alphas_cumprod(config) -> np.ndarray:
    # SD v1's "linear" schedule is linear in sqrt(beta) (Rombach et al., the CompVis code).
    p = config.model.params
    betas = np.linspace(p.linear_start ** 0.5, p.linear_end ** 0.5, p.timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_a_float16_file_does_not_bring_a_rounded_schedule_and_needs_no_warning(tmp_path, tiny_config,
                                                                              tiny_state_dict):
    half = {k: v.half() if v.is_floating_point() else v for k, v in tiny_state_dict.items()}
    safetensors.torch.save_file(half, tmp_path / "fp16.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float16 rounding of the right schedule is not a mismatch
        model = load_model_from_config(tiny_config, tmp_path / "fp16.safetensors", verbose=False)
    for name in SCHEDULE_BUFFERS:
        assert getattr(model, name).dtype == torch.float32, name
        assert torch.equal(getattr(model, name), tiny_state_dict[name]), name
    one_minus = 1.0 - model.alphas_cumprod.double().numpy()
    reference = 1.0 - reference_alphas_cumprod(tiny_config)
    # float32 rounding of alpha_bar near 1 allows ~7e-5 relative error in 1 - alpha_bar; float16 gives 15%
    assert np.max(np.abs(one_minus / reference - 1.0)) < 1e-4
    assert abs(1.0 - half["alphas_cumprod"][0].double().item() / reference[0]) > 0.1


def test_a_file_with_another_schedule_is_a_warning_naming_the_keys(tmp_path, tiny_config, tiny_state_dict):
    other = dict(tiny_state_dict, betas=tiny_state_dict["betas"] * 1.5,
                 alphas_cumprod=tiny_state_dict["alphas_cumprod"] ** 1.5)
    safetensors.torch.save_file(other, tmp_path / "other.safetensors")
    with pytest.warns(UserWarning, match=r"noise schedule.*\(betas, alphas_cumprod\)"):
        model = load_model_from_config(tiny_config, tmp_path / "other.safetensors", verbose=False)
    assert torch.equal(model.betas, tiny_state_dict["betas"])  # the config's schedule is used


def test_plain_load_state_dict_also_keeps_the_computed_schedule(tiny_config, tiny_state_dict):
    model = instantiate_from_config(tiny_config.model)
    half = {k: v.half() if v.is_floating_point() else v for k, v in tiny_state_dict.items()}
    model.load_state_dict(half, strict=True)
    assert model.betas.dtype == torch.float32 and torch.equal(model.betas, tiny_state_dict["betas"])


@pytest.mark.parametrize("ckpt", [DEMO_CKPT, DEMO_V1_CKPT], ids=["demo", "v1"])
def test_the_demo_files_store_their_schedule_in_float32(ckpt):
    """The demo model (v2, written by train.py --dtype float16) and v1, which still ships."""
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in SCHEDULE_BUFFERS}
    assert set(dtypes.values()) == {"F32"}, dtypes
