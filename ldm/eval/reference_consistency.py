"""How consistent new images are with a reference, measured by the world v2's scene classifier.

A *unit* is (subject, seed). Its references: a generated PNG (the model's own image of the subject's
reference prompt, from the seed, alone) and a rendered scene (a random scene showing that prompt,
drawn by the renderer from the seed, DDIM-inverted with the same prompt). Its new images: one per
prompt of `OTHER_SCENES[subject]`, each naming another background than the reference's prompt
(which names none), generated as one batch from seeds `SEED_STRIDE * seed + i`.

Conditions (every unit runs all of them, with the same new-image seeds):
- `none`: no sharing. Its match against either reference is the chance level.
- `png-<groups>`: the generated PNG as `--shared-attn-reference`, anchor mode, in `groups`.
- `render-<groups>`: the rendered scene as the reference (inverted with the reference prompt).

The measure, fixed before any result was seen: for each new image, the share of the subject's
appearance attributes (`APPEARANCE`: colour and pattern for furniture; skin, hair colour, hair style,
glasses and shirt for a face) that its prompt leaves open and whose classifier reading equals the
reference's value: for the generated PNG the classifier's reading of the PNG, for a render its ground
truth (the renderer's scene). Background and layout attributes are left out: the new prompts change
the background on purpose, and layout is meant to vary. A unit's value is the mean over its new
images; a condition's is the mean (and std) over seeds, per subject and over both subjects.
`none` is reported against both references (`none` vs PNG, `none` vs render).
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ldm.data.prompts import parse_prompt, scene_for_prompt
from ldm.data.render import render_scene
from ldm.eval.metrics_v2 import open_attributes
from ldm.generation import DEMO_SCALE, GenerationRequest, LoadedModel, generate, save_result
from ldm.generation.images import image_to_tensor
from ldm.sharing import SharedAttentionSettings

# The reference's prompt per subject, and the other scenes the new images are asked for.
REFERENCE_PROMPTS: dict[str, str] = {"furniture": "a chair", "face": "a face"}
OTHER_SCENES: dict[str, tuple[str, ...]] = {
    "furniture": ("a chair in a green room", "a chair on grass", "a chair in a blue room", "a chair on a tiled floor"),
    "face": ("a face against a green background", "a face against a red background",
             "a face against a yellow background", "a face against a blue background"),
}
APPEARANCE: dict[str, tuple[str, ...]] = {
    "furniture": ("colour", "pattern"),
    "face": ("skin", "hair_colour", "hair_style", "glasses", "shirt"),
}
SEED_STRIDE = 1000
REFERENCE_KINDS = ("png", "render")


@dataclass(frozen=True)
class ReferenceEvalRequest:
    """A run, checked by the script: seeds, layer groups, sampling, and the subjects measured."""

    seeds: tuple[int, ...]
    groups: tuple[str, ...] = ("up", "all")
    subjects: tuple[str, ...] = ("furniture", "face")
    steps: int = 25
    scale: float = DEMO_SCALE
    precision: str = "full"

    @property
    def conditions(self) -> list[tuple[str, Optional[str], Optional[str]]]:
        """(name, reference kind or None, groups or None) in report order."""
        return [("none", None, None)] + [(f"{kind}-{g}", kind, g) for kind in REFERENCE_KINDS for g in self.groups]

    @property
    def units(self) -> list[tuple[str, int]]:
        return [(subject, seed) for subject in self.subjects for seed in self.seeds]

    @property
    def generations(self) -> int:
        """Generate calls per run, for a progress bar: per unit the PNG reference and every condition."""
        return len(self.units) * (1 + len(self.conditions))


@dataclass(frozen=True)
class UnitResult:
    subject: str
    seed: int
    condition: str
    against: str  # "png" or "render": which reference the new images are compared with
    match: float  # mean over the new images of the share of open appearance attributes equal to the reference's
    per_attribute: dict[str, float]  # share of new images (leaving it open) matching, per attribute


def appearance_match(predictions: Mapping[str, Sequence[Optional[str]]], prompts: Sequence[str],
                     reference: Mapping[str, Optional[str]], attributes: Sequence[str]) -> tuple[float, dict[str, float]]:
    """(mean over images of the share of their open `attributes` read as `reference`'s value, per attribute
    share); an attribute the reference lacks (None) or an image's prompt names is not counted."""
    per_image, per_attribute = [], {a: [] for a in attributes}
    for index, prompt in enumerate(prompts):
        open_here = [a for a in attributes if a in open_attributes(parse_prompt(prompt)) and reference.get(a)]
        hits = [predictions[a][index] == reference[a] for a in open_here]
        for a, hit in zip(open_here, hits):
            per_attribute[a].append(hit)
        if hits:
            per_image.append(float(np.mean(hits)))
    share = {a: float(np.mean(v)) if v else math.nan for a, v in per_attribute.items()}
    return (float(np.mean(per_image)) if per_image else math.nan), share


