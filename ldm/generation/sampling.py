"""One batch of latents: conditionings, per-image seeded noise, a sampler run (txt2img or img2img), decoding.

The pieces `generate` (ldm/generation/generate.py) puts together, usable on their own with any
LatentDiffusion module. Conventions:
- Every image has its own seed and its own CPU generator `torch.Generator().manual_seed(seed)`: its
  starting noise (x_T, or the img2img encode noise) is the generator's first draw, and DDIM's eta noise
  continues from the same generator, so the same seed gives the same image on any device and in any
  batch position. (With batch-shared attention an image also depends on its batch mates.)
- Latents are (B, C, H/f, W/f); init images enter as (1, 3, H, W) in [-1, 1]; decoded images leave
  as (B, 3, H, W) in about [-1, 1].
- `callback(i)` runs after each sampler step i (0 = first, noisiest).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from PIL import Image

from ldm.generation.images import tensor_to_images
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling_util import draw_noise
from ldm.sharing.controller import controller_for
from ldm.sharing.settings import SharedAttentionSettings
from ldm.sharing.reference import RecordedAnchors

StepCallback = Optional[Callable[[int], None]]


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


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One fresh CPU generator per image; CPU so that a seed means the same noise on every device."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


@contextlib.contextmanager
def sharing_scope(model: Any, settings: Optional[SharedAttentionSettings], prompts: Sequence[str],
                  seeds: Sequence[int], reference: Optional[RecordedAnchors] = None) -> Iterator[None]:
    """Batch-shared attention with `settings` for the duration of the block; nothing when None. The
    prompts locate subject words; the batch's first seed seeds the dropout. With `reference`, every
    image attends to its own tokens and the recorded anchors', and the first anchor's seed seeds it."""
    if settings is None:
        yield
        return
    # A batch's dropout is seeded by its first image's seed; beside recorded anchors the first image is
    # the first anchor, so its seed (None for a picture: the batch's own) seeds the draw.
    seed = reference.seed if reference is not None and reference.seed is not None else seeds[0]
    with controller_for(model, settings, prompts=prompts, seed=int(seed), reference=reference):
        yield


def conditionings(model: Any, prompts: Sequence[str], negative_prompt: str, scale: float,
                  concat: Optional[torch.Tensor] = None) -> tuple[Any, Any]:
    """(conditional, unconditional) text conditionings; no unconditional one when scale == 1 (no guidance).

    With `concat` (1, K, h, w), the inpainting model's mask and masked-image latents, both become hybrid
    conditionings {"c_concat": [(B, K, h, w)], "c_crossattn": [(B, 77, D)]}: the same concat for both halves."""
    conditioning = model.get_learned_conditioning(list(prompts))
    unconditional = None
    if scale != 1.0:
        unconditional = model.get_learned_conditioning([negative_prompt] * len(prompts))
    if concat is None:
        return conditioning, unconditional
    concat = concat.to(model.device).expand(len(prompts), -1, -1, -1)  # (1, K, h, w) -> (B, K, h, w)

    def hybrid(text: Any) -> Any:
        return None if text is None else {"c_concat": [concat], "c_crossattn": [text]}
    return hybrid(conditioning), hybrid(unconditional)


def _check_one_seed_per_prompt(prompts: Sequence[str], seeds: Sequence[int]) -> None:
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per image")


@torch.no_grad()
def generate_latents(model: Any, sampler: Any, prompts: Sequence[str], seeds: Sequence[int], *,
                     shape: Sequence[int], steps: int, scale: float, eta: float = 0.0,
                     negative_prompt: str = "", sharing: Optional[SharedAttentionSettings] = None,
                     x_T: Optional[torch.Tensor] = None, callback: StepCallback = None,
                     verbose: bool = False, reference: Optional[RecordedAnchors] = None,
                     concat: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sample one batch: latents (B, C, H/f, W/f) for `prompts`, image i starting from seeds[i]'s noise.
    `reference`: anchors recorded elsewhere that every image also attends to (see `sharing_scope`).
    `concat`: the inpainting model's extra input (see `conditionings`)."""
    _check_one_seed_per_prompt(prompts, seeds)
    conditioning, unconditional = conditionings(model, prompts, negative_prompt, scale, concat)
    generators = seeded_generators(seeds)
    if x_T is None:
        x_T = draw_noise((len(seeds), *shape), generators, model.device)  # (B, C, H, W)
    with sharing_scope(model, sharing, prompts, seeds, reference):
        samples, _ = sampler.sample(S=steps, batch_size=len(prompts), shape=tuple(shape), conditioning=conditioning,
                                    callback=callback, unconditional_guidance_scale=scale,
                                    unconditional_conditioning=unconditional, eta=eta, x_T=x_T, verbose=verbose,
                                    generator=generators)
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
                    callback: StepCallback = None, verbose: bool = False,
                    concat: Optional[torch.Tensor] = None, reference: Optional[RecordedAnchors] = None
                    ) -> torch.Tensor:
    """SDEdit-style img2img (Meng et al., arXiv:2108.01073) with DDIM: noise the init latent
    (1, C, h, w) to the level of step `encode_steps(strength, steps)` with each seed's noise, then
    denoise that many steps. Returns latents (B, C, h, w). Strength 1 starts from (almost) pure noise;
    with no step to run (strength 0) the init latent is returned as it is, not noised to the final level.
    `concat`: the inpainting model's extra input (see `conditionings`). `reference`: anchors recorded
    along the whole grid (a txt2img batch or an inverted picture); step k of the img2img run reads
    their record at grid step steps - t_enc + k, the same noise level (see `sharing_scope`)."""
    _check_one_seed_per_prompt(prompts, seeds)
    t_enc = encode_steps(strength, steps)
    x0 = init_latent.to(model.device).expand(len(seeds), -1, -1, -1)  # (1, C, h, w) -> (B, C, h, w)
    if t_enc == 0:
        return x0.clone()
    conditioning, unconditional = conditionings(model, prompts, negative_prompt, scale, concat)
    sampler.make_schedule(steps, ddim_eta=eta, verbose=False)
    generators = seeded_generators(seeds)
    noise = draw_noise(tuple(x0.shape), generators, model.device)  # (B, C, h, w)
    noised = sampler.stochastic_encode(x0, t_enc, noise=noise)
    with sharing_scope(model, sharing, prompts, seeds, reference):
        return sampler.decode(noised, conditioning, t_enc, unconditional_guidance_scale=scale,
                              unconditional_conditioning=unconditional, callback=callback, generator=generators,
                              verbose=verbose)


@torch.no_grad()
def decode_latents(model: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in about [-1, 1], float32."""
    return model.decode_first_stage(latents).float()


def decode_to_images(model: Any, latents: torch.Tensor) -> list[Image.Image]:
    """Scaled latents (B, C, h, w) -> 8-bit RGB images."""
    return tensor_to_images(decode_latents(model, latents))


def batches(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive batches of `size`; the last one may be shorter."""
    for start in range(0, len(items), size):
        yield list(items[start:start + size])
