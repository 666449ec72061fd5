"""More images like this one (ldm/generation/reference.py, ldm/sharing/reference.py).

On configs/tiny with random weights, CPU, 3 DDIM steps. The specification: images made in a second
run with a first run's PNG as the reference equal the images made beside it in the first run (anchor
mode, the reference as the anchor); the record is made once and serves every batch; a PNG that cannot
be made again (another checkpoint, other settings, changed pixels, no metadata) is refused.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.errors import InvalidValue
from ldm.generation import GenerationRequest, LoadedModel, SharedAttentionSettings, generate, load_model, save_result
from tests.conftest import TINY_CONFIG

PROMPTS = ("a red chair", "a chair in a garden", "a chair on a beach")
SHARING = SharedAttentionSettings(groups=("all",), mode="anchor", anchors=1, strength=0.5)
# Full precision: the 1/255 agreement is a float32 property; on CPUs with native bfloat16, autocast
# rounds a batch of three and a batch of two differently (up to 4/255 measured on such a CPU).
FIRST = GenerationRequest(prompt=PROMPTS, seed=7, batch_size=3, steps=3, scale=3.0, sharing=SHARING, precision="full")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.fixture(scope="module")
def model(tiny_ckpt) -> LoadedModel:
    return load_model(TINY_CONFIG, tiny_ckpt, device="cpu", verbose=False)


@pytest.fixture(scope="module")
def first_run(model, tmp_path_factory):
    """The first run's images and its saved PNGs (image 0 is the anchor)."""
    result = generate(model, FIRST)
    folder = tmp_path_factory.mktemp("first")
    paths = save_result(result, folder, grid=False)
    return result.images, paths


def second_request(reference, **changes) -> GenerationRequest:
    """The first run's two non-anchor images again, in a run of their own beside `reference`."""
    values = dict(prompt=PROMPTS[1:], seed=8, batch_size=2, steps=3, scale=3.0, sharing=SHARING,
                  references=(str(reference),), precision="full")
    return GenerationRequest(**{**values, **changes})


def test_images_made_beside_a_reference_equal_those_made_beside_it_in_its_batch(model, first_run):
    images, paths = first_run
    extended = generate(model, second_request(paths[0])).images
    for new, original in zip(extended, images[1:]):
        assert max_difference(new, original) <= 1


def test_the_reference_changes_the_new_images(model, first_run):
    _, paths = first_run
    shared = generate(model, second_request(paths[0])).images
    alone = generate(model, replace(second_request(paths[0]), references=(), sharing=None)).images
    assert all(max_difference(a, b) > 8 for a, b in zip(shared, alone))


def test_the_record_made_once_serves_every_batch_as_a_fresh_one_would(model, first_run):
    _, paths = first_run
    two_batches = generate(model, second_request(paths[0], prompt="a chair", batch_size=1, n_iter=2)).images
    second_alone = generate(model, second_request(paths[0], prompt="a chair", batch_size=1, seed=9)).images
    assert np.array_equal(pixels(two_batches[1]), pixels(second_alone[0]))


def test_compare_shows_the_reproduced_reference_first(model, first_run):
    images, paths = first_run
    result = generate(model, second_request(paths[0], compare=True))
    assert [b.label for b in result.batches] == ["reference", "no sharing", "shared"]
    assert max_difference(result.batches[0].images[0].image, images[0]) <= 1


