"""`generate(model, request)`: the one place that turns a request into images with their metadata.

It owns the parts every front end would otherwise repeat: the request's check against the model,
the batches and their seeds (`GenerationRequest.batches`), guidance and the sharing scope (through
`ldm.generation.sampling`), the comparison without sharing, the precision scope, decoding, and the
finite checks: latents and pixels that are NaN or infinite never become a silent black image but a
`NonFiniteError` that names the cause (a damaged weight tensor, found by scanning the weights only
then, or arithmetic that overflowed). Nothing is written to disk here (`ldm.generation.outputs`).

Metadata: every image gets a JSON-ready dict with everything that reproduces it (prompt and its
batch's prompts, seed and batch seeds, sampler, steps, scale, eta, size, latent C and f, the precision
actually computed in, shared-attention settings, and the model's source: config, checkpoint name and
content fingerprint, EMA); img2img adds strength, encode steps and the init image's name, inpainting
also the mask's name.

References (`request.references`, ldm/generation/reference.py): recorded once before the first batch
and offered to every shared batch (`reference_cache`, the default), or recorded again before every
batch (`reference_cache=False`); the two give the same images. With `compare` their images are the
first row.

Inpainting (a request with a mask, an inpainting model): the mask and the masked picture's latents are
computed once per run (`masked_image_conditioning`) and enter every UNet call beside the latents.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Optional

import torch
from PIL import Image

from ldm.generation.images import image_grid, image_to_tensor, mask_to_tensor, tensor_to_images
from ldm.generation.model import LoadedModel, precision_scope, precision_used
from ldm.generation.request import Batch, GenerationRequest
from ldm.generation.sampling import (decode_latents, encode_init_image, generate_latents, img2img_latents,
                                     make_sampler)
from ldm.generation.reference import (Reference, check_references, read_reference, record_reference_anchors,
                                       values_to_match)
from ldm.sharing import SharedAttentionSettings
from ldm.sharing.reference import RecordedAnchors

# A guidance scale above this is named as the likely cause when sampling overflows with finite weights.
USUAL_MAX_SCALE = 30.0


class NonFiniteError(RuntimeError):
    """Sampling or decoding produced NaN or infinite values; the message names the likely cause."""


@dataclass(frozen=True)
class Progress:
    """Where a run stands, reported after every sampler step."""

    batch: int  # 0-based index among all batches of the run (a compared batch counts twice)
    batches: int
    step: int  # steps done in this batch, 1..steps
    steps: int


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    metadata: dict[str, Any]
    latent: torch.Tensor  # (C, h, w) on the CPU: what was decoded into `image`


@dataclass(frozen=True)
class BatchImages:
    """One batch of one variant ("shared", "plain", or "no sharing" beside "shared" when comparing)."""

    label: str
    images: tuple[GeneratedImage, ...]

    @property
    def row_label(self) -> str:
        seeds = self.images[0].metadata["batch_seeds"]
        return f"{self.label} (seeds {seeds[0]}-{seeds[-1]})"


@dataclass(frozen=True)
class GenerationResult:
    request: GenerationRequest
    batches: tuple[BatchImages, ...]  # in order: iteration, batch, variant
    metadata: dict[str, Any]  # the run's settings, for the grid

    @property
    def samples(self) -> list[GeneratedImage]:
        return [image for batch in self.batches for image in batch.images]

    @property
    def images(self) -> list[Image.Image]:
        return [sample.image for sample in self.samples]

    def grid(self, images_per_row: Optional[int] = None) -> Image.Image:
        """All images in one picture: with `compare`, one labelled row per batch and variant; otherwise
        `images_per_row` (default: the batch size) images per row, in order."""
        if self.request.compare:
            return image_grid([[s.image for s in b.images] for b in self.batches],
                              row_labels=[b.row_label for b in self.batches])
        per_row = images_per_row or self.request.batch_size
        images = self.images
        return image_grid([images[i:i + per_row] for i in range(0, len(images), per_row)])


def generate(model: LoadedModel, request: GenerationRequest,
             progress: Optional[ProgressCallback] = None) -> GenerationResult:
    """Generate every image of `request` with `model`; nothing is saved (see `save_result`)."""
    request.check_for(model)
    module = model.module
    run = run_metadata(model, request, *request.size_for(model.geometry))
    variants: list[tuple[str, Optional[SharedAttentionSettings]]] = [("plain", None)]
    if request.sharing is not None:
        variants = [("shared", request.sharing)]
        if request.compare:  # the same seeds first without sharing
            variants.insert(0, ("no sharing", None))
    sampler = make_sampler(request.sampler, module)
    init_latent = None
    if not request.starts_from_noise:
        init_latent = encode_init_image(module, image_to_tensor(request.init_image))
    concat = None
    if request.inpainting:
        concat = module.masked_image_conditioning(image_to_tensor(request.init_image).to(module.device),
                                                  mask_to_tensor(request.mask_image).to(module.device))
    plan = request.batches()
    out: list[BatchImages] = []
    with precision_scope(request.precision, model.device):
        anchors = _reference_anchors(model, request, run, out)  # once per run, shared by every batch
        for number, batch in enumerate(plan):
            if number and anchors is not None and not request.reference_cache:
                anchors = None  # the previous batch's record goes before the next is made
                anchors = _reference_anchors(model, request, run, [])
            for label, sharing in variants:
                callback = _step_reporter(progress, len(out), len(plan) * len(variants), request.denoising_steps)
                latents = _sample(model, request, sampler, batch, sharing, init_latent, callback,
                                  anchors if sharing is not None else None, concat)
                out.append(_decoded(model, request, batch, label, sharing, latents, run))
    grid_metadata = {**run, "prompts": list(request.prompts), "first_seed": request.seed,
                     "compare": request.compare}
    return GenerationResult(request, tuple(out), grid_metadata)


def run_metadata(model: LoadedModel, request: GenerationRequest, height: int, width: int) -> dict[str, Any]:
    """The settings every image of the run shares (JSON-ready)."""
    r = request
    values = {
        "sampler": r.sampler, "steps": r.steps, "scale": r.scale, "eta": r.eta, "H": height, "W": width,
        "C": model.geometry.channels, "f": model.geometry.factor,
        "precision": precision_used(r.precision, model.device, model.dtype), "negative_prompt": r.negative_prompt,
        **model.source, "shared_attention": r.sharing.as_metadata() if r.sharing else None,
    }
    if r.references:
        values.update(references=r.reference_names, reference_prompt=r.reference_prompt)
    if r.img2img:
        values.update(strength=r.strength, encode_steps=r.denoising_steps, init_image=r.init_image_name)
    if r.inpainting:
        values.update(mask_image=r.mask_image_name)
    return json.loads(json.dumps(values, default=str))


def _sample(model: LoadedModel, request: GenerationRequest, sampler: Any, batch: Batch,
            sharing: Optional[SharedAttentionSettings], init_latent: Optional[torch.Tensor],
            callback: Optional[Callable[[int], None]], anchors: Optional[RecordedAnchors] = None,
            concat: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One batch's latents (B, C, h, w): from each seed's noise, or img2img from `init_latent`; `concat` is
    the inpainting model's mask and masked-image latents (1, 1 + C, h, w)."""
    common = dict(scale=request.scale, eta=request.eta, negative_prompt=request.negative_prompt, sharing=sharing,
                  callback=callback, concat=concat)
    if init_latent is None:
        shape = model.geometry.latent_shape(*request.size_for(model.geometry))
        return generate_latents(model.module, sampler, batch.prompts, batch.seeds, shape=shape, steps=request.steps,
                                reference=anchors, **common)
    return img2img_latents(model.module, sampler, init_latent, batch.prompts, batch.seeds, steps=request.steps,
                           strength=request.strength, reference=anchors, **common)