def classify(classifier, images: Sequence[Image.Image]) -> dict[str, list[Optional[str]]]:
    batch = torch.cat([image_to_tensor(image) for image in images])  # (B, 3, H, W) in [-1, 1]
    return classifier.predict(batch)


def run_unit(model: LoadedModel, classifier, request: ReferenceEvalRequest, subject: str, seed: int,
             folder: Path, tick: Callable[[], None] = lambda: None
             ) -> tuple[list[UnitResult], dict[str, list[Image.Image]]]:
    """Every condition of one (subject, seed): its results and, per condition, [reference, new images...]."""
    reference_prompt, prompts = REFERENCE_PROMPTS[subject], OTHER_SCENES[subject]
    common = dict(steps=request.steps, scale=request.scale, precision=request.precision)
    size = model.geometry.native_size
    # The two references and the values the new images are compared with.
    png_result = generate(model, GenerationRequest(prompt=reference_prompt, seed=seed, batch_size=1, **common))
    tick()
    png_path = save_result(png_result, folder / f"{subject}-{seed}-png", grid=False)[0]
    png_image = png_result.images[0]
    scene = scene_for_prompt(reference_prompt, np.random.default_rng(seed))
    render = Image.fromarray(render_scene(scene, size).image)
    render_path = folder / f"{subject}-{seed}-render.png"
    render.save(render_path)  # no generation metadata: a picture, inverted
    truth = {"png": {k: v[0] for k, v in classify(classifier, [png_image]).items()}, "render": scene.labels()}
    shown = {"png": png_image, "render": render}
    attributes = APPEARANCE[subject]
    results, rows = [], {}
    for name, kind, groups in request.conditions:
        new = GenerationRequest(prompt=prompts, seed=SEED_STRIDE * seed, batch_size=len(prompts), **common)
        if kind is not None:
            sharing = SharedAttentionSettings(groups=(groups,), mode="anchor")
            new = GenerationRequest(prompt=prompts, seed=SEED_STRIDE * seed, batch_size=len(prompts), sharing=sharing,
                                    references=(str(png_path if kind == "png" else render_path),),
                                    reference_prompt=reference_prompt, **common)
        images = generate(model, new).images
        tick()
        predictions = classify(classifier, images)
        for against in ((kind,) if kind else REFERENCE_KINDS):
            match, per_attribute = appearance_match(predictions, prompts, truth[against], attributes)
            results.append(UnitResult(subject, seed, name, against, match, per_attribute))
        rows[name] = [shown[kind] if kind else png_image, *images]
    return results, rows


def evaluate_references(model: LoadedModel, classifier, request: ReferenceEvalRequest,
                        tick: Callable[[], None] = lambda: None
                        ) -> tuple[list[UnitResult], dict[tuple[str, int], dict[str, list[Image.Image]]]]:
    """Every unit of `request`: all results, and the grid rows of each unit."""
    results, grids = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for subject, seed in request.units:
            unit, rows = run_unit(model, classifier, request, subject, seed, Path(folder), tick)
            results += unit
            grids[(subject, seed)] = rows
    return results, grids


def summarize_references(results: Sequence[UnitResult], request: ReferenceEvalRequest) -> list[dict]:
    """Mean and std over seeds per (condition, compared reference), per subject and over all units."""
    rows = []
    keys = [("none", k) for k in REFERENCE_KINDS] + [(name, kind) for name, kind, _ in request.conditions if kind]
    for name, against in keys:
        for subject in (*request.subjects, "all"):
            values = [r.match for r in results if r.condition == name and r.against == against
                      and subject in (r.subject, "all") and not math.isnan(r.match)]
            rows.append({"condition": name, "against": against, "subject": subject, "units": len(values),
                         "mean": float(np.mean(values)) if values else math.nan,
                         "std": float(np.std(values)) if values else math.nan})
    return rows
