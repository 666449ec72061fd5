"""The diffusers attention processor shares attention exactly as this project's sampler does.

The same tiny random weights sit in a diffusers StableDiffusionPipeline and (through the folder loader) in
this project's model; guided DDIM from the same noise and text embeddings must give the same latents with
the same sharing settings, over modes, anchors, step windows, strengths, layer groups, subject masks,
dropout and pooling.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from ldm.checkpoint import load_model_from_config
from ldm.generation.sampling import generate_latents, make_sampler
from ldm.sharing import SharedAttentionSettings, subject_positions_for
from ldm.sharing.diffusers_processors import DiffusersSharedAttention, diffusers_layer_tags, token_grid
from tests.conftest import TINY_CONFIG
from tests.diffusers_models import save_tiny_pipeline
from tests.test_text_encoder import write_hub_vocab_files

STEPS, SCALE = 3, 5.0
# The two pipelines differ without any sharing: diffusers computes the timestep embedding in float32
# whatever the weights' dtype, so even run in float64 their plain latents differ by 2e-5 after 3 steps.
# Sharing passes that on, and mode "others" (a query sees only the other images) amplifies it most:
# 8e-5 in float64, 1.3e-4 in float32 on an AMD EPYC CPU (1e-4 passed on the Intel CPU these tests were
# first run on). The tolerance is set above that; every shared run also differs from the plain one by
# more than 1e-3, so a processor that shared wrongly would not pass.
TOLERANCE = dict(rtol=1e-4, atol=2e-4)


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
    torch.testing.assert_close(theirs, ours, **TOLERANCE)
    return ours


PROMPTS = ["a red chair", "a blue lamp", "a green vase", "a table"]


def run_both(pipeline, model, settings, batch: int = 3, scale: float = SCALE, width: int = 8, prompts=PROMPTS):
    """(ours, theirs): guided DDIM latents (B, 4, 8, width) from the same noise, this project's sampler and
    the pipeline, both sharing with `settings` (None: plain)."""
    prompts = prompts[:batch]
    with torch.no_grad():
        text = model.get_learned_conditioning(prompts)
        empty = model.get_learned_conditioning([""] * batch)
    x_T = torch.randn(batch, 4, 8, width, generator=torch.Generator().manual_seed(7))
    ours = generate_latents(model, make_sampler("ddim", model), prompts, list(range(batch)), shape=(4, 8, width),
                            steps=STEPS, scale=scale, x_T=x_T, sharing=settings)
    kwargs = dict(prompt_embeds=text, negative_prompt_embeds=empty if scale != 1 else None, latents=x_T.clone(),
                  num_inference_steps=STEPS, guidance_scale=scale, height=64, width=8 * width,
                  output_type="latent")
    if settings is None:
        theirs = pipeline(**kwargs).images
    else:
        # The subject's positions as this project's sampler finds them (its tokenizer; the tiny pipeline
        # has none); the dropout seed is the batch's first seed, as the sampler's.
        positions = subject_positions_for(model, prompts, settings.subjects) if settings.subjects else None
        with DiffusersSharedAttention(pipeline, settings, subject_positions=positions, seed=0):
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
    SharedAttentionSettings(groups=("up",), subjects=(("chair", "lamp", "vase"),)),
    SharedAttentionSettings(groups=("up", "mid"), subjects=(("chair", "lamp", "vase"),), mode="anchor", anchors=1),
    SharedAttentionSettings(groups=("up",), dropout=0.5),
    SharedAttentionSettings(mode="pooled"),
    SharedAttentionSettings(groups=("up",), mode="pooled", subjects=(("chair", "lamp", "vase"),), dropout=0.25),
], ids=["all", "anchor-up-mid", "levels-weaker", "two-anchors-window-stronger", "adain-up", "others-up",
        "subject-up", "subject-anchor", "dropout-up", "pooled-all", "pooled-subject-dropout"])
def test_processor_gives_the_latents_of_this_projects_shared_sampler(both, plain, settings):
    pipeline, model = both
    ours, theirs = run_both(pipeline, model, settings)
    assert (ours - plain).abs().max() > 1e-3  # sharing changed the result, so the comparison means something
    torch.testing.assert_close(theirs, ours, **TOLERANCE)


@pytest.mark.parametrize("settings", [
    SharedAttentionSettings(groups=("up",), subjects="chair;lamp", subject_sharing="isolated"),
    SharedAttentionSettings(groups=("up",), subjects="chair;lamp", subject_sharing="isolated", adain=True, dropout=0.25),
    SharedAttentionSettings(groups=("up",), subjects="chair;lamp", mode="anchor"),
], ids=["isolated", "isolated-adain-dropout", "pooled-anchor"])
def test_several_subjects_give_the_latents_of_this_projects_sampler(both, settings):
    pipeline, model = both
    prompts = ["a red chair and a lamp", "a lamp and a blue chair", "a chair and a green lamp"]
    plain, _ = run_both(pipeline, model, None, prompts=prompts)
    ours, theirs = run_both(pipeline, model, settings, prompts=prompts)
    assert (ours - plain).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, **TOLERANCE)


def test_pooling_and_masks_use_each_layers_grid_on_wide_latents(both):
    """8x16 latents: every level's token grid is twice as wide as high, so a grid read the wrong way
    round would pool other tokens together and put the masks elsewhere."""
    pipeline, model = both
    settings = SharedAttentionSettings(groups=("up",), mode="pooled", subjects=(("chair", "lamp", "vase"),))
    plain_ours, plain_theirs = run_both(pipeline, model, None, width=16)
    torch.testing.assert_close(plain_theirs, plain_ours, **TOLERANCE)
    ours, theirs = run_both(pipeline, model, settings, width=16)
    assert (ours - plain_ours).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, **TOLERANCE)


def test_without_guidance_the_whole_batch_is_one_group(both):
    pipeline, model = both
    ours, theirs = run_both(pipeline, model, SharedAttentionSettings(mode="anchor"), scale=1.0)
    torch.testing.assert_close(theirs, ours, **TOLERANCE)


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


def test_subject_positions_come_from_the_pipelines_tokenizer_as_from_this_projects(both, tmp_path):
    """With `prompts`, the positions are read with the pipeline's (transformers) tokenizer; they must be
    the ones this project's tokenizer gives, start token counted."""
    pipeline, model = both
    tokenizer = transformers.CLIPTokenizer(str(write_hub_vocab_files(tmp_path) / "vocab.json"),
                                           str(tmp_path / "merges.txt"))
    prompts = ["a red striped armchair", "an armchair in a green room, armchair", "a chair"]
    words = ("armchair", "chair")
    settings = SharedAttentionSettings(groups=("up",), subjects=(tuple(words),))
    controller = DiffusersSharedAttention(SimpleNamespace(unet=pipeline.unet, tokenizer=tokenizer), settings,
                                          prompts=prompts)
    assert controller.subject_positions == subject_positions_for(model, prompts, [words])
    (positions,) = controller.subject_positions  # one subject: its positions in each prompt
    assert positions[1] == (2, 8) and positions[2] == (2,)


