"""More images like this one: a PNG this project wrote as the anchor of every batch of a new run.

A generated PNG's metadata says how to make its whole batch again (prompts, seeds, sampler, steps,
scale, eta, size, sharing settings, the checkpoint's content fingerprint). `record_reference_anchors`
regenerates that batch with its own settings, checks that the picked image comes out with the PNG's
pixels (else the checkpoint or a setting differs, and nothing is made), and records the picked image's
self-attention keys and values in the new run's shared layers and step window
(`ldm.sharing.reference`). Every new image then attends to its own tokens and the reference's,
so it comes out as it would have as a non-anchor image of the original batch in anchor mode, with
the picked image as the anchor. To share with the whole original batch, give every PNG of it: a
batch is regenerated once however many of its images are given.

Any other picture (no metadata: a photo, a render) is encoded with the autoencoder and DDIM-inverted
(`ldm.models.diffusion.ddim_inversion`) with its own prompt (default empty) along the run's grid;
its keys and values at each step are those of the inverted latent at that step's level, under the
run's guidance, so they follow the schedule. The inversion's reconstruction error is reported.

The record is made once per run and reused by every batch (n_iter, prompt files). Its memory is the
anchors' keys and values at every shared layer and step (benchmarks/reference_cache_memory.py).

Checked before any weight loads (`check_references`): the file exists and carries the metadata, the
checkpoint fingerprint, size, sampler, steps, scale, eta, negative prompt and latent shape agree with
the run; with subject words, the reference's prompt (a picture's: the reference prompt) names the
subject. Errors are `InvalidValue("references", path, ...)` naming what differs.

Subject words, dropout and AdaIN of the new run reach the record as they would reach the anchors of
a batch (ldm/sharing/__init__.py, "Anchors recorded in another run").
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ldm.errors import InvalidValue
from ldm.files import NotARegularFile
from ldm.generation.images import (UnreadableImage, image_to_tensor, metadata_of, read_image_file, tensor_to_images,
                                   to_rgb)
from ldm.generation.limits import Limits
from ldm.generation.reference_metadata import check_reference_metadata
from ldm.generation.sampling import conditionings, decode_latents, encode_init_image, generate_latents, make_sampler
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddim_inversion import invert
from ldm.models.diffusion.guidance import ClassifierFreeGuidance
from ldm.sharing import SharedAttentionSettings, subject_positions_for
from ldm.sharing.subject_words import check_prompts_name_subjects
from ldm.sharing.reference import AnchorRecorder, RecordedAnchors

# Metadata a reference PNG must carry to be regenerated.
NEEDED = ("prompt", "seed", "batch_prompts", "batch_seeds", "batch_index", "sampler", "steps", "scale", "eta", "H", "W",
          "negative_prompt", "C", "f")
# (metadata key, request/run value name) that the new run must share with its reference.
MUST_MATCH = ("sampler", "steps", "scale", "eta", "negative_prompt", "H", "W", "C", "f")
# Pixels may differ by rounding only (one 8-bit level).
MAX_PIXEL_DIFFERENCE = 1


@dataclass(frozen=True)
class Reference:
    """A reference image: its path, pixels, and this project's metadata (None: a picture from elsewhere)."""

    path: Path
    image: Image.Image
    metadata: Optional[dict[str, Any]]

    @property
    def generated(self) -> bool:
        return self.metadata is not None

    @property
    def batch_key(self) -> tuple:
        """What identifies the batch it came from (two images of one batch share it)."""
        m = self.metadata
        return (tuple(m["batch_prompts"]), tuple(m["batch_seeds"]), repr(m.get("shared_attention")))


