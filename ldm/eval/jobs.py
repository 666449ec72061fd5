"""Jobs of the consistency evaluation, and generating and measuring them.

A job is one (configuration, seed, prompt set); image i of the set with seed s starts from the noise
of seed `s * SEED_STRIDE + i`, the same in every configuration, so differences between configurations
come from sharing alone. `SetRunner` generates a job's set in one batch through the generation core
(`ldm.generation.generate`: DDIM, eta 0, the model's native size), times sampling and decoding, and
measures the images with an instrument (`ldm.eval.instruments`). A job's prompt is its line of the
prompt file: one prompt for every image, or a story with one per image (`ldm.eval.prompt_sets`).
"""
from __future__ import annotations

import contextlib
import io
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from ldm.eval.configurations import Configuration
from ldm.eval.prompt_sets import generation_prompt
from ldm.eval.subject_mask_iou import MaskRecorder, step_ious
from ldm.generation.generate import generate
from ldm.generation.model import LoadedModel
from ldm.generation.request import GenerationRequest
from ldm.sharing import SharedAttentionSettings

SEED_STRIDE = 1000  # image i of the set with seed s uses seed s * SEED_STRIDE + i


@dataclass(frozen=True)
class Job:
    """One prompt set of one configuration and seed; `index` is its place in the full, ordered list."""

    index: int
    configuration: str
    seed: int
    set_index: int
    prompt: str


def image_seeds(seed: int, set_size: int) -> list[int]:
    return [seed * SEED_STRIDE + i for i in range(set_size)]


def make_jobs(configurations: Sequence[Configuration], seeds: Sequence[int], prompts: Sequence[str]) -> list[Job]:
    """Every (configuration, seed, prompt set), ordered by configuration, then seed, then set."""
    triples = [(c.name, s, p) for c in configurations for s in seeds for p in range(len(prompts))]
    return [Job(i, name, seed, p, prompts[p]) for i, (name, seed, p) in enumerate(triples)]


@dataclass
class SetResult:
    job: Job
    image_seeds: list[int]
    metrics: dict[str, float]
    labels: dict[str, list[str]]
    seconds: float
    peak_memory_mb: float
    images_png: list[bytes] = field(default_factory=list)  # only for the seed shown in the grids
    # With subject masks and a segmenter: per step, the IoU of the sharing masks (ldm.eval.subject_mask_iou).
    mask_iou_by_step: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Sampling:
    """How every set is generated: DDIM with eta 0, `set_size` images at the model's native size."""

    steps: int
    scale: float
    set_size: int
    precision: str = "full"

    def request(self, prompt: str, first_seed: int, sharing: Optional[SharedAttentionSettings],
                steps: Optional[int] = None) -> GenerationRequest:
        """The generation of one set (`prompt` a line of the prompt file): image i from seed first_seed + i."""
        return GenerationRequest(prompt=generation_prompt(prompt, self.set_size), seed=first_seed,
                                 batch_size=self.set_size, sampler="ddim", steps=steps or self.steps,
                                 scale=self.scale, eta=0.0, sharing=sharing, precision=self.precision)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
    except ImportError:  # not on Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10  # bytes on macOS, KiB on Linux


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class SetRunner:
    """Generates and measures jobs with one model and instrument."""

    def __init__(self, model: LoadedModel, instrument: Any, configurations: Sequence[Configuration],
                 sampling: Sampling, device: torch.device) -> None:
        self.model, self.instrument = model, instrument
        self.sampling, self.device = sampling, device
        self.sharing = {c.name: c.sharing for c in configurations}

    def images(self, prompt: str, first_seed: int, sharing: Optional[SharedAttentionSettings],
               steps: Optional[int] = None) -> list[Image.Image]:
        return generate(self.model, self.sampling.request(prompt, first_seed, sharing, steps)).images

    def warm_up(self, prompt: str) -> None:
        """One short untimed run, so the first configuration's time does not include first-call costs."""
        self.images(prompt, image_seeds(0, self.sampling.set_size)[0], None, steps=1)

    def records_masks(self, sharing: Optional[SharedAttentionSettings]) -> bool:
        """Whether a job's subject masks are recorded: with subject words and an instrument that segments."""
        return sharing is not None and bool(sharing.subjects) and hasattr(self.instrument, "segment")

    def run(self, job: Job, keep_images: bool) -> SetResult:
        seeds = image_seeds(job.seed, self.sampling.set_size)
        sharing = self.sharing[job.configuration]
        recorder = MaskRecorder(self.model.module) if self.records_masks(sharing) else None
        reset_peak_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        with recorder if recorder is not None else contextlib.nullcontext():
            images = self.images(job.prompt, seeds[0], sharing)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start  # the recorder's copy of one small mask per step is included
        memory = peak_memory_mb(self.device)
        metrics, labels = self.instrument.measure(job.prompt, images)
        ious = []
        if recorder is not None:
            if len(recorder.steps) != self.sampling.steps:  # DDIM: one model call per step
                raise RuntimeError(f"recorded {len(recorder.steps)} subject masks for {self.sampling.steps} steps")
            ious = step_ious(recorder.steps, self.instrument.segment(images))
        return SetResult(job, seeds, metrics, labels, seconds, memory,
                         [png_bytes(image) for image in images] if keep_images else [], ious)
