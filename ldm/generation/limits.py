"""How large a run may be, checked before any work: image size, batch, images, steps, prompts.

The command line and the web page check a request against `Limits` before the model loads, so that
`--H 100000`, `--n_samples 100000` or a prompt file of 10,000 lines is one line of error instead of a
memory exhaustion or hours of sampling without a word. The defaults are generous for a GPU user
(a 2048 px side is 16 times SD v1's 512 px image; 64 images per batch); `--no-limits` (the CLI) lifts
them where a user really means it, `Limits.none()` from Python. The Python API (`GenerationRequest`
and `generate`) applies none: a program asks for what it means.

Reference PNGs are checked against the same limits (their metadata drives a batch made again), and
input pictures against the decoder's own bound (`ldm.generation.images.MAX_INPUT_PIXELS`), which no
flag lifts: those are untrusted files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from ldm.errors import InvalidValue

if TYPE_CHECKING:
    from ldm.generation.model import LatentGeometry
    from ldm.generation.request import GenerationRequest


MAX_SEED = 2 ** 63 - 1  # torch seeds are 64-bit; negative ones alias large ones


@dataclass(frozen=True)
class Limits:
    """The largest run allowed; every bound is inclusive."""

    max_side: float = 2048  # pixels per image side
    max_batch_size: float = 64  # images generated together
    max_images: float = 1000  # images per run (every iteration and prompt; a comparison counts once)
    max_steps: float = 1000  # sampling steps
    max_prompts: float = 1000  # prompts of a prompt file (or per-image prompts)
    max_prompt_chars: float = 2000  # characters per prompt, negative prompt and reference prompt

    @classmethod
    def none(cls) -> "Limits":
        return cls(*(math.inf,) * 6)

    def check_prompts(self, prompts: Sequence[str], field: str = "prompt_file", value: Any = None) -> None:
        """A prompt file's (or per-image) prompts, `value` naming them in the error: how many, how long each."""
        value = f"{len(prompts)} prompts" if value is None else value
        if len(prompts) > self.max_prompts:
            raise InvalidValue(field, value, f"holds {len(prompts)} prompts; at most {self.max_prompts:g} per run "
                               "({limits} lifts this)", mentions=("limits",))
        for number, text in enumerate(prompts, 1):
            if len(text) > self.max_prompt_chars:
                raise InvalidValue(field, value, f"prompt {number} is {len(text)} characters long; at most "
                                   f"{self.max_prompt_chars:g} (CLIP reads the first 77 tokens; {{limits}} lifts "
                                   "this)", mentions=("limits",))

    def check(self, request: "GenerationRequest", geometry: "LatentGeometry") -> None:
        """The request's size, batch, images, steps and texts; InvalidValue naming the field."""
        height, width = request.size_for(geometry)
        field = "init_image" if request.img2img else None
        for name, side in (("height", height), ("width", width)):
            if side > self.max_side:
                raise InvalidValue(field or name, f"{width}x{height}" if field else side,
                                   f"at most {self.max_side:g} pixels per side (a larger image needs more memory "
                                   "than most GPUs have; {limits} lifts this)", mentions=("limits",))
        for name, value, limit in (("batch_size", request.batch_size, self.max_batch_size),
                                   ("steps", request.steps, self.max_steps)):
            if value > limit:
                raise InvalidValue(name, value, f"at most {limit:g} ({{limits}} lifts this)", mentions=("limits",))
        if request.image_count > self.max_images:
            raise InvalidValue("n_iter", request.n_iter, f"the run would make {request.image_count} images, more "
                               f"than {self.max_images:g} ({{limits}} lifts this)", mentions=("limits",))
        if not isinstance(request.prompt, str):
            self.check_prompts(request.prompt, "prompt")
        texts = [("negative_prompt", request.negative_prompt), ("reference_prompt", request.reference_prompt)]
        for name, text in ([("prompt", request.prompt)] if isinstance(request.prompt, str) else []) + texts:
            if len(text) > self.max_prompt_chars:
                raise InvalidValue(name, text, f"is {len(text)} characters long; at most {self.max_prompt_chars:g} "
                                   "(CLIP reads the first 77 tokens; {limits} lifts this)", mentions=("limits",))
