"""A front end's values in, a checked run out: every value and file that can be checked without the
weights is checked here, each file read once, before the slow checkpoint load.

Order (so that the first problem found is the one a user would fix first): the sharing options, the
prompt file, the config, the checkpoint and its fit to the config and task, the init image and mask,
the request itself (values, then against the config, then against the run's `Limits`), the
references, the output folder, the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from ldm.errors import InvalidValue, SettingsError
from ldm.generation.builder.model_files import check_model, resolve_path
from ldm.generation.builder.sharing import sharing_settings
from ldm.generation.builder.values import RunValues, with_model_defaults
from ldm.generation.inputs import fit_to_multiple, open_image, read_prompt_file
from ldm.generation.model import ModelSpec, choose_device
from ldm.generation.outputs import check_output_folder
from ldm.generation.reference import Reference, check_references, read_reference, reference_notes, values_to_match
from ldm.generation.request import GenerationRequest


@dataclass(frozen=True)
class OutputPlan:
    """Where and what to save: `folder` None leaves saving to the caller."""

    folder: Optional[Path]
    samples: bool = True
    grid: bool = True
    images_per_row: Optional[int] = None  # None: the batch size


@dataclass(frozen=True)
class PreparedRun:
    """Everything checked and resolved before the model loads, and what to tell the user about it
    (`notes`: warnings for stderr; `info`: for stdout)."""

    request: GenerationRequest
    spec: ModelSpec
    ckpt: Path
    device: torch.device
    use_ema: bool
    output: OutputPlan
    notes: tuple[str, ...] = ()
    info: tuple[str, ...] = ()


def prepare_run(values: RunValues) -> PreparedRun:
    """Check `values` and read their files; raises InvalidValue, SettingsError, ConfigError, CheckpointError
    or an OSError naming what was wrong."""
    values = with_model_defaults(values)
    notes: list[str] = []
    info: list[str] = []
    sharing = sharing_settings(values.sharing, values.compare)
    prompt = _prompt(values)
    model = check_model(values.config, values.ckpt, demo=values.demo, inpainting=values.mask_image is not None,
                        channels=values.channels, factor=values.factor)
    init_image, mask_image = _pictures(values, model.spec, info)
    request = GenerationRequest(
        prompt=prompt, negative_prompt=values.negative_prompt, seed=values.seed, batch_size=values.batch_size,
        n_iter=values.n_iter, fixed_code=values.fixed_code, sampler=values.sampler, steps=values.steps,
        scale=values.scale, eta=values.eta, height=values.height, width=values.width, init_image=init_image,
        init_image_name=_name(values.init_image), strength=values.strength, sharing=sharing, compare=values.compare,
        precision=values.precision, references=tuple(values.references), reference_prompt=values.reference_prompt,
        reference_cache=values.reference_cache, mask_image=mask_image, mask_image_name=_name(values.mask_image))
    request.check_for(model.spec)
    values.limits.check(request, model.spec.geometry)
    if request.references:  # read once, checked against the run before the weights load
        from ldm.checkpoint import checkpoint_fingerprint
        references = tuple(r if isinstance(r, Reference) else read_reference(r, values.limits)
                           for r in request.references)
        check_references(references, values_to_match(request, model.spec.geometry),
                         checkpoint_fingerprint(model.ckpt), request.sharing.subjects, request.reference_prompt)
        notes += reference_notes(references, *request.size_for(model.spec.geometry), request.reference_prompt)
        request = request.with_references(references)
    if sharing is not None and sharing.mode == "anchor" and sharing.anchors >= request.batch_size:
        notes.append(f"{sharing.anchors} anchors with {request.batch_size} images per batch: every image is an "
                     "anchor, which is the same as mode all")
    output = _output_plan(values)
    return PreparedRun(request, model.spec, model.ckpt, choose_device(values.device), values.use_ema, output,
                       tuple(notes), tuple(info))


def _prompt(values: RunValues) -> str | tuple[str, ...]:
    if values.prompt_file is not None:
        prompts = tuple(read_prompt_file(resolve_path(values.prompt_file)))
        values.limits.check_prompts(prompts, "prompt_file", values.prompt_file)
        return prompts
    if values.prompts is not None:
        return tuple(values.prompts)
    return values.prompt


def _name(path: Optional[str]) -> Optional[str]:
    return None if path is None else Path(path).name


def _pictures(values: RunValues, spec: ModelSpec, info: list[str]) -> tuple[Optional[Image.Image], Optional[Image.Image]]:
    """The init image fitted to the model, and the mask at its size (each read once)."""
    if values.init_image is None:
        if values.mask_image is not None:
            raise SettingsError("{mask_image} needs {init_image}, the picture to repaint", "mask_image", "init_image")
        return None, None
    opened = open_image(values.init_image)
    init_image = fit_to_multiple(opened, spec.geometry.pixel_multiple)
    if init_image.size != opened.size:
        info.append(f"init image {_name(values.init_image)}: {opened.width}x{opened.height} resized to "
                    f"{init_image.width}x{init_image.height} (a multiple of {spec.geometry.pixel_multiple})")
    if values.mask_image is None:
        return init_image, None
    mask = open_image(values.mask_image, field="mask_image", what="mask")
    if mask.size != opened.size:
        raise SettingsError(f"{{mask_image}} {values.mask_image} is {mask.width}x{mask.height} but {{init_image}} "
                            f"{values.init_image} is {opened.width}x{opened.height}; give a mask of the picture's size",
                            "mask_image", "init_image")
    return init_image, mask.resize(init_image.size, resample=Image.Resampling.NEAREST)


def _output_plan(values: RunValues) -> OutputPlan:
    if isinstance(values.images_per_row, bool) or not isinstance(values.images_per_row, int) \
            or values.images_per_row < 0:
        raise InvalidValue("images_per_row", values.images_per_row,
                           "give a positive number of images per grid row, or 0 for the batch size")
    folder = None
    if values.outdir is not None:
        check_output_folder(values.outdir)
        folder = Path(values.outdir)
    return OutputPlan(folder, values.save_samples, values.save_grid, values.images_per_row or None)
