"""The ControlNet and its residuals: parity with diffusers' ControlNetModel and UNet2DConditionModel on tiny
random weights (fed through both key layouts), and the per-call control of `ldm.modules.control`."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf

from ldm.checkpoint.controlnet import load_controlnet
from ldm.errors import InvalidValue
from ldm.modules.control import ControlRun, ControlUnit, control_residuals, guess_mode_scales
from ldm.modules.attention import PLAIN
from ldm.sharing import shared_attention
from ldm.util import instantiate_from_config
from tests.conftest import ROOT, randomize_
from tests.diffusers_models import (CONTROL_PREFIX, diffusers_controlnet_from_ours, diffusers_unet_from_ours,
                                    tiny_diffusers_controlnet)

TINY_CONTROLNET = ROOT / "configs" / "tiny" / "tiny-controlnet.yaml"
RESIDUALS = 13  # SD v1's layout, which the tiny models share: 12 skip connections and the middle block



def make_controlnet(seed: int = 3):
    torch.manual_seed(seed)
    return randomize_(instantiate_from_config(OmegaConf.load(TINY_CONTROLNET).model), seed).eval()


@pytest.fixture(scope="module")
def controlnet():
    return make_controlnet()


def inputs(batch: int = 2, seed: int = 1):
    """Latents (B, 4, 8, 8), timesteps (B,), text context (B, 77, 32) and hint images (B, 3, 64, 64) in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    t = torch.tensor([980, 421, 37, 600][:batch])
    context = torch.randn(batch, 77, 32, generator=generator)
    hint = torch.rand(batch, 3, 64, 64, generator=generator)
    return x, t, context, hint


def diffusers_residuals(theirs, x, t, context, hint, **kwargs) -> list[torch.Tensor]:
    with torch.no_grad():
        down, mid = theirs(x, t, context, controlnet_cond=hint, return_dict=False, **kwargs)
    return [*down, mid]


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).detach().norm() / theirs.detach().norm())


def assert_all_close(ours, theirs, tolerance: float = 1e-4):
    """Every residual equal up to float32 round-off, relative to its size (summation orders differ, and the
    random weights amplify differences through 13 blocks: 1e-5 at the middle block when only the order of a
    hint channel sum differs; a wrong weight or key gives errors of order 1)."""
    assert len(ours) == len(theirs) == RESIDUALS
    for index, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, index
        assert relative_error(a, b) < tolerance, index


def test_residuals_match_diffusers_controlnet_fed_the_same_weights(controlnet):
    x, t, context, hint = inputs()
    with torch.no_grad():
        ours = controlnet(x, hint, t, context)
    assert all(r.abs().mean() > 1e-2 for r in ours)  # random weights everywhere: real, non-trivial residuals
    assert_all_close(ours, diffusers_residuals(diffusers_controlnet_from_ours(controlnet), x, t, context, hint))


def test_unet_with_control_matches_diffusers_unet_given_the_same_residuals(tiny_unet, tiny_config, controlnet):
    theirs = diffusers_unet_from_ours(tiny_unet, tiny_config)
    x, t, context, hint = inputs()
    with torch.no_grad():
        residuals = controlnet(x, hint, t, context)
        ours = tiny_unet(x, t, context, control=residuals)
        reference = theirs(x, t, context, down_block_additional_residuals=residuals[:-1],
                           mid_block_additional_residual=residuals[-1]).sample
        plain = tiny_unet(x, t, context)
    assert relative_error(ours, reference) < 1e-5
    assert (ours - plain).abs().mean() > 1e-2  # the control changes the prediction


def test_zero_residuals_leave_the_unet_output_bit_identical(tiny_unet, controlnet):
    x, t, context, hint = inputs()
    with torch.no_grad():
        zeros = [torch.zeros_like(r) for r in controlnet(x, hint, t, context)]
        assert torch.equal(tiny_unet(x, t, context, control=zeros), tiny_unet(x, t, context))


def test_a_residual_list_of_the_wrong_length_is_refused(tiny_unet, controlnet):
    x, t, context, hint = inputs()
    with torch.no_grad():
        residuals = controlnet(x, hint, t, context)
        with pytest.raises(ValueError, match="holds 12 residuals; this UNet takes 13"):
            tiny_unet(x, t, context, control=residuals[1:])