def rewritten(path, tmp_path, change_metadata=None, change_pixels=False):
    """A copy of a generated PNG with its metadata or pixels altered."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
        metadata = json.loads(opened.text["parameters"])
    if change_metadata:
        metadata.update(change_metadata)
    if change_pixels:
        array = np.asarray(image).copy()
        array[:4, :4] = 255 - array[:4, :4]
        image = Image.fromarray(array)
    info = PngInfo()
    info.add_text("parameters", json.dumps(metadata))
    target = tmp_path / "altered.png"
    image.save(target, pnginfo=info)
    return target


def test_a_png_from_another_checkpoint_is_refused(model, first_run, tmp_path):
    altered = rewritten(first_run[1][0], tmp_path, {"ckpt_fingerprint": "sample-sha256:0000"})
    with pytest.raises(InvalidValue, match="another checkpoint") as error:
        generate(model, second_request(altered))
    assert error.value.field == "references"


def test_a_run_with_other_settings_is_refused_naming_them(model, first_run):
    with pytest.raises(InvalidValue, match=r"steps 3 \(this run 4\)"):
        generate(model, second_request(first_run[1][0], steps=4))


def test_a_reference_that_is_not_made_again_pixel_for_pixel_is_refused(model, first_run, tmp_path):
    altered = rewritten(first_run[1][0], tmp_path, change_pixels=True)
    with pytest.raises(InvalidValue, match="differs from the file"):
        generate(model, second_request(altered))


def test_a_missing_file_or_partial_metadata_is_refused(model, first_run, tmp_path):
    with pytest.raises(InvalidValue, match="no such file"):
        generate(model, second_request(tmp_path / "missing.png"))
    with Image.open(first_run[1][0]) as opened:
        metadata = json.loads(opened.text["parameters"])
    del metadata["batch_seeds"]
    info = PngInfo()
    info.add_text("parameters", json.dumps(metadata))
    partial = tmp_path / "partial.png"
    Image.open(first_run[1][0]).convert("RGB").save(partial, pnginfo=info)
    with pytest.raises(InvalidValue, match="lacks batch_seeds"):
        generate(model, second_request(partial))


# ----------------------------------------------------------------------------- pictures (inversion)
def test_ddim_inversion_of_a_model_s_own_sample_samples_back_close_to_it(model):
    """Measured on this model: relative RMS error 0.060 at 25 steps, 0.031 at 50 (first order in the step)."""
    from ldm.generation import generate_latents, make_sampler
    from ldm.models.diffusion.ddim_inversion import invert
    from ldm.models.diffusion.guidance import ClassifierFreeGuidance
    module = model.module
    errors = []
    for steps in (25, 50):
        sampler = make_sampler("ddim", module)
        x0 = generate_latents(module, sampler, ["a red chair"], [3], shape=(4, 8, 8), steps=steps, scale=1.0)
        conditional = module.get_learned_conditioning(["a red chair"])
        trajectory = invert(sampler, x0, ClassifierFreeGuidance(module, conditional))
        back = sampler.decode(trajectory[-1], conditional, steps, verbose=False)
        errors.append(float((back - x0).pow(2).mean().sqrt() / x0.pow(2).mean().sqrt()))
    assert errors[0] < 0.08
    assert errors[1] < errors[0] / 1.5  # halving the step size about halves the error


def test_a_picture_without_metadata_is_inverted_and_anchors_the_new_images(model, first_run, tmp_path):
    picture = tmp_path / "photo.png"
    Image.open(first_run[1][0]).convert("RGB").resize((80, 72)).save(picture)  # another size: resized
    request = second_request(picture, reference_prompt="a red chair", compare=True)
    result = generate(model, request)
    (error,) = result.metadata["reference_inversion_errors"]
    assert math.isfinite(error) and error > 0  # reported; a random model at 3 steps inverts a foreign latent badly
    reference_row, alone, shared = result.batches
    assert reference_row.images[0].image.size == (64, 64)
    assert all(max_difference(a.image, b.image) > 8 for a, b in zip(alone.images, shared.images))


def test_a_reference_needs_anchor_mode_and_ddim():
    with pytest.raises(InvalidValue) as error:
        second_request("x.png", sharing=replace(SHARING, mode="all"))
    assert error.value.field == "sharing.mode"
    with pytest.raises(InvalidValue) as error:
        second_request("x.png", sampler="plms")
    assert error.value.field == "sampler"



# ----------------------------------------------------------------------------- the cache
def test_recording_again_for_every_batch_gives_the_images_of_the_record_made_once(model, first_run):
    _, paths = first_run
    cached = generate(model, second_request(paths[0], n_iter=2)).images
    recomputed = generate(model, second_request(paths[0], n_iter=2, reference_cache=False)).images
    assert len(cached) == 4
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(cached, recomputed))


# ----------------------------------------------------------------------------- with every sharing option
# Subject masks, dropout and AdaIN keep their batch meaning beside recorded anchors, and each is exact:
# - subject words: an anchor's mask comes from its own cross-attention alone, recorded with it;
# - dropout: the draw is the one a batch [anchor; new images] makes, seeded by the anchor's seed (the
#   first image of the first run's batch), and the second run has as many new images as the first had
#   non-anchors, so the same tokens of the anchor are dropped;
# - AdaIN: the group's first image is the anchor, whose query and key statistics are recorded.
# Only floating-point rounding differs (the anchor's keys come from a batch of another size), hence 1/255.
@pytest.mark.parametrize("option", [{"subjects": (("chair",),)}, {"dropout": 0.5}, {"adain": True},
                                    {"subjects": (("chair",),), "dropout": 0.25, "adain": True}],
                         ids=["subject", "dropout", "adain", "all three"])
def test_a_set_extended_with_an_option_equals_the_images_made_beside_the_reference(model, first_run, tmp_path,
                                                                                   option):
    sharing = replace(SHARING, **option)
    first = generate(model, replace(FIRST, sharing=sharing))
    paths = save_result(first, tmp_path, grid=False)
    extended = generate(model, second_request(paths[0], sharing=sharing)).images
    without_option = first_run[0][1:]  # the same seeds made beside the same anchor, the option off
    for new, original, without in zip(extended, first.images[1:], without_option):
        assert max_difference(new, original) <= 1
        assert max_difference(new, without) > 1  # the option does change them


TWO_SUBJECT_PROMPTS = ("a red chair and a lamp", "a chair and a blue lamp", "a lamp and a chair")


@pytest.mark.parametrize("option", [{}, {"dropout": 0.25}], ids=["isolated", "isolated with dropout"])
def test_a_set_extended_with_isolated_subjects_equals_the_images_made_beside_the_reference(model, tmp_path, option):
    """Each anchor offers each of its subjects' tokens to that subject's queries only, as in the batch."""
    sharing = replace(SHARING, subjects=(("chair",), ("lamp",)), subject_sharing="isolated", **option)
    first = generate(model, replace(FIRST, prompt=TWO_SUBJECT_PROMPTS, sharing=sharing))
    paths = save_result(first, tmp_path, grid=False)
    extended = generate(model, second_request(paths[0], prompt=TWO_SUBJECT_PROMPTS[1:], sharing=sharing)).images
    pooled = generate(model, second_request(paths[0], prompt=TWO_SUBJECT_PROMPTS[1:],
                                            sharing=replace(sharing, subject_sharing="pooled"))).images
    for new, original, other in zip(extended, first.images[1:], pooled):
        assert max_difference(new, original) <= 1
        assert max_difference(new, other) > 1  # isolation does change them


def test_a_reference_whose_prompt_does_not_name_the_subject_is_refused(model, first_run):
    with pytest.raises(InvalidValue, match="contains none of the subject words") as error:
        generate(model, second_request(first_run[1][0], prompt=("a chair lamp", "a lamp"),
                                       sharing=replace(SHARING, subjects=(("lamp",),))))
    assert error.value.field == "references"


def test_a_picture_is_given_subject_masks_from_its_prompt_which_must_name_the_subject(model, first_run, tmp_path):
    picture = tmp_path / "photo.png"
    Image.open(first_run[1][0]).convert("RGB").save(picture)
    sharing = replace(SHARING, subjects=(("chair",),))
    with pytest.raises(InvalidValue, match="contains none of the subject words") as error:
        generate(model, second_request(picture, reference_prompt="a red thing", sharing=sharing))
    assert error.value.field == "reference_prompt"
    masked = generate(model, second_request(picture, reference_prompt="a red chair", sharing=sharing)).images
    whole = generate(model, second_request(picture, reference_prompt="a red chair")).images
    assert all(max_difference(a, b) > 1 for a, b in zip(masked, whole))


# ----------------------------------------------------------------------------- img2img beside a reference
# An img2img run starts part way down the grid (strength 0.6 of 5 steps: at grid step 2). Beside a
# reference, its images are those of a batch in which the reference runs its own whole trajectory and the
# new images join it at grid step 2, from their noised init latents: at every step they see the
# reference's keys at the same noise level. The step window (0:0.7) is read on the whole grid, so the
# run's last step (grid step 4, progress 0.8) shares nothing; counted from the img2img run's own first
# step it would share at all three.
IMG2IMG_SHARING = replace(SHARING, steps=(0.0, 0.7))


@pytest.fixture(scope="module")
def five_step_run(model, tmp_path_factory):
    result = generate(model, replace(FIRST, steps=5, sharing=IMG2IMG_SHARING))
    return result.images, save_result(result, tmp_path_factory.mktemp("five"), grid=False)


def img2img_request(reference, init, **changes) -> GenerationRequest:
    values = dict(prompt=PROMPTS[1:], seed=8, batch_size=2, steps=5, scale=3.0, sharing=IMG2IMG_SHARING,
                  references=(str(reference),), precision="full", init_image=init, strength=0.6)
    return GenerationRequest(**{**values, **changes})


def joined_batch_images(model, init) -> list[Image.Image]:
    """The naive construction: [reference, new images] in one anchor-mode batch, the reference's row
    started from its seed's noise and run 2 steps, then the noised init latents joined beside it."""
    from ldm.generation.images import image_to_tensor
    from ldm.generation.sampling import (conditionings, decode_to_images, encode_init_image, seeded_generators,
                                         sharing_scope)
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.models.diffusion.sampling_util import draw_noise
    module, seeds = model.module, [7, 8, 9]
    with torch.no_grad():
        sampler = DDIMSampler(module)
        conditional, unconditional = conditionings(module, PROMPTS, "", 3.0)
        guidance = dict(unconditional_guidance_scale=3.0, unconditional_conditioning=unconditional, verbose=False)
        x_T = draw_noise((3, 4, 8, 8), seeded_generators(seeds), module.device)  # (B, C, h, w)
        with sharing_scope(module, IMG2IMG_SHARING, PROMPTS, seeds):
            _, intermediates = sampler.sample(5, 3, (4, 8, 8), conditioning=conditional, x_T=x_T, log_every_t=1,
                                              **guidance)
        reference_after_two = intermediates["x_inter"][2][:1]  # (1, C, h, w)
        x0 = encode_init_image(module, image_to_tensor(init)).expand(2, -1, -1, -1)
        noise = draw_noise(tuple(x0.shape), seeded_generators(seeds[1:]), module.device)
        joined = torch.cat([reference_after_two, sampler.stochastic_encode(x0, 3, noise=noise)])
        with sharing_scope(module, IMG2IMG_SHARING, PROMPTS, seeds):
            latents = sampler.decode(joined, conditional, 3, **guidance)
    return decode_to_images(module, latents)


