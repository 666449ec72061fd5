"""The model's files, checked before the (slow) checkpoint load: the config, the checkpoint, and that
they fit each other and the task.

Messages name the files as the user gave them and the settings as `{config}`, `{ckpt}`, ... (see
`ldm.errors.SettingsError`), which a front end writes as its own names (`--config`, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ldm.errors import InvalidValue, SettingsError
from ldm.generation.model import REPO_ROOT, ModelSpec, read_model_spec
from ldm.generation.builder.values import SD_CKPT

INPAINTING_CONFIG = "configs/stable-diffusion/v1-inpainting-inference.yaml"


@dataclass(frozen=True)
class CheckedModel:
    """A config read and checked, and a checkpoint that exists and is one (file or diffusers folder)."""

    spec: ModelSpec
    ckpt: Path


def resolve_path(path: str) -> Path:
    """Relative paths are tried from the working directory, then from the repository root."""
    candidate = Path(path)
    if candidate.exists() or candidate.is_absolute():
        return candidate
    in_repo = REPO_ROOT / candidate
    return in_repo if in_repo.exists() else candidate


def read_config(config: str, channels: Optional[int] = None, factor: Optional[int] = None) -> ModelSpec:
    """The config read and checked (YAML, entries, UNet layout); an expected latent channel count or
    autoencoder factor, when given, must be the config's."""
    spec = read_model_spec(resolve_path(config))
    geometry = spec.geometry
    for name, value, actual, where in (("channels", channels, geometry.channels, "embed_dim"),
                                       ("factor", factor, geometry.factor, "2 ** (len(ch_mult) - 1)")):
        if value is not None and value != actual:
            raise InvalidValue(name, value, f"the model's autoencoder has {actual} there ({config}: "
                                            f"first_stage_config {where}); drop {{{name}}} or set it to {actual}",
                               mentions=(name,))
    return spec


def check_checkpoint(ckpt: str, demo: bool = False) -> Path:
    """The checkpoint exists and is one by its content (safetensors or torch.save) or a diffusers SD v1
    pipeline folder; nothing is loaded."""
    from ldm.checkpoint import checkpoint_format
    from ldm.checkpoint.diffusers_folder import inspect_diffusers_folder, is_diffusers_folder
    path = resolve_path(ckpt)
    if not path.exists():
        if demo:
            raise SettingsError(f"the demo model is missing at {ckpt}; it ships with the repository, so restore it "
                                f"with git (git checkout -- {Path(ckpt).parent})")
        raise SettingsError(
            f"checkpoint not found: {ckpt}. Download the official Stable Diffusion v1 weights (sd-v1-4.ckpt from "
            f"the CompVis stable-diffusion-v-1-4-original model page on Hugging Face, after accepting its license) "
            f"and save them as {SD_CKPT}, or pass {{ckpt}} PATH (.ckpt or .safetensors). To try the project "
            f"without them, run with {{demo}} (a tiny model that ships with the repository and runs on a CPU).",
            "ckpt", "demo")
    if is_diffusers_folder(path):
        inspect_diffusers_folder(path)  # components and weight files present; no tensor read yet
    else:
        checkpoint_format(path)
    return path


def check_unet_input(spec: ModelSpec, ckpt_path: Path, inpainting: bool, config: str, ckpt: str) -> None:
    """The checkpoint's UNet reads as many input channels as the config's (4 text-to-image, 9 inpainting),
    and the task fits the model (`inpainting`: a mask is given); `config` and `ckpt` as the user named them."""
    from ldm.checkpoint.peek import unet_input_channels
    channels, config_channels = spec.geometry.channels, int(spec.unet.in_channels)
    inpainting_channels = 2 * channels + 1
    file_channels = unet_input_channels(ckpt_path)
    if file_channels is not None and file_channels != config_channels:
        kind = (f"an inpainting checkpoint: use scripts/inpaint.py (config {INPAINTING_CONFIG})"
                if file_channels == inpainting_channels else
                "a text-to-image checkpoint, not an inpainting one (those read 9, e.g. sd-v1-5-inpainting): use "
                "txt2img.py or img2img.py" if file_channels == channels and inpainting else
                "made for another config: give the {config} that matches it")
        raise SettingsError(f"{{ckpt}} {ckpt}: its UNet reads {file_channels} input channels but {{config}} "
                            f"{config} builds one reading {config_channels}; it is {kind}", "ckpt", "config")
    if not inpainting and config_channels == inpainting_channels:
        raise SettingsError(f"{{config}} {config} is an inpainting model ({config_channels} input channels): use "
                            "scripts/inpaint.py with {init_image} and {mask_image}", "config", "init_image",
                            "mask_image")
    if inpainting and config_channels != inpainting_channels:
        raise SettingsError(f"{{config}} {config} is not an inpainting model (its UNet reads {config_channels} "
                            f"input channels, not {inpainting_channels}); use {INPAINTING_CONFIG} with an "
                            "inpainting checkpoint", "config")


def check_model(config: str, ckpt: str, *, demo: bool = False, inpainting: bool = False,
                channels: Optional[int] = None, factor: Optional[int] = None) -> CheckedModel:
    """`read_config`, `check_checkpoint` and `check_unet_input`, in that order."""
    spec = read_config(config, channels, factor)
    path = check_checkpoint(ckpt, demo)
    check_unet_input(spec, path, inpainting, config, ckpt)
    return CheckedModel(spec, path)
