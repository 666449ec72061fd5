"""Generation shared by the scripts: devices, seeds, sampling (txt2img and img2img), images, safe output files.

Conventions:
- Every image has its own seed and its own CPU generator `torch.Generator().manual_seed(seed)`: its
  starting noise (x_T, or the img2img encode noise) is the generator's first draw, and DDIM's eta noise
  continues from the same generator, so the same seed gives the same image on any device and in any
  batch position. (With batch-shared attention an image also depends on its batch mates; the metadata
  records them.)
- Init images enter as (1, 3, H, W) in [-1, 1], H and W rounded down to what the UNet can halve.
- Images leave the model as (B, 3, H, W) in [-1, 1] and become 8-bit RGB PIL images.
- Output files are never overwritten: names are numbered and created exclusively, so a second run,
  or a run next to a deleted file, always writes new names.
- Each PNG carries its prompt, seed and settings as PNG text chunks ("parameters" holds JSON).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling_util import draw_noise
from ldm.modules.shared_attention import SharedAttentionSettings, SharedAttention


class UsageError(ValueError):
    """Bad user input (a flag, a file, a device); the message says what was wrong and what to do.

    The scripts print it as one line and exit with status 2 (`ldm.cli.run_cli`)."""


def choose_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must be available or it is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name; use auto, cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: MPS is not available on this machine; use --device cpu or auto")
    return device


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One fresh CPU generator per image; CPU so that a seed means the same noise on every device."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def precision_scope(precision: str, device: torch.device):
    """'autocast' runs CUDA in float16 (as CompVis does); the CPU and MPS stay in float32."""
    if precision == "autocast" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def make_sampler(name: str, model: Any):
    """'ddim', 'plms' or 'dpm_solver' -> a sampler with the shared `sample(...)` signature."""
    if name == "ddim":
        return DDIMSampler(model)
    if name == "plms":
        from ldm.models.diffusion.plms import PLMSSampler
        return PLMSSampler(model)
    if name == "dpm_solver":
        from ldm.models.diffusion.dpm_solver import DPMSolverSampler
        return DPMSolverSampler(model)
    raise ValueError(f"unknown sampler {name!r}; choose ddim, plms or dpm_solver")


def sharing_scope(model: Any, settings: Optional[SharedAttentionSettings]):
    """Batch-shared attention with `settings` for the duration of the block; nothing when None."""
    if settings is None:
        return contextlib.nullcontext()
    return SharedAttention(model, settings)


def conditionings(model: Any, prompts: Sequence[str], negative_prompt: str, scale: float) -> tuple[Any, Any]:
    """(conditional, unconditional) text conditionings; no unconditional one when scale == 1 (no guidance)."""
    conditioning = model.get_learned_conditioning(list(prompts))
    unconditional = None
    if scale != 1.0:
        unconditional = model.get_learned_conditioning([negative_prompt] * len(prompts))
    return conditioning, unconditional


def _check_one_seed_per_prompt(prompts: Sequence[str], seeds: Sequence[int]) -> None:
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per image")


@torch.no_grad()
def generate_latents(model: Any, sampler: Any, prompts: Sequence[str], seeds: Sequence[int], *,
                     shape: Sequence[int], steps: int, scale: float, eta: float = 0.0,
                     negative_prompt: str = "", sharing: Optional[SharedAttentionSettings] = None,
                     x_T: Optional[torch.Tensor] = None, verbose: bool = False) -> torch.Tensor:
    """Sample one batch: latents (B, C, H/f, W/f) for `prompts`, image i starting from seeds[i]'s noise."""
    _check_one_seed_per_prompt(prompts, seeds)
    conditioning, unconditional = conditionings(model, prompts, negative_prompt, scale)
    generators = seeded_generators(seeds)
    if x_T is None:
        x_T = draw_noise((len(seeds), *shape), generators, model.device)  # (B, C, H, W)
    with sharing_scope(model, sharing):
        samples, _ = sampler.sample(S=steps, batch_size=len(prompts), shape=tuple(shape), conditioning=conditioning,
                                    unconditional_guidance_scale=scale, unconditional_conditioning=unconditional,
                                    eta=eta, x_T=x_T, verbose=verbose, generator=generators)
    return samples


def encode_steps(strength: float, steps: int) -> int:
    """How many of the `steps` DDIM steps img2img runs: int(strength * steps), as CompVis."""
    return int(strength * steps)