def test_a_hint_of_another_size_than_the_image_is_refused(controlnet):
    x, t, context, hint = inputs()
    with pytest.raises(ValueError, match=r"expected \(2, 3, 64, 64\), the image size"):
        controlnet(x, hint[..., :56, :], t, context)


@pytest.mark.parametrize("layout", ["prefixed.pth", "bare.safetensors"])
def test_a_file_in_the_published_layout_loads_and_matches_diffusers(tmp_path, controlnet, layout):
    # Published files name every tensor control_model.*; some copies drop the prefix.
    state_dict = {k: v.contiguous() for k, v in controlnet.state_dict().items()}
    path = tmp_path / f"control-{layout}"
    if layout == "prefixed.pth":
        torch.save({CONTROL_PREFIX + k: v for k, v in state_dict.items()}, path)
    else:
        safetensors.torch.save_file(state_dict, str(path))
    loaded = load_controlnet(path, TINY_CONTROLNET)
    x, t, context, hint = inputs(seed=5)
    with torch.no_grad():
        ours = loaded(x, hint, t, context)
    assert_all_close(ours, diffusers_residuals(diffusers_controlnet_from_ours(controlnet), x, t, context, hint))


@pytest.mark.parametrize("config", [{}, {"global_pool_conditions": True},
                                    {"controlnet_conditioning_channel_order": "bgr"}],
                         ids=["plain", "global-pooling", "bgr"])
def test_a_diffusers_folder_loads_and_gives_diffusers_residuals(tmp_path, config):
    theirs = tiny_diffusers_controlnet(seed=4, **config)
    theirs.save_pretrained(str(tmp_path / "controlnet"))
    ours = load_controlnet(tmp_path / "controlnet", TINY_CONTROLNET)
    x, t, context, hint = inputs(seed=6)
    with torch.no_grad():
        residuals = ours(x, hint, t, context)
    assert_all_close(residuals, diffusers_residuals(theirs, x, t, context, hint))
    if config.get("global_pool_conditions"):
        assert all(r.shape[-2:] == (1, 1) for r in residuals)


def run_of(*units: ControlUnit) -> ControlRun:
    return ControlRun(units)


def test_control_scale_multiplies_every_residual_as_diffusers_conditioning_scale(controlnet):
    x, t, context, hint = inputs()
    ours = control_residuals(run_of(ControlUnit(controlnet, hint, scale=0.6)), x, t, context, halves=1, progress=0.3)
    theirs = diffusers_residuals(diffusers_controlnet_from_ours(controlnet), x, t, context, hint,
                                 conditioning_scale=0.6)
    assert_all_close(ours, theirs)


def test_guess_mode_controls_the_conditional_half_only_with_the_published_scales(controlnet):
    x, t, context, hint = inputs(batch=2)
    # A guided batch: [unconditional; conditional], the same latents and timesteps in both halves.
    x2, t2, context2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.randn_like(context), context])
    unit = ControlUnit(controlnet, hint, scale=0.8, guess_mode=True)
    ours = control_residuals(run_of(unit), x2, t2, context2, halves=2, progress=None)
    theirs = diffusers_controlnet_from_ours(controlnet)
    plain = diffusers_residuals(theirs, x, t, context, hint)
    factors = [0.8 * 0.825 ** (12 - i) for i in range(RESIDUALS)]  # the published per-residual scales
    assert guess_mode_scales(RESIDUALS, 0.8) == pytest.approx(factors)
    assert all(torch.equal(r[:2], torch.zeros_like(r[:2])) for r in ours)  # no control for the unconditional half
    assert_all_close([r[2:] for r in ours], [r * f for r, f in zip(plain, factors)])
    # diffusers' pipelines scale guess mode by 10 ** (-(12 - i) / 12) instead: within 0.6% of the published factors.
    logspace = diffusers_residuals(theirs, x, t, context, hint, conditioning_scale=0.8, guess_mode=True)
    assert_all_close([r[2:] for r in ours], logspace, tolerance=6e-3)


