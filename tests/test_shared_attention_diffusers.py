"""The diffusers attention processor shares attention exactly as this project's sampler does.

The same tiny random weights sit in a diffusers StableDiffusionPipeline and (through the folder loader) in
this project's model; guided DDIM from the same noise and text embeddings must give the same latents with
the same sharing settings, over modes, anchors, step windows, strengths and layer groups.
"""
from __future__ import annotations

import pytest
import torch

from ldm.checkpoint import load_model_from_config
from ldm.generation.sampling import generate_latents, make_sampler
from ldm.modules.shared_attention import SharedAttentionSettings
from ldm.modules.shared_attention_diffusers import DiffusersSharedAttention, diffusers_layer_tags
from tests.conftest import TINY_CONFIG
from tests.diffusers_models import save_tiny_pipeline

STEPS, SCALE = 3, 5.0


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared-pipeline") / "tiny-sd"
    pipeline = save_tiny_pipeline(folder)
    model = load_model_from_config(TINY_CONFIG, folder, verbose=False)
    # Both sides on the model's own float32 schedule (see tests/test_samplers.py).
    pipeline.scheduler.alphas_cumprod = model.alphas_cumprod.clone()
    pipeline.scheduler.final_alpha_cumprod = model.alphas_cumprod[0].clone()
    return pipeline, model


@pytest.fixture(scope="module")
def plain(both):
    """This project's latents without sharing, which every shared run must differ from."""
    pipeline, model = both
    ours, theirs = run_both(pipeline, model, None)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    return ours


def run_both(pipeline, model, settings, batch: int = 3, scale: float = SCALE):
    prompts = ["a red chair", "a blue lamp", "a green vase", "a table"][:batch]
    with torch.no_grad():
        text = model.get_learned_conditioning(prompts)
        empty = model.get_learned_conditioning([""] * batch)
    x_T = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    ours = generate_latents(model, make_sampler("ddim", model), prompts, list(range(batch)), shape=(4, 8, 8),
                            steps=STEPS, scale=scale, x_T=x_T, sharing=settings)
    kwargs = dict(prompt_embeds=text, negative_prompt_embeds=empty if scale != 1 else None, latents=x_T.clone(),
                  num_inference_steps=STEPS, guidance_scale=scale, height=64, width=64, output_type="latent")
    if settings is None:
        theirs = pipeline(**kwargs).images
    else:
        with DiffusersSharedAttention(pipeline, settings):
            theirs = pipeline(**kwargs).images
    return ours, theirs


def test_layers_get_this_projects_tags(both):
    pipeline, _ = both
    tags = list(diffusers_layer_tags(pipeline.unet).values())
    assert tags == ["down.64"] * 2 + ["down.32"] * 2 + ["down.16"] * 2 + ["up.16"] * 3 + ["up.32"] * 3 + \
        ["up.64"] * 3 + ["mid.8"]


@pytest.mark.parametrize("settings", [
    SharedAttentionSettings(),
    SharedAttentionSettings(groups=("up", "mid"), mode="anchor", anchors=1),
    SharedAttentionSettings(groups=("down.32", "16"), strength=-1.5),
    SharedAttentionSettings(mode="anchor", anchors=2, steps=(0.0, 0.5), strength=2.0),
    SharedAttentionSettings(groups=("up",), adain=True),
    SharedAttentionSettings(groups=("up",), mode="others"),
], ids=["all", "anchor-up-mid", "levels-weaker", "two-anchors-window-stronger", "adain-up", "others-up"])
def test_processor_gives_the_latents_of_this_projects_shared_sampler(both, plain, settings):
    pipeline, model = both
    ours, theirs = run_both(pipeline, model, settings)
    assert (ours - plain).abs().max() > 1e-3  # sharing changed the result, so the comparison means something
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_without_guidance_the_whole_batch_is_one_group(both):
    pipeline, model = both
    ours, theirs = run_both(pipeline, model, SharedAttentionSettings(mode="anchor"), scale=1.0)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_leaving_restores_the_pipelines_processors(both):
    pipeline, _ = both
    before = dict(pipeline.unet.attn_processors)
    with DiffusersSharedAttention(pipeline, SharedAttentionSettings(groups=("up",))):
        inside = pipeline.unet.attn_processors
        changed = [name for name in before if inside[name] is not before[name]]
        assert changed and all(".attn1." in name and name.startswith("up_blocks") for name in changed)
    assert all(pipeline.unet.attn_processors[name] is before[name] for name in before)


def test_an_unknown_group_is_refused_with_the_valid_names(both):
    pipeline, _ = both
    with pytest.raises(ValueError, match="unknown shared-attention group.*'up.128'.*valid names: all, down"):
        DiffusersSharedAttention(pipeline, SharedAttentionSettings(groups=("up.128",)))


@pytest.mark.parametrize("settings, field", [
    (SharedAttentionSettings(groups=("up",), subject=("chair",)), "subject"),
    (SharedAttentionSettings(groups=("up",), dropout=0.5), "dropout"),
    (SharedAttentionSettings(groups=("up",), mode="pooled"), "mode"),
], ids=["subject", "dropout", "pooled"])
def test_options_the_processor_does_not_offer_yet_are_refused_by_name(both, settings, field):
    from ldm.errors import InvalidValue
    pipeline, _ = both
    with pytest.raises(InvalidValue) as error:
        DiffusersSharedAttention(pipeline, settings)
    assert error.value.field == field