def _reference_anchors(model: LoadedModel, request: GenerationRequest, run: dict[str, Any],
                       out: list[BatchImages]) -> Optional[RecordedAnchors]:
    """The references' anchors, recorded once; with `compare` their images become the first row."""
    if not request.references:
        return None
    references = [r if isinstance(r, Reference) else read_reference(r) for r in request.references]
    check_references(references, values_to_match(request, model.geometry), model.source.get("ckpt_fingerprint"),
                     request.sharing.subjects, request.reference_prompt)
    height, width = request.size_for(model.geometry)
    picture_run = dict(steps=request.steps, scale=request.scale, negative_prompt=request.negative_prompt, H=height,
                       W=width, prompt=request.reference_prompt)
    anchors, images, errors = record_reference_anchors(model.module, references, request.sharing, picture_run)
    run["reference_inversion_errors"] = errors
    if request.compare:
        ordered = [r for r in references if r.generated] + [r for r in references if not r.generated]
        out.append(BatchImages("reference", tuple(
            GeneratedImage(image, r.metadata or {"batch_seeds": ["picture"], "reference": r.path.name},
                           torch.empty(0)) for image, r in zip(images, ordered))))
    return anchors


def _step_reporter(progress: Optional[ProgressCallback], batch: int, batches: int,
                   steps: int) -> Optional[Callable[[int], None]]:
    if progress is None:
        return None
    return lambda step_index: progress(Progress(batch, batches, step_index + 1, steps))


