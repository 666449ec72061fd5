"""The SD v1 inpainting model: published key layout, parity with diffusers' 9-channel UNet and inpainting
pipeline on tiny random weights, the inpaint script and its refusals."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import ldm.checkpoint
from tests.conftest import ROOT, load_reference_keys, load_script, randomize_, shape_string
from tests.diffusers_models import save_tiny_pipeline
from ldm.checkpoint import load_model_from_config, parameters_on_meta
from ldm.cli import run_cli
from ldm.generation.images import image_to_tensor, mask_to_tensor
from ldm.generation.sampling import generate_latents, make_sampler
from ldm.util import instantiate_from_config

SD_INPAINT_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inpainting-inference.yaml"
TINY_INPAINT_CONFIG = ROOT / "configs" / "tiny" / "tiny-inpainting-inference.yaml"
TINY_CONFIG = ROOT / "configs" / "tiny" / "tiny-inference.yaml"
INPAINT_DIFF = ROOT / "tests" / "data" / "sd-v1-inpainting-checkpoint-diff.tsv"


def published_inpainting_keys() -> dict[str, str]:
    """key -> shape of sd-v1-5-inpainting: SD v1's keys with the rows of the diff file replaced."""
    keys = {key: shape for key, (shape, _) in load_reference_keys().items()}
    for line in INPAINT_DIFF.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            keys[key] = shape
    return keys


def test_inpainting_config_builds_the_published_checkpoint_layout():
    with parameters_on_meta():
        model = instantiate_from_config(OmegaConf.load(SD_INPAINT_CONFIG).model)
    ours = {key: shape_string(t) for key, t in model.state_dict().items()}
    assert ours == published_inpainting_keys()


def test_the_published_config_target_name_resolves_to_the_inpainting_model():
    from ldm.models.diffusion import ddpm
    from ldm.models.diffusion.inpainting import LatentInpaintDiffusion
    assert ddpm.LatentInpaintDiffusion is LatentInpaintDiffusion


def test_an_inpainting_model_with_a_four_channel_unet_is_refused():
    config = OmegaConf.load(TINY_INPAINT_CONFIG)
    config.model.params.unet_config.params.in_channels = 4
    with pytest.raises(ValueError, match="must take 9 input channels"):
        instantiate_from_config(config.model)


@pytest.fixture(scope="module")
def inpaint_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inpaint-pipeline") / "tiny-inpaint"
    pipeline = save_tiny_pipeline(folder, unet_in_channels=9, inpainting=True)
    model = load_model_from_config(TINY_INPAINT_CONFIG, folder, verbose=False)
    return pipeline, model


def picture_and_mask(seed: int = 3) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(seed)
    picture = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 16, 40, 56))
    return picture, mask


def test_nine_channel_unet_matches_diffusers(inpaint_pipeline):
    pipeline, model = inpaint_pipeline
    generator = torch.Generator().manual_seed(4)
    x, concat = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 5, 8, 8, generator=generator)
    context, t = torch.randn(2, 77, 32, generator=generator), torch.tensor([3, 900])
    with torch.no_grad():
        ours = model.apply_model(x, t, {"c_concat": [concat], "c_crossattn": [context]})
        theirs = pipeline.unet(torch.cat([x, concat], dim=1), t, encoder_hidden_states=context).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_masked_image_conditioning_matches_diffusers_mask_and_masked_latents(inpaint_pipeline):
    pipeline, model = inpaint_pipeline
    picture, mask = picture_and_mask()
    ours = model.masked_image_conditioning(image_to_tensor(picture), mask_to_tensor(mask))  # (1, 5, 8, 8)
    image = pipeline.image_processor.preprocess(picture, height=64, width=64)
    mask_condition = pipeline.mask_processor.preprocess(mask, height=64, width=64)
    with torch.no_grad():
        masked = pipeline.vae.encode(image * (mask_condition < 0.5)).latent_dist.mode()
    their_mask = torch.nn.functional.interpolate(mask_condition, size=(8, 8))
    torch.testing.assert_close(ours[:, :1], their_mask)
    torch.testing.assert_close(ours[:, 1:], masked * pipeline.vae.config.scaling_factor, rtol=1e-4, atol=1e-4)