@torch.no_grad()
def encode_init_image(model: Any, image: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] -> scaled latent (1, C, H/f, W/f).

    Takes the posterior mean rather than a sample (CompVis samples), so that the init latent is the
    same for every image and each image's randomness comes from its seed alone.
    """
    posterior = model.encode_first_stage(image.to(model.device))
    mean = posterior.mode() if hasattr(posterior, "mode") else posterior
    return model.get_first_stage_encoding(mean)


@torch.no_grad()
def img2img_latents(model: Any, sampler: DDIMSampler, init_latent: torch.Tensor, prompts: Sequence[str],
                    seeds: Sequence[int], *, steps: int, strength: float, scale: float, eta: float = 0.0,
                    negative_prompt: str = "", sharing: Optional[SharedAttentionSettings] = None,
                    verbose: bool = False) -> torch.Tensor:
    """SDEdit-style img2img (Meng et al., arXiv:2108.01073) with DDIM: noise the init latent
    (1, C, h, w) to the level of step `encode_steps(strength, steps)` with each seed's noise, then
    denoise that many steps. Returns latents (B, C, h, w). Strength 1 starts from (almost) pure noise;
    with no step to run (strength 0) the init latent is returned as it is, not noised to the final level."""
    _check_one_seed_per_prompt(prompts, seeds)
    t_enc = encode_steps(strength, steps)
    x0 = init_latent.to(model.device).expand(len(seeds), -1, -1, -1)  # (1, C, h, w) -> (B, C, h, w)
    if t_enc == 0:
        return x0.clone()
    conditioning, unconditional = conditionings(model, prompts, negative_prompt, scale)
    sampler.make_schedule(steps, ddim_eta=eta, verbose=False)
    generators = seeded_generators(seeds)
    noise = draw_noise(tuple(x0.shape), generators, model.device)  # (B, C, h, w)
    noised = sampler.stochastic_encode(x0, t_enc, noise=noise)
    with sharing_scope(model, sharing):
        return sampler.decode(noised, conditioning, t_enc, unconditional_guidance_scale=scale,
                              unconditional_conditioning=unconditional, generator=generators, verbose=verbose)


@torch.no_grad()
def decode_to_images(model: Any, latents: torch.Tensor) -> list[Image.Image]:
    x = model.decode_first_stage(latents).float()  # (B, 3, H, W) in about [-1, 1]
    return tensor_to_images(x)


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> 8-bit RGB images."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(a) for a in array]


def load_init_image(path: str | os.PathLike, multiple: int) -> torch.Tensor:
    """An image file -> (1, 3, H, W) in [-1, 1], H and W rounded down to a multiple of `multiple`
    (at least one multiple), as the autoencoder and UNet need; EXIF rotation is applied first."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--init-img {path}: no such file; give the picture to start from (PNG, JPEG, ...)")
    if path.is_dir():
        raise UsageError(f"--init-img {path} is a folder; give one image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(f"--init-img {path} is not an image this program can read ({error}); "
                         "use PNG or JPEG") from None
    width, height = (max(multiple, side - side % multiple) for side in image.size)
    if (width, height) != image.size:
        print(f"init image {path.name}: {image.size[0]}x{image.size[1]} resized to {width}x{height} "
              f"(a multiple of {multiple})")
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3) in [-1, 1]
    return array.permute(2, 0, 1)[None].contiguous()  # (1, 3, H, W)


LABEL_FONT_SIZE = 13


def label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at a readable size. At its default 10 px a space is 2 px wide and
    "no sharing" reads "nosharing"; Pillow before 10.1 (no size argument) keeps its bitmap font."""
    try:
        return ImageFont.load_default(size=LABEL_FONT_SIZE)
    except TypeError:
        return ImageFont.load_default()


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Optional[Sequence[str]] = None) -> Image.Image:
    """One picture of `rows` of images (rows may differ in length), with a label strip left of each row."""
    if not rows or not any(rows):
        raise ValueError("no images to put in a grid")
    w, h = next(image for row in rows for image in row).size
    n_cols = max(len(row) for row in rows)
    font = label_font()
    label_width = 0
    if row_labels:
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_width = max(8 + int(measure.textlength(label, font=font)) for label in row_labels)
    grid = Image.new("RGB", (label_width + n_cols * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (label_width + c * w, r * h))
        if row_labels:
            top, bottom = font.getbbox(row_labels[r])[1::2]
            draw.text((4, r * h + (h - top - bottom) // 2), row_labels[r], fill="black", font=font)  # centred
    return grid


def png_metadata(values: dict[str, Any]) -> PngInfo:
    """PNG text chunks: prompt and seed on their own, everything as JSON under "parameters"."""
    info = PngInfo()
    for key in ("prompt", "negative_prompt", "seed"):
        if key in values:
            info.add_text(key, str(values[key]))
    info.add_text("parameters", json.dumps(values, sort_keys=True, default=str))
    return info


class OutputFolder:
    """Numbered PNGs in a folder, never overwriting: each name is created exclusively ('x' mode)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UsageError(f"output folder {self.path} exists and is not a folder; choose another --outdir") from None

    def _next_number(self, prefix: str, digits: int) -> int:
        pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.png$")
        numbers = [int(m.group(1)) for name in os.listdir(self.path) if (m := pattern.match(name))]
        return max(numbers, default=-1) + 1

    def save(self, image: Image.Image, metadata: dict[str, Any], prefix: str = "", digits: int = 5) -> Path:
        number = self._next_number(prefix, digits)
        while True:
            target = self.path / f"{prefix}{number:0{digits}d}.png"
            try:
                with open(target, "xb") as handle:  # fails if the name exists: nothing is overwritten
                    image.save(handle, format="PNG", pnginfo=png_metadata(metadata))
                return target
            except FileExistsError:
                number += 1


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a text file, one prompt each."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--from-file {path}: no such file; give a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--from-file {path} cannot be read as UTF-8 text ({error}); give a text file with "
                         "one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--from-file {path}: the file holds no prompts (one per line)")
    return prompts


def batches(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive batches of `size`; the last one may be shorter."""
    for start in range(0, len(items), size):
        yield list(items[start:start + size])
