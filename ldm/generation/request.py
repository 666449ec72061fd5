"""What to generate: a frozen, checked request, and the batches it makes.

A `GenerationRequest` is built once (by a script from its flags, by a notebook from keywords) and
checked twice: its values on construction (`__post_init__`: finite numbers, ranges, combinations),
and against a model's description before any weight loads (`check_for(spec)`: image size against the
latent geometry, layer groups, number of timesteps). Every problem is an `InvalidValue` naming the
request field (`eta`, `sharing.steps`, ...).

Seeds: image k of a run (counting every image of every batch and iteration, in order) starts from
seed `seed + k`; with `fixed_code` every iteration starts again at `seed`. With `compare` each batch
is also generated without sharing, from the same seeds.
"""
from __future__ import annotations

import math
import os
import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union

import torch.nn as nn
from PIL import Image

from ldm.errors import InvalidValue, SettingsError
from ldm.generation.images import UnreadableImage, to_rgb
from ldm.generation.limits import MAX_SEED
from ldm.generation.model import LatentGeometry
from ldm.generation.reference import Reference
from ldm.generation.sampling import batches, encode_steps
from ldm.sharing import SharedAttentionSettings, select_layers
from ldm.sharing.subject_words import check_prompts_name_subjects

SAMPLERS = {"ddim": "DDIM", "plms": "PLMS", "dpm_solver": "DPM-Solver"}  # name -> how messages write it
PRECISIONS = ("full", "autocast", "bfloat16")


class ModelDescription(Protocol):
    """What `check_for` needs of a model: a `ModelSpec` (from the config) or a `LoadedModel`."""

    geometry: LatentGeometry
    unet: nn.Module
    num_timesteps: int