def read_reference(path: str | os.PathLike, limits: Limits = Limits()) -> Reference:
    """Open a reference image. A PNG with this project's metadata is a generated reference; an image
    without any is a picture (inverted). Anything else is an InvalidValue naming the file: a path that
    is no regular file, an image that cannot be read, metadata that is partial, of the wrong types, out
    of `limits` or not describing the pixels (`check_reference_metadata`)."""
    path = Path(path)
    hint = "a PNG this project generated or a picture"
    try:
        opened = read_image_file(path, "reference", hint)
        metadata = metadata_of(opened)  # PNG text chunks; other formats have none
        image = to_rgb(opened)
    except FileNotFoundError:
        raise InvalidValue("references", str(path), f"no such file; give {hint}") from None
    except IsADirectoryError:
        raise InvalidValue("references", str(path), f"is a folder; give {hint}") from None
    except (NotARegularFile, UnreadableImage) as error:
        reason = str(error).removeprefix(f"reference {path} ").split("; give ")[0]
        raise InvalidValue("references", str(path), f"{reason}; give {hint}") from None
    if not metadata:
        return Reference(path, image, None)
    missing = [key for key in NEEDED if key not in metadata]
    if missing:
        raise InvalidValue("references", str(path), f"its metadata lacks {', '.join(missing)}, so its batch cannot "
                                                    "be made again; give a PNG this project wrote")
    check_reference_metadata(metadata, path, image, limits)
    if metadata.get("references"):
        raise InvalidValue("references", str(path), "was itself made beside a reference, so its batch alone does not "
                                                    f"make it again; give the original reference "
                                                    f"({', '.join(metadata['references'])[:200]})")
    return Reference(path, image, metadata)


def reference_notes(references: Sequence[Reference], height: int, width: int, prompt: str) -> list[str]:
    """One line per picture reference: that it is inverted (with which prompt), and any resizing."""
    notes = []
    for reference in references:
        if reference.generated:
            continue
        size = reference.image.size
        resized = f", resized from {size[0]}x{size[1]} to {width}x{height}" if size != (width, height) else ""
        notes.append(f"reference {reference.path.name}: no generation metadata, so it is treated as a picture and "
                     f"DDIM-inverted with the prompt {prompt!r}{resized}")
    return notes


def check_references(references: Sequence[Reference], run: dict[str, Any], fingerprint: Optional[str],
                     subjects: Sequence[Sequence[str]] = (), picture_prompt: str = "") -> None:
    """Refuse references the run cannot extend: `run` holds the new run's values under the metadata's
    names (see `MUST_MATCH`); `fingerprint` is the checkpoint's (None when unknown, e.g. a test model).
    With subjects, a reference's own prompt (a picture's: `picture_prompt`) must name each subject (each
    mask is read from its words' cross-attention), as a batch's prompts must."""
    for reference in references:
        if not reference.generated:
            try:
                check_prompts_name_subjects([picture_prompt], subjects)
            except InvalidValue as error:
                raise InvalidValue("reference_prompt", picture_prompt,
                                   f"cannot locate the subjects of the picture {reference.path.name}: "
                                   f"{error.problem.replace('the prompt of image 0', 'it')}") from None
            continue  # a picture: inverted with the run's own settings
        try:
            check_prompts_name_subjects([reference.metadata["prompt"]], subjects)
        except InvalidValue as error:
            raise InvalidValue("references", str(reference.path),
                               f"its subjects cannot be found: {error.problem.replace('the prompt of image 0', 'its prompt')}"
                               ) from None
        m = reference.metadata
        theirs = m.get("ckpt_fingerprint")
        if fingerprint is not None and theirs is not None and theirs != fingerprint:
            raise InvalidValue("references", str(reference.path),
                               f"was made with another checkpoint (fingerprint {theirs}, this run's {fingerprint}); "
                               f"use the checkpoint {m.get('ckpt', 'it names')}")
        differing = [f"{key} {m[key]!r} (this run {run[key]!r})" for key in MUST_MATCH
                     if key in run and _differs(m[key], run[key])]
        if differing:
            raise InvalidValue("references", str(reference.path),
                               f"was made with other settings: {'; '.join(differing)}; use the reference's")


def values_to_match(request: Any, geometry: Any) -> dict[str, Any]:
    """A request's values under the metadata's names, for `check_references` (GenerationRequest, LatentGeometry)."""
    height, width = request.size_for(geometry)
    return dict(sampler=request.sampler, steps=request.steps, scale=request.scale, eta=request.eta,
                negative_prompt=request.negative_prompt, H=height, W=width, C=geometry.channels, f=geometry.factor)


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) != float(b)
    return a != b