def test_several_controlnets_sum_as_diffusers_multi_controlnet(controlnet):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
    other = make_controlnet(seed=9)
    x, t, context, hint = inputs()
    other_hint = torch.rand_like(hint)
    run = run_of(ControlUnit(controlnet, hint, scale=0.7), ControlUnit(other, other_hint, scale=1.3))
    ours = control_residuals(run, x, t, context, halves=1, progress=0.5)
    multi = MultiControlNetModel([diffusers_controlnet_from_ours(controlnet), diffusers_controlnet_from_ours(other)])
    with torch.no_grad():
        down, mid = multi(x, t, context, controlnet_cond=[hint, other_hint], conditioning_scale=[0.7, 1.3],
                          return_dict=False)
    assert_all_close(ours, [*down, mid])


def test_one_hint_serves_every_image_and_per_image_hints_follow_their_images(controlnet):
    x, t, context, hints = inputs(batch=3)
    x2, t2, context2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([context.flip(0), context])
    per_image = control_residuals(run_of(ControlUnit(controlnet, hints)), x2, t2, context2, halves=2, progress=0.0)
    with torch.no_grad():
        expected = controlnet(x2, torch.cat([hints, hints]), t2, context2)  # image i reads hint i in both halves
        shared = control_residuals(run_of(ControlUnit(controlnet, hints[1:2])), x2, t2, context2, halves=2,
                                   progress=0.0)
        expected_shared = controlnet(x2, hints[1:2].expand(6, -1, -1, -1), t2, context2)
    assert_all_close(per_image, expected)
    assert_all_close(shared, expected_shared)


def test_the_step_window_switches_each_controlnet_on_and_off(controlnet):
    x, t, context, hint = inputs()
    early = ControlUnit(controlnet, hint, steps=(0.0, 0.5))
    late = ControlUnit(make_controlnet(seed=11), hint, steps=(0.5, 1.0))
    run = run_of(early, late)
    with torch.no_grad():
        assert_all_close(control_residuals(run, x, t, context, 1, progress=0.25), early.model(x, hint, t, context))
        assert_all_close(control_residuals(run, x, t, context, 1, progress=0.5), late.model(x, hint, t, context))
    assert control_residuals(run_of(early), x, t, context, 1, progress=0.5) is None  # the UNet then runs as without
    assert control_residuals(None, x, t, context, 1, progress=0.5) is None


def test_hints_that_cannot_serve_the_batch_are_refused_before_sampling(controlnet):
    _, _, _, hint = inputs(batch=2)
    run = run_of(ControlUnit(controlnet, hint))
    run.check_batch(2, (64, 64))
    with pytest.raises(InvalidValue, match=r"units\[0\]\.hints=2: give one control image for every image, or one "
                                           r"per image of the batch \(3\), not 2"):
        run.check_batch(3, (64, 64))
    with pytest.raises(InvalidValue, match=r"must have the images' size 64x32 \(width x height\), not 64x64"):
        run.check_batch(2, (32, 64))
    with pytest.raises(InvalidValue, match="step window 0.5:0.5"):
        ControlUnit(controlnet, hint, steps=(0.5, 0.5))
    with pytest.raises(InvalidValue, match="reads 3-channel hints"):
        ControlUnit(controlnet, hint[:, :1])
    with pytest.raises(InvalidValue, match="finite"):
        ControlUnit(controlnet, hint, scale=float("nan"))


def test_controlnet_attention_is_never_shared_and_its_residuals_ignore_sharing(tiny_unet, controlnet):
    assert all(layer.tag is None for block in controlnet.modules() if hasattr(block, "attn1")
               for layer in (block.attn1, block.attn2))
    x, t, context, hint = inputs(batch=3)
    with torch.no_grad():
        plain = controlnet(x, hint, t, context)
        with shared_attention(tiny_unet, groups="all"):
            assert all(block.attn1.processor is PLAIN for block in controlnet.modules() if hasattr(block, "attn1"))
            shared = controlnet(x, hint, t, context)
    assert all(torch.equal(a, b) for a, b in zip(plain, shared))