def test_guided_ddim_inpainting_matches_diffusers_pipeline(inpaint_pipeline):
    """The whole denoising loop: same start noise, text embeddings and masked-image latents, 3 DDIM steps
    with guidance 5 on both sides (diffusers on the model's own float32 schedule, see test_samplers)."""
    pipeline, model = inpaint_pipeline
    picture, mask = picture_and_mask()
    concat = model.masked_image_conditioning(image_to_tensor(picture), mask_to_tensor(mask))
    prompts = ["a red chair", "a red chair"]
    with torch.no_grad():
        text, empty = model.get_learned_conditioning(prompts), model.get_learned_conditioning([""] * 2)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = generate_latents(model, make_sampler("ddim", model), prompts, [0, 1], shape=(4, 8, 8), steps=3,
                            scale=5.0, x_T=x_T, concat=concat)
    pipeline.scheduler.alphas_cumprod = model.alphas_cumprod.clone()
    pipeline.scheduler.final_alpha_cumprod = model.alphas_cumprod[0].clone()
    theirs = pipeline(prompt_embeds=text, negative_prompt_embeds=empty, image=picture, mask_image=mask,
                      masked_image_latents=concat[:, 1:], latents=x_T.clone(), num_inference_steps=3,
                      guidance_scale=5.0, strength=1.0, height=64, width=64, output_type="latent").images
    assert (ours - x_T).abs().mean() > 0.01  # the steps moved the latents
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# ---- the script ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inpaint_files(tmp_path_factory):
    import safetensors.torch
    folder = tmp_path_factory.mktemp("inpaint-files")
    torch.manual_seed(0)
    model = randomize_(instantiate_from_config(OmegaConf.load(TINY_INPAINT_CONFIG).model))
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(folder / "inpaint.safetensors"))
    picture, mask = picture_and_mask()
    picture.save(folder / "picture.png")
    mask.save(folder / "mask.png")
    mask.resize((32, 64)).save(folder / "narrow-mask.png")
    return folder


def run_script(capsys, *args: str, script: str = "inpaint") -> tuple[int, str]:
    """The script's main in-process through run_cli, as its __main__ runs it: (exit status, stderr)."""
    status = 0
    try:
        run_cli(load_script(script).main, ["--device", "cpu", *args])
    except SystemExit as exited:
        status = exited.code
    return status, capsys.readouterr().err


def test_inpaint_script_writes_shared_and_plain_images_with_their_metadata(inpaint_files, tmp_path, capsys):
    from ldm.generation import read_png_metadata
    f = inpaint_files
    status, stderr = run_script(capsys, "--config", str(TINY_INPAINT_CONFIG), "--ckpt", str(f / "inpaint.safetensors"),
                         "--init-img", str(f / "picture.png"), "--mask", str(f / "mask.png"), "--ddim_steps", "2",
                         "--n_samples", "2", "--n_iter", "1", "--shared-attn", "all", "--compare",
                         "--outdir", str(tmp_path / "out"))
    assert status == 0, stderr
    samples = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert len(samples) == 4  # 2 without sharing, then the same 2 seeds with sharing
    metadata = [read_png_metadata(path) for path in samples]
    assert [m["mask_image"] for m in metadata] == ["mask.png"] * 4
    assert [m["shared_attention"] is not None for m in metadata] == [False, False, True, True]
    plain, shared = (np.asarray(Image.open(samples[i]), dtype=float) for i in (0, 2))
    assert np.abs(plain - shared).mean() > 0.5  # sharing changed the picture


@pytest.mark.parametrize("case, changes, message", [
    ("a text-to-image checkpoint", {"--ckpt": "{tiny_ckpt}"}, r"reads 4 input channels .* not an inpainting one"),
    ("a mask of another size", {"--mask": "{f}/narrow-mask.png"}, r"--mask .* is 32x64 but --init-img .* is 64x64"),
    ("no mask", {"--mask": None}, r"--mask is required"),
    ("a mask that is no picture", {"--mask": "{f}/inpaint.safetensors"}, r"--mask .* is not an image"),
    ("the demo model", {"--demo": ""}, r"--demo: the demo model .* cannot inpaint"),
])
def test_inpaint_refuses_bad_input_in_one_line_before_loading(case, changes, message, inpaint_files, tiny_ckpt,
                                                              tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ldm.checkpoint, "load_model_from_config", refuse_to_load)
    f = inpaint_files
    flags = {"--config": str(TINY_INPAINT_CONFIG), "--ckpt": str(f / "inpaint.safetensors"),
             "--init-img": str(f / "picture.png"), "--mask": str(f / "mask.png")}
    for flag, value in changes.items():
        flags[flag] = None if value is None else value.format(f=f, tiny_ckpt=tiny_ckpt)
    argv = [part for flag, value in flags.items() if value is not None for part in (flag, value) if part]
    status, stderr = run_script(capsys, *argv, "--outdir", str(tmp_path / "out"))
    assert status == 2, (case, stderr)
    assert stderr.startswith("error: ") and stderr.strip().count("\n") == 0, stderr
    assert re.search(message, stderr), stderr
    assert not (tmp_path / "out").exists()


def test_txt2img_refuses_an_inpainting_checkpoint_naming_the_inpaint_script(inpaint_files, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setattr(ldm.checkpoint, "load_model_from_config", refuse_to_load)
    status, stderr = run_script(capsys, "--config", str(TINY_CONFIG), "--ckpt",
                                str(inpaint_files / "inpaint.safetensors"), "--outdir", str(tmp_path / "out"),
                                script="txt2img")
    assert status == 2
    assert "it is an inpainting checkpoint: use scripts/inpaint.py" in stderr


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded, but this input can be refused before loading it")