def test_img2img_beside_a_reference_equals_its_images_in_a_batch_the_reference_runs_through(model, five_step_run):
    images, paths = five_step_run
    init = images[2]
    expected = joined_batch_images(model, init)
    assert max_difference(expected[0], images[0]) <= 1  # the construction's reference is the PNG's image
    extended = generate(model, img2img_request(paths[0], init)).images
    assert len(extended) == 2
    for new, wanted in zip(extended, expected[1:]):
        assert max_difference(new, wanted) <= 1
    alone = generate(model, img2img_request(paths[0], init, references=(), sharing=None)).images
    assert all(max_difference(a, b) > 8 for a, b in zip(extended, alone))


def test_a_reference_for_another_image_size_or_an_inpainting_run_is_refused(model, five_step_run):
    images, paths = five_step_run
    with pytest.raises(InvalidValue, match=r"H 64 \(this run 128\)"):
        generate(model, img2img_request(paths[0], images[2].resize((128, 128))))
    with pytest.raises(InvalidValue, match="an inpainting run cannot take one") as error:
        img2img_request(paths[0], images[2], mask_image=Image.new("L", (64, 64), 255))
    assert error.value.field == "mask_image"


# ----------------------------------------------------------------------------- the scripts
@pytest.fixture(scope="module")
def run_txt2img(tiny_ckpt, tmp_path_factory):
    from tests.conftest import load_script
    script = load_script("txt2img")

    def run(*args: str, outdir=None) -> list:
        outdir = outdir or tmp_path_factory.mktemp("txt2img")
        return script.main(["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--device", "cpu",
                            "--precision", "full", "--ddim_steps", "3", "--scale", "3", "--H", "64", "--W", "64",
                            "--n_iter", "1", "--skip_grid", "--outdir", str(outdir), *args])
    return run