@dataclass(frozen=True)
class Batch:
    """One batch of the run: images generated together (one sharing group), image i from seeds[i]."""

    iteration: int
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class GenerationRequest:
    """A run of text-to-image (or, with `init_image`, image-to-image) generation.

    `prompt`: one text for every image, or a sequence with one text per image (consecutive images
    fill batches of `batch_size`; the last batch may be shorter). `height`/`width` None: the model's
    native size. `sharing` None: plain generation. `precision` "autocast": float16 on CUDA, bfloat16 on
    a CPU that computes it natively, float32 elsewhere; "full": float32 everywhere; "bfloat16": bfloat16
    autocast on the CPU and CUDA (`ldm.generation.model.autocast_dtype`). `init_image`: img2img (DDIM
    only) from that picture, whose size must fit the model (`ldm.generation.inputs.fit_to_multiple`),
    keeping `1 - strength` of it.
    `mask_image` (with `init_image`, for an inpainting model): white (>= 0.5) is repainted, black kept; the
    init image's size. Strength 1 (the inpainting default) starts from pure noise with any sampler; below
    1 it starts from the noised init image, as img2img does (DDIM).
    """

    prompt: Union[str, tuple[str, ...]]
    negative_prompt: str = ""
    seed: int = 42
    batch_size: int = 4
    n_iter: int = 1
    fixed_code: bool = False
    sampler: str = "ddim"
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    height: Optional[int] = None
    width: Optional[int] = None
    init_image: Optional[Image.Image] = field(default=None, compare=False, repr=False)
    init_image_name: Optional[str] = None  # recorded in the metadata
    strength: float = 0.75
    sharing: Optional[SharedAttentionSettings] = None
    compare: bool = False
    precision: str = "autocast"
    # Images that anchor every batch (ldm/generation/reference.py): files, or references read already.
    references: tuple[Union[str, Reference], ...] = ()
    reference_prompt: str = ""  # what a reference picture (not a generated PNG) is inverted with
    # Record the references' keys and values once per run (True) or again for every batch (False).
    reference_cache: bool = True
    mask_image: Optional[Image.Image] = field(default=None, compare=False, repr=False)
    mask_image_name: Optional[str] = None  # recorded in the metadata

    def __post_init__(self) -> None:
        if isinstance(self.prompt, (list, tuple)):
            object.__setattr__(self, "prompt", tuple(self.prompt))
        if isinstance(self.references, (str, os.PathLike, Reference)):
            object.__setattr__(self, "references", (self.references,))
        if not isinstance(self.references, (list, tuple)) or \
                not all(isinstance(r, (str, os.PathLike, Reference)) for r in self.references):
            raise InvalidValue("references", self.references, "give a sequence of image files")
        object.__setattr__(self, "references", tuple(r if isinstance(r, Reference) else os.fspath(r)
                                                     for r in self.references))
        _check_types(self)
        _check_values(self)

    def with_references(self, references: Sequence[Reference]) -> "GenerationRequest":
        """The same request with its references replaced by those files read (so they are read once)."""
        return replace(self, references=tuple(references))

    @property
    def reference_names(self) -> list[str]:
        """The references' file names, as the metadata records them."""
        return [r.path.name if isinstance(r, Reference) else Path(r).name for r in self.references]

    # ---- the plan of the run ----------------------------------------------------------------------
    @property
    def img2img(self) -> bool:
        return self.init_image is not None

    @property
    def inpainting(self) -> bool:
        return self.mask_image is not None

    @property
    def starts_from_noise(self) -> bool:
        """Sampling starts from each seed's pure noise: txt2img, and inpainting at strength 1."""
        return not self.img2img or (self.inpainting and self.strength == 1.0)

    @property
    def prompts(self) -> tuple[str, ...]:
        """The distinct prompt texts of one iteration: (prompt,) or the per-image sequence."""
        return (self.prompt,) if isinstance(self.prompt, str) else self.prompt

    @property
    def denoising_steps(self) -> int:
        """The sampler steps that actually run: all of them, or int(strength * steps) for img2img."""
        return encode_steps(self.strength, self.steps) if self.img2img else self.steps

    def batches(self) -> list[Batch]:
        """Every batch of the run in order: iterations, then consecutive batches of prompts."""
        if isinstance(self.prompt, str):
            prompt_batches = [[self.prompt] * self.batch_size]
        else:
            prompt_batches = list(batches(self.prompt, self.batch_size))
        plan, count = [], 0
        for iteration in range(self.n_iter):
            position = 0
            for prompts in prompt_batches:
                first = self.seed + (position if self.fixed_code else count)
                plan.append(Batch(iteration, tuple(prompts), tuple(range(first, first + len(prompts)))))
                count += len(prompts)
                position += len(prompts)
        return plan

    @property
    def image_count(self) -> int:
        per_iteration = self.batch_size if isinstance(self.prompt, str) else len(self.prompt)
        return per_iteration * self.n_iter

    def size_for(self, geometry: LatentGeometry) -> tuple[int, int]:
        """(height, width) in pixels: the init image's, the requested, or the model's native size."""
        if self.init_image is not None:
            return self.init_image.height, self.init_image.width
        return self.height or geometry.native_size, self.width or geometry.native_size

    # ---- checks against a model -------------------------------------------------------------------
    def check_for(self, model: ModelDescription) -> None:
        """Check the request against a model (its config's `ModelSpec` suffices: no weights needed)."""
        field_name = "init_image" if self.img2img else None
        height, width = self.size_for(model.geometry)
        try:
            model.geometry.check_size(height, width)
        except InvalidValue as error:
            if field_name is None:
                raise
            raise InvalidValue(field_name, f"{width}x{height}", error.problem + " (resize it with "
                                                                "fit_to_multiple)") from None
        _check_input_channels(self, model)
        if self.steps > model.num_timesteps:
            raise InvalidValue("steps", self.steps, f"must be between 1 and {model.num_timesteps}, the "
                                                    "model's training timesteps")
        if self.sharing is not None:
            try:
                select_layers(model.unet, self.sharing.groups)
            except ValueError as error:
                raise InvalidValue("sharing.groups", ",".join(self.sharing.groups), str(error)) from None