def _decoded(model: LoadedModel, request: GenerationRequest, batch: Batch, label: str,
             sharing: Optional[SharedAttentionSettings], latents: torch.Tensor, run: dict[str, Any]) -> BatchImages:
    """Decode one batch's latents (B, C, h, w) into images with their metadata, refusing non-finite values."""
    seeds = f"seeds {batch.seeds[0]}-{batch.seeds[-1]}"
    if not bool(torch.isfinite(latents).all()):
        raise NonFiniteError(f"sampling gave NaN or infinite latents for the images with {seeds}; "
                             f"{nonfinite_cause(model, request)}. Nothing was decoded.")
    pixels = decode_latents(model.module, latents)  # (B, 3, H, W)
    if not bool(torch.isfinite(pixels).all()):
        raise NonFiniteError(f"the autoencoder decoded the images with {seeds} to NaN or infinite pixels; "
                             f"{nonfinite_cause(model, request)}.")
    images = []
    for index, (image, latent) in enumerate(zip(tensor_to_images(pixels), latents)):
        metadata = {**run, "prompt": batch.prompts[index], "seed": batch.seeds[index],
                    "batch_prompts": list(batch.prompts), "batch_seeds": list(batch.seeds), "batch_index": index,
                    "iteration": batch.iteration, "shared_attention": sharing.as_metadata() if sharing else None}
        images.append(GeneratedImage(image, json.loads(json.dumps(metadata, default=str)), latent.float().cpu()))
    return BatchImages(label, tuple(images))


def nonfinite_cause(model: LoadedModel, request: GenerationRequest) -> str:
    """Why values went non-finite: a damaged weight (scanned only now, when it matters) or overflow."""
    bad = first_nonfinite_tensor(model.module)
    if bad is not None:
        return (f"the model's weights are damaged: tensor {bad} holds NaN or infinite values (the checkpoint "
                "is corrupt; download or convert it again)")
    if abs(request.scale) > USUAL_MAX_SCALE:
        return (f"every weight is finite, so the arithmetic overflowed: the guidance scale {request.scale:g} is "
                f"far beyond the usual 1 to {USUAL_MAX_SCALE:g}; lower it")
    used = precision_used(request.precision, model.device, model.dtype)
    return f"every weight is finite, so the arithmetic overflowed in {used}" + (
        "; try full precision" if used != "float32" else "")


def first_nonfinite_tensor(module: torch.nn.Module) -> Optional[str]:
    """The name of the first parameter or buffer holding NaN or infinity, or None when all are finite."""
    for name, tensor in chain(module.named_parameters(), module.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None