def test_txt2img_extends_a_set_from_one_of_its_pngs(run_txt2img):
    sharing = ["--shared-attn", "all", "--shared-attn-mode", "anchor"]
    first = run_txt2img("--prompt", "a red chair", "--n_samples", "3", "--seed", "7", *sharing)
    more = run_txt2img("--prompt", "a red chair", "--n_samples", "2", "--seed", "8", *sharing,
                       "--shared-attn-reference", str(first[0]))
    for new, original in zip(more, first[1:]):
        assert max_difference(Image.open(new).convert("RGB"), Image.open(original).convert("RGB")) <= 1


def test_img2img_extends_a_set_from_a_txt2img_png(run_txt2img, model, tiny_ckpt, tmp_path):
    from tests.conftest import load_script
    sharing = ["--shared-attn", "all", "--shared-attn-mode", "anchor"]
    first = run_txt2img("--prompt", "a red chair", "--n_samples", "3", "--seed", "7", *sharing)
    more = load_script("img2img").main([
        "--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--device", "cpu", "--precision", "full",
        "--ddim_steps", "3", "--scale", "3", "--n_iter", "1", "--skip_grid", "--outdir", str(tmp_path),
        "--init-img", str(first[2]), "--strength", "0.7", "--prompt", "a chair on a beach", "--n_samples", "2",
        "--seed", "8", *sharing, "--shared-attn-reference", str(first[0])])
    with Image.open(first[2]) as init:
        wanted = generate(model, GenerationRequest(
            prompt="a chair on a beach", seed=8, batch_size=2, steps=3, scale=3.0, precision="full",
            sharing=SharedAttentionSettings(groups=("all",), mode="anchor"), references=(str(first[0]),),
            init_image=init.convert("RGB"), strength=0.7)).images
    assert len(more) == 2
    for path, image in zip(more, wanted):
        with Image.open(path) as written:
            assert json.loads(written.text["parameters"])["references"] == [first[0].name]
            assert max_difference(written.convert("RGB"), image) == 0