def _check_types(r: GenerationRequest) -> None:
    """Fields of the wrong type are refused, never coerced ('no' is not a boolean); texts must be
    writable into a PNG's metadata (no NUL, no unpaired surrogate)."""
    if not isinstance(r.prompt, (str, tuple)) or not r.prompts or not all(isinstance(p, str) for p in r.prompts):
        raise InvalidValue("prompt", r.prompt, "give a text, or a non-empty sequence of texts (one per image)")
    texts = [("prompt", text) for text in r.prompts]
    texts += [("negative_prompt", r.negative_prompt), ("reference_prompt", r.reference_prompt)]
    for name, text in texts:
        if not isinstance(text, str):
            raise InvalidValue(name, text, "must be a text (empty for none)")
        _check_text(name, text)
    for name in ("init_image_name", "mask_image_name"):
        if getattr(r, name) is not None and not isinstance(getattr(r, name), str):
            raise InvalidValue(name, getattr(r, name), "must be a file name or None")
    for name in ("fixed_code", "compare", "reference_cache"):
        if not isinstance(getattr(r, name), bool):
            raise InvalidValue(name, getattr(r, name), "must be True or False")
    for name, choices in (("sampler", SAMPLERS), ("precision", PRECISIONS)):
        if not isinstance(getattr(r, name), str) or getattr(r, name) not in choices:
            raise InvalidValue(name, getattr(r, name), f"choose one of {', '.join(choices)}")
    for name, transparency in (("init_image", "white"), ("mask_image", "refuse")):
        image = getattr(r, name)
        if image is None:
            continue
        if not isinstance(image, Image.Image) or image.width < 1 or image.height < 1:
            shown = f"{image.width}x{image.height}" if isinstance(image, Image.Image) else type(image).__name__
            raise InvalidValue(name, shown, "must be a PIL image of at least 1x1 pixels")
        try:
            object.__setattr__(r, name, to_rgb(image, transparency))
        except UnreadableImage as error:
            raise InvalidValue(name, f"{image.mode} image", str(error)) from None


def _check_text(name: str, text: str) -> None:
    if "\x00" in text:
        raise InvalidValue(name, text.replace("\x00", "\\0"), "contains a NUL character; remove it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidValue(name, text.encode("utf-8", "replace").decode(), "contains an unpaired surrogate, which "
                                                                            "is no character; remove it") from None


def _check_values(request: GenerationRequest) -> None:
    """Every check that needs no model; raises InvalidValue naming the field."""
    r = request
    _check_whole(r, "batch_size", 1)
    _check_whole(r, "n_iter", 1)
    _check_whole(r, "steps", 1)
    _check_whole(r, "seed", 0)
    if r.seed + r.image_count - 1 > MAX_SEED:
        raise InvalidValue("seed", r.seed, f"image seeds run from seed to seed + {r.image_count - 1}, which must "
                                           f"stay below 2**63 (torch seeds are 64-bit)")
    for name in ("scale", "eta", "strength"):
        if not _is_number(getattr(r, name)) or not math.isfinite(getattr(r, name)):
            raise InvalidValue(name, getattr(r, name), "must be a finite number")
    if not 0.0 <= r.eta <= 1.0:
        raise InvalidValue("eta", r.eta, "must be between 0 (deterministic DDIM) and 1 (DDPM-like noise)")
    if r.eta != 0 and r.sampler != "ddim":
        raise InvalidValue("eta", r.eta, f"{SAMPLERS[r.sampler]} is deterministic and needs eta 0; use the DDIM "
                                         "sampler for eta > 0")
    for name in ("height", "width"):
        value = getattr(r, name)
        if value is not None and (not _is_whole(value) or value < 1):
            raise InvalidValue(name, value, "must be a positive whole number of pixels")
    if r.img2img:
        _check_img2img(r)
    elif r.inpainting:
        raise InvalidValue("init_image", None, "inpainting needs the picture to paint into besides the mask")
    _check_sharing(r)
    if r.references:
        _check_references(r)