@torch.no_grad()
def record_reference_anchors(module: Any, references: Sequence[Reference], settings: SharedAttentionSettings,
                             picture_run: Optional[dict[str, Any]] = None
                             ) -> tuple[RecordedAnchors, list[Image.Image], list[float]]:
    """Record the references' keys and values in the layers and step window of `settings` (the new run's):
    a generated PNG's batch is made again (once per batch) and its pixels checked; a picture is
    inverted with `picture_run` (steps, scale, negative_prompt, H, W, prompt). Returns the anchors
    (generated references first, then pictures), their images, and each picture's inversion error."""
    anchors = RecordedAnchors()
    images: list[Image.Image] = []
    by_batch: dict[tuple, list[Reference]] = {}
    for reference in references:
        if reference.generated:
            by_batch.setdefault(reference.batch_key, []).append(reference)
    for group in by_batch.values():
        record, reproduced = _record_generated_batch(module, group, settings)
        anchors.extend(record)
        images += reproduced
    errors = []
    for reference in references:
        if not reference.generated:
            record, image, error = record_picture_anchors(module, reference.image, settings, **picture_run)
            anchors.extend(record)
            images.append(image)
            errors.append(error)
    return anchors, images, errors


def _record_generated_batch(module: Any, group: Sequence[Reference],
                            settings: SharedAttentionSettings) -> tuple[RecordedAnchors, list[Image.Image]]:
    m = group[0].metadata
    picked = [r.metadata["batch_index"] for r in group]
    positions = None
    if settings.subjects:
        positions = subject_positions_for(module, [r.metadata["prompt"] for r in group], settings.subjects)
    recorder = AnchorRecorder(module, settings, picked, subject_positions=positions,
                              seed=int(group[0].metadata["seed"]))
    latent_shape = (m["C"], m["H"] // m["f"], m["W"] // m["f"])
    with recorder.recording() as record:
        latents = generate_latents(module, make_sampler(m["sampler"], module), m["batch_prompts"],
                                   m["batch_seeds"], shape=latent_shape, steps=m["steps"], scale=m["scale"],
                                   eta=m["eta"], negative_prompt=m["negative_prompt"],
                                   sharing=SharedAttentionSettings.from_metadata(m.get("shared_attention")))
    images = tensor_to_images(decode_latents(module, latents[picked]))
    for reference, image in zip(group, images):
        _check_pixels(reference, image)
    return record, images


@torch.no_grad()
def record_picture_anchors(module: Any, picture: Image.Image, settings: SharedAttentionSettings, *, steps: int,
                           scale: float, negative_prompt: str, H: int, W: int, prompt: str = ""
                           ) -> tuple[RecordedAnchors, Image.Image, float]:
    """A picture as an anchor: encoded, DDIM-inverted with `prompt` (conditional eps only: guidance
    makes the inversion drift), and its trajectory's latent at each step run through the UNet with the
    run's guidance, recording its keys and values. Returns the record, the (resized) picture, and the
    inversion's reconstruction error: RMS(x0' - x0) / RMS(x0), x0' sampled back from the inverted x_T."""
    picture = picture.convert("RGB")
    if picture.size != (W, H):
        picture = picture.resize((W, H), Image.LANCZOS)
    x0 = encode_init_image(module, image_to_tensor(picture))  # (1, C, h, w)
    sampler = DDIMSampler(module)
    sampler.make_schedule(steps, ddim_eta=0.0)
    conditional = module.get_learned_conditioning([prompt])
    trajectory = invert(sampler, x0, ClassifierFreeGuidance(module, conditional))
    back = sampler.decode(trajectory[-1], conditional, steps, verbose=False)  # (1, C, h, w)
    error = float((back - x0).pow(2).mean().sqrt() / x0.pow(2).mean().sqrt())
    conditional, unconditional = conditionings(module, [prompt], negative_prompt, scale)
    guide = ClassifierFreeGuidance(module, conditional, unconditional, scale)
    positions = subject_positions_for(module, [prompt], settings.subjects) if settings.subjects else None
    recorder = AnchorRecorder(module, settings, [0], subject_positions=positions)
    with recorder.recording() as record:
        for step in range(steps):  # step 0 is the noisiest: the last latent of the trajectory
            index = steps - 1 - step
            # Subject masks are made from the calls before a step, so every step runs with them.
            if settings.subjects or settings.in_window(step / steps):
                guide(trajectory[index], int(sampler.ddim_timesteps[index]), step, steps)
    return record, picture, error


def _check_pixels(reference: Reference, image: Image.Image) -> None:
    difference = int(np.abs(np.asarray(reference.image, dtype=np.int16) - np.asarray(image, dtype=np.int16)).max())
    if difference > MAX_PIXEL_DIFFERENCE:
        raise InvalidValue("references", str(reference.path),
                           f"made again from its metadata it differs from the file by up to {difference}/255 per "
                           "pixel: another checkpoint, precision or code version made it; nothing was generated")
