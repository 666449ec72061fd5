"""The generation core's Python API (ldm/generation/): requests, generate(), saving, model loading.

Runs on configs/tiny with random weights (written once per session), CPU, 2 DDIM steps. The images
generate() returns are checked against the lower-level sampling functions called directly, which the
samplers' own tests check against diffusers.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import InvalidValue
from ldm.generation import (GenerationRequest, LoadedModel, NonFiniteError, SharedAttentionSettings, check_output_folder,
                            decode_to_images, generate, generate_latents, img2img_latents, load_model, make_sampler,
                            read_model_spec, read_png_metadata, save_result)
from ldm.generation.generate import first_nonfinite_tensor
from ldm.generation.model import precision_used
from ldm.generation.sampling import encode_init_image
from tests.conftest import ROOT, TINY_CONFIG

# Full precision: these tests compare generate() with the sampling functions called directly in
# float32, and "autocast" computes in bfloat16 on CPUs that have it natively (test_precision.py).
FAST = dict(steps=2, scale=3.0, batch_size=2, precision="full")


@pytest.fixture(scope="module")
def model(tiny_ckpt) -> LoadedModel:
    return load_model(TINY_CONFIG, tiny_ckpt, device="cpu", verbose=False)


# ----------------------------------------------------------------------------- requests


def test_image_k_of_a_run_uses_seed_plus_k_and_fixed_code_restarts_each_iteration():
    plan = GenerationRequest(prompt="a chair", seed=10, batch_size=2, n_iter=2).batches()
    assert [b.seeds for b in plan] == [(10, 11), (12, 13)]
    fixed = GenerationRequest(prompt="a chair", seed=10, batch_size=2, n_iter=2, fixed_code=True).batches()
    assert [b.seeds for b in fixed] == [(10, 11), (10, 11)]


def test_a_prompt_per_image_fills_batches_and_the_last_may_be_shorter():
    plan = GenerationRequest(prompt=["a", "b", "c"], seed=0, batch_size=2).batches()
    assert [(b.prompts, b.seeds) for b in plan] == [(("a", "b"), (0, 1)), (("c",), (2,))]


@pytest.mark.parametrize("changes, field", [
    ({"eta": 1.5}, "eta"), ({"eta": math.nan}, "eta"), ({"scale": math.inf}, "scale"), ({"steps": 0}, "steps"),
    ({"seed": -1}, "seed"), ({"batch_size": 0}, "batch_size"), ({"sampler": "euler"}, "sampler"),
    ({"sampler": "plms", "eta": 0.5}, "eta"), ({"height": 0}, "height"), ({"compare": True}, "compare"),
    ({"precision": "half"}, "precision"), ({"prompt": []}, "prompt"),
    ({"sharing": SharedAttentionSettings(steps=(0.6, 0.9))}, "sharing.steps"),
])
def test_a_bad_request_is_an_invalid_value_naming_its_field(changes, field):
    with pytest.raises(InvalidValue) as error:
        GenerationRequest(**{"prompt": "a chair", **FAST, **changes})
    assert error.value.field == field and isinstance(error.value, ValueError)
    assert str(error.value).startswith(f"{field}=")


def test_an_img2img_step_window_is_read_on_the_whole_grid():
    """Strength 0.5 of 10 steps samples grid steps 5-9 (fractions 0.5-0.9): a window 0:0.5 selects none."""
    init = Image.new("RGB", (64, 64))
    with pytest.raises(InvalidValue, match=r"they start at fractions 0.5, 0.6, 0.7, 0.8, \.\.\. of the 10-step grid"):
        GenerationRequest(prompt="a chair", steps=10, init_image=init, strength=0.5,
                          sharing=SharedAttentionSettings(steps=(0.0, 0.5)))
    GenerationRequest(prompt="a chair", steps=10, init_image=init, strength=0.5,
                      sharing=SharedAttentionSettings(steps=(0.0, 0.6)))  # grid step 5 shares


def test_a_request_is_checked_against_the_config_before_any_weight_loads():
    spec = read_model_spec(TINY_CONFIG)
    assert (spec.geometry.channels, spec.geometry.factor, spec.geometry.pixel_multiple) == (4, 8, 64)
    with pytest.raises(InvalidValue, match="multiples of 64") as error:
        GenerationRequest(prompt="a chair", height=96).check_for(spec)
    assert error.value.field == "height"
    with pytest.raises(InvalidValue, match="valid names") as error:
        GenerationRequest(prompt="a chair", sharing=SharedAttentionSettings(groups=("up.128",))).check_for(spec)
    assert error.value.field == "sharing.groups"


@pytest.mark.parametrize("config, geometry", [
    ("configs/stable-diffusion/v1-inference.yaml", (4, 8, 64, 512)),  # its UNet's own image_size (32) is unused
    ("configs/demo/v2/demo-inference.yaml", (4, 4, 32, 64)),  # the demo model
    ("configs/demo/demo-inference.yaml", (4, 4, 32, 64)),  # v1
])
def test_the_latent_geometry_is_read_from_the_config(config, geometry):
    g = read_model_spec(ROOT / config).geometry
    assert (g.channels, g.factor, g.pixel_multiple, g.native_size) == geometry
    assert g.latent_shape(g.native_size, g.native_size) == (4, g.native_size // g.factor, g.native_size // g.factor)


def test_the_geometry_read_from_the_config_is_the_built_model_s(model):
    spec = read_model_spec(TINY_CONFIG)
    assert model.geometry == spec.geometry


# ----------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def compared(model):
    request = GenerationRequest(prompt="a red chair", seed=7, **FAST, sharing=SharedAttentionSettings(), compare=True)
    steps = []
    result = generate(model, request, progress=steps.append)
    return request, result, steps


def test_generate_gives_the_images_of_the_sampling_functions_called_directly(model, compared):
    _, result, _ = compared
    plain, shared = result.batches
    direct = generate_latents(model.module, make_sampler("ddim", model.module), ["a red chair"] * 2, [7, 8],
                              shape=(4, 8, 8), steps=2, scale=3.0)
    torch.testing.assert_close(torch.stack([s.latent for s in plain.images]), direct, rtol=0, atol=0)
    expected = decode_to_images(model.module, direct)
    assert all(np.array_equal(np.asarray(s.image), np.asarray(e)) for s, e in zip(plain.images, expected))
    assert all(np.asarray(a.image).std() > 10 for a in shared.images)  # pictures, not constant squares
    assert not np.array_equal(np.asarray(plain.images[0].image), np.asarray(shared.images[0].image))


def test_compare_gives_each_batch_without_and_with_sharing_from_the_same_seeds(compared):
    _, result, _ = compared
    assert [b.label for b in result.batches] == ["no sharing", "shared"]
    assert [[s.metadata["seed"] for s in b.images] for b in result.batches] == [[7, 8], [7, 8]]
    assert result.batches[0].images[0].metadata["shared_attention"] is None
    assert result.batches[1].images[0].metadata["shared_attention"]["groups"] == "all"
    grid = result.grid()
    assert grid.height == 2 * 64 and grid.width > 2 * 64  # two labelled rows


def test_metadata_records_what_reproduces_an_image(model, compared):
    _, result, _ = compared
    meta = result.batches[1].images[1].metadata
    assert (meta["prompt"], meta["seed"], meta["batch_seeds"], meta["batch_prompts"]) == \
        ("a red chair", 8, [7, 8], ["a red chair", "a red chair"])
    assert (meta["sampler"], meta["steps"], meta["scale"], meta["eta"]) == ("ddim", 2, 3.0, 0.0)
    assert (meta["H"], meta["W"], meta["C"], meta["f"]) == (64, 64, 4, 8)
    assert meta["precision"] == precision_used("full", torch.device("cpu")) == "float32"  # what ran
    assert meta["ckpt"] == "tiny.safetensors" and meta["ckpt_fingerprint"] == model.source["ckpt_fingerprint"]
    assert meta["ckpt_fingerprint"].startswith("sample-sha256:")


def test_progress_is_reported_after_every_step_of_every_batch(compared):
    _, _, steps = compared
    assert [(p.batch, p.step) for p in steps] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert {(p.batches, p.steps) for p in steps} == {(2, 2)}


def test_img2img_through_generate_matches_the_sampling_functions(model):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    request = GenerationRequest(prompt="a chair", seed=3, **FAST, init_image=init, init_image_name="init.png",
                                strength=1.0)
    result = generate(model, request)
    from ldm.generation import image_to_tensor
    latent = encode_init_image(model.module, image_to_tensor(init))
    direct = img2img_latents(model.module, make_sampler("ddim", model.module), latent, ["a chair"] * 2, [3, 4],
                             steps=2, strength=1.0, scale=3.0)
    torch.testing.assert_close(torch.stack([s.latent for s in result.samples]), direct, rtol=0, atol=0)
    meta = result.samples[0].metadata
    assert (meta["strength"], meta["encode_steps"], meta["init_image"]) == (1.0, 2, "init.png")


def test_non_finite_weights_are_named_instead_of_decoded(model):
    broken = LoadedModel.wrap(model.module)
    weight = model.module.model.diffusion_model.out[2].weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0, 0, 0] = math.inf
    try:
        assert first_nonfinite_tensor(model.module) == "model.diffusion_model.out.2.weight"
        with pytest.raises(NonFiniteError, match=r"tensor model\.diffusion_model\.out\.2\.weight holds NaN"):
            generate(broken, GenerationRequest(prompt="a chair", **FAST))
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert first_nonfinite_tensor(model.module) is None


# ----------------------------------------------------------------------------- saving


def test_saving_numbers_files_and_never_overwrites(compared, tmp_path):
    _, result, _ = compared
    first = save_result(result, tmp_path)
    second = save_result(result, tmp_path)
    assert [p.name for p in first] == ["00000.png", "00001.png", "00002.png", "00003.png", "grid-0000.png"]
    assert [p.name for p in second] == ["00004.png", "00005.png", "00006.png", "00007.png", "grid-0001.png"]
    assert read_png_metadata(first[3]) == result.samples[3].metadata
    assert read_png_metadata(first[-1])["first_seed"] == 7


def test_checking_the_output_folder_creates_nothing(tmp_path):
    check_output_folder(tmp_path / "new" / "deeper")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        check_output_folder(tmp_path / "file" / "out")


def test_a_request_is_a_value_that_can_be_varied(compared):
    request, _, _ = compared
    plain = replace(request, sharing=None, compare=False)
    assert plain.sharing is None and plain.seed == request.seed and request.compare