def _check_references(r: GenerationRequest) -> None:
    """A reference anchors every image of the batch, in the layers and steps of the run's sharing."""
    if r.sharing is None:
        raise SettingsError("{references} is shared with in anchor mode, and this run shares nothing: add "
                            "{sharing.groups} GROUPS (e.g. all) and {sharing.mode} anchor", "references",
                            "sharing.groups", "sharing.mode")
    if r.sharing.mode != "anchor":
        raise InvalidValue("sharing.mode", r.sharing.mode,
                           "a reference anchors every image of the run: share in anchor mode (the reference "
                           "images are the anchors)")
    if r.inpainting:
        raise InvalidValue("mask_image", r.mask_image_name, "references extend text-to-image and image-to-image "
                                                            "runs; an inpainting run cannot take one")
    if r.sampler != "ddim":
        raise InvalidValue("sampler", r.sampler, "a reference's keys are recorded per step, which needs one "
                                                 "model call per step: use DDIM")
    if r.sharing.isolated and r.sharing.adain:
        raise InvalidValue("sharing.adain", True, "AdaIN per subject beside a reference is not supported (a reference "
                                                  "records its first anchor's whole-image statistics); drop AdaIN or "
                                                  "the reference")


def _check_input_channels(r: GenerationRequest, model: ModelDescription) -> None:
    """An inpainting UNet reads latents, mask and masked-image latents (2C + 1 channels); others read C."""
    channels, unet_channels = model.geometry.channels, int(model.unet.in_channels)
    if r.inpainting and unet_channels != 2 * channels + 1:
        raise InvalidValue("mask_image", r.mask_image_name or "given",
                           f"inpainting needs an inpainting model, whose UNet reads {2 * channels + 1} input "
                           f"channels (latents, mask, masked image); this model's reads {unet_channels}")
    if not r.inpainting and unet_channels != channels:
        raise InvalidValue("mask_image", None, f"this is an inpainting model (its UNet reads {unet_channels} "
                                               f"input channels, not {channels}): give an init image and a mask")


def _check_img2img(r: GenerationRequest) -> None:
    if r.inpainting:
        _check_mask(r)
    if r.sampler != "ddim" and not r.starts_from_noise:
        raise InvalidValue("sampler", r.sampler, "image-to-image samples with DDIM only"
                           + (" (inpainting below strength 1 too)" if r.inpainting else ""))
    for name, side in (("height", r.init_image.height), ("width", r.init_image.width)):
        if getattr(r, name) not in (None, side):
            raise InvalidValue(name, getattr(r, name), f"image-to-image keeps the init image's size ({side})")
    if not 0.0 <= r.strength <= 1.0:
        raise InvalidValue("strength", r.strength, "must be between 0 (keep the init image) and 1 (ignore it)")


def _check_mask(r: GenerationRequest) -> None:
    if r.mask_image.size != r.init_image.size:
        raise InvalidValue("mask_image", f"{r.mask_image.width}x{r.mask_image.height}",
                           f"the mask must have the init image's size, {r.init_image.width}x{r.init_image.height}")


def _check_sharing(r: GenerationRequest) -> None:
    if r.sharing is None:
        if r.compare:
            raise InvalidValue("compare", True, "compares sharing with no sharing, so it needs sharing settings")
        return
    if not isinstance(r.sharing, SharedAttentionSettings):
        raise InvalidValue("sharing", r.sharing, "must be a SharedAttentionSettings or None")
    if r.sharing.subjects:
        try:
            check_prompts_name_subjects(r.prompts, r.sharing.subjects)
        except InvalidValue as error:
            raise error.within("sharing") from None
    if r.sharing.strength == -math.inf:
        return  # sharing switched off by its strength: no step needs to be selected
    total = r.denoising_steps
    if total == 0:
        raise InvalidValue("strength", r.strength, f"with {r.steps} steps this runs no denoising step "
                                                   f"(int(strength * steps) = 0), so sharing would do nothing; "
                                                   "raise the strength or turn sharing off")
    first = r.steps - total  # img2img samples the grid's last `total` steps
    if not r.sharing.steps_in_window(r.steps, first):
        starts = ", ".join(f"{i / r.steps:g}" for i in range(first, first + min(total, 4))) + (
            ", ..." if total > 4 else "")
        raise InvalidValue("sharing.steps", r.sharing.steps,
                           f"the step window selects none of the {total} sampling steps (they start at "
                           f"fractions {starts} of the {r.steps}-step grid); widen the window or run more steps")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_whole(r: GenerationRequest, name: str, minimum: int) -> None:
    value = getattr(r, name)
    if not _is_whole(value) or value < minimum:
        raise InvalidValue(name, value, f"must be a whole number of at least {minimum}")