def test_subject_words_without_prompts_or_tokenizer_are_refused(both):
    pipeline, _ = both  # the tiny pipeline has no tokenizer
    settings = SharedAttentionSettings(groups=("up",), subjects=(("chair",),))
    with pytest.raises(ValueError, match="subject's token positions.*pass the prompts"):
        DiffusersSharedAttention(pipeline, settings)
    with pytest.raises(ValueError, match="subject's token positions"):
        DiffusersSharedAttention(pipeline, settings, prompts=["a chair"])


def test_subject_reading_leaves_cross_attention_outputs_unchanged(both):
    """The attn2 readers return their layer's own output: with subject words but sharing switched off
    (strength -inf), the latents are those of the plain pipeline, bit for bit."""
    pipeline, model = both
    _, plain_theirs = run_both(pipeline, model, None)
    settings = SharedAttentionSettings(groups=("up",), subjects=(("chair", "lamp", "vase"),), strength=-float("inf"))
    _, theirs = run_both(pipeline, model, settings)
    assert torch.equal(theirs, plain_theirs)


@pytest.mark.parametrize("tag, latents, tokens, grid", [
    ("down.64", (8, 8), 64, (8, 8)), ("up.32", (8, 6), 12, (4, 3)), ("mid.8", (64, 64), 64, (8, 8)),
    ("down.16", (9, 7), 6, (3, 2)),
])
def test_a_levels_token_grid_halves_the_latent_grid_rounding_up(tag, latents, tokens, grid):
    assert token_grid(tag, latents, tokens) == grid


def test_a_token_count_off_the_levels_grid_is_refused():
    with pytest.raises(ValueError, match="up.32 has 16 tokens, which is not the 4x3 grid"):
        token_grid("up.32", (8, 6), 16)