def test_txt2img_refuses_a_mismatched_reference_in_one_line_before_loading(run_txt2img, tmp_path, monkeypatch):
    import ldm.checkpoint
    from ldm.cli import error_line, GENERATION_FLAGS
    first = run_txt2img("--prompt", "a red chair", "--n_samples", "1", "--shared-attn", "all")
    monkeypatch.setattr(ldm.checkpoint, "load_model_from_config", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(InvalidValue) as error:
        run_txt2img("--prompt", "a chair", "--n_samples", "1", "--ddim_steps", "4", "--shared-attn", "all",
                    "--shared-attn-mode", "anchor", "--shared-attn-reference", str(first[0]), outdir=tmp_path / "out")
    line = error_line(error.value, GENERATION_FLAGS)
    assert line.startswith(f"error: --shared-attn-reference {first[0]}: was made with other settings: steps 3")
    assert not (tmp_path / "out").exists()


def test_the_record_size_computed_from_shapes_is_what_the_recorder_keeps(model, first_run):
    from ldm.generation.reference import read_reference, record_reference_anchors
    from ldm.sharing.reference import record_bytes
    settings = replace(SHARING, groups=("up",), steps=(0.0, 0.7))
    anchors, _, _ = record_reference_anchors(model.module, [read_reference(first_run[1][0])], settings)
    unet = model.module.model.diffusion_model
    assert anchors.nbytes == record_bytes(unet, settings, 64, steps=3, halves=2, anchors=1, bytes_per_value=4)
