"""Tiny random diffusers / transformers models with the layout of configs/tiny (SD v1's blocks, small widths).

Used by the parity tests of the diffusers-folder loader, the inpainting model and the diffusers attention
processor: the same random weights live in a diffusers pipeline and, through this project's key mapping, in
this project's modules, so any difference in outputs is a difference in the code.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from tests.conftest import randomize_

UNET_PREFIX = "model.diffusion_model."
CONTROL_PREFIX = "control_model."

# configs/tiny: model_channels 32, channel_mult (1, 2, 2, 2), 2 res blocks, attention at the top 3 levels,
# 2 heads, context 32; VAE ch 32, ch_mult (1, 1, 2, 2), 1 res block; CLIP 32 wide, 2 layers, 2 heads.
UNET_KWARGS = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32)
VAE_KWARGS = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
    latent_channels=4, norm_num_groups=32, sample_size=64)
# The ControlNet of configs/tiny/tiny-controlnet.yaml: the tiny UNet's encoder, a 3-channel hint.
CONTROLNET_KWARGS = dict(
    in_channels=4, conditioning_channels=3, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), cross_attention_dim=32, attention_head_dim=2,
    norm_num_groups=32)
CLIP_KWARGS = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu")


def tiny_diffusers_pipeline(seed: int = 0, unet_in_channels: int = 4, inpainting: bool = False):
    """A StableDiffusionPipeline (or the inpainting one) with random weights and no tokenizer."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = randomize_(UNet2DConditionModel(**{**UNET_KWARGS, "in_channels": unet_in_channels}), seed)
    vae = randomize_(AutoencoderKL(**VAE_KWARGS), seed + 1)
    text_encoder = randomize_(CLIPTextModel(CLIPTextConfig(**CLIP_KWARGS)), seed + 2)
    # SD v1's schedule, as its scheduler_config.json gives it.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipeline = pipeline_class(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=scheduler,
                              safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_tiny_pipeline(folder: Path, **kwargs) -> "object":
    """Save a tiny random pipeline with `save_pretrained` (safetensors) into `folder`; returns the pipeline."""
    pipeline = tiny_diffusers_pipeline(**kwargs)
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    return pipeline


def diffusers_unet_from_ours(unet, tiny_config):
    """A diffusers UNet2DConditionModel holding our UNet's weights, converted by diffusers' own code."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    checkpoint = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    original = OmegaConf.to_container(tiny_config, resolve=True)
    config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    theirs = UNet2DConditionModel(**config)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return theirs.eval()


def diffusers_controlnet_from_ours(controlnet, **config):
    """A diffusers ControlNetModel holding our ControlNet's weights, converted from the published layout
    (`control_model.*`) by diffusers' own code; `config` overrides ControlNetModel arguments."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    theirs = ControlNetModel(**{**CONTROLNET_KWARGS, **config})
    checkpoint = {CONTROL_PREFIX + k: v for k, v in controlnet.state_dict().items()}
    theirs.load_state_dict(convert_controlnet_checkpoint(checkpoint, dict(theirs.config)), strict=True)
    return theirs.eval()


def tiny_diffusers_controlnet(seed: int = 0, **config):
    """A random ControlNetModel of the tiny layout (every weight non-zero, zero convolutions included)."""
    from diffusers import ControlNetModel
    torch.manual_seed(seed)
    return randomize_(ControlNetModel(**{**CONTROLNET_KWARGS, **config}), seed).eval()
