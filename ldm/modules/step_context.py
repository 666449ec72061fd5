"""What one model call tells its attention layers: the step context and, per layer, the token grid.

Attention layers that do more than plain attention (batch-shared self-attention, the readers of
cross-attention, recorders) need to know things the layer's input does not say: how many
classifier-free-guidance halves the batch holds, which sampling step is running, the latent size.
Those are passed explicitly, as call arguments, from whoever calls the model down to every layer:

- `StepContext` is built once per model call by its caller. The guidance helper
  (`ldm/models/diffusion/guidance.py`) builds it from what the sampler tells it (the step's place in
  the whole grid) and what it knows itself (the halves, the latents' size); the UNet makes a plain one
  (one half, no step) when it is called without. It goes through `apply_model` and `UNetModel.forward`
  into every transformer, unchanged.
- `LayerCall` is what an attention layer receives: that step context and the (h, w) token grid of the
  feature map the layer's transformer runs on, which the transformer knows from its input.

One `StepContext` object stands for one model call: layers that keep state across calls (the subject
masks of batch sharing, which are made from the calls before) tell calls apart by the object, so a
caller builds a new one for every call and never reuses it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

# The latent side of SD v1 at 512 px at downsampling factor 1: layer tags name levels by 64 / ds
# (`down.64`, `mid.8`, ...; ldm/modules/diffusionmodules/openaimodel.py).
TAG_BASE_RESOLUTION = 64


@dataclass(frozen=True, eq=False)
class StepContext:
    """One model call: `halves` guidance halves in the batch ([unconditional; conditional] when 2),
    step `step_index` (0 = the first, noisiest) of a `total_steps`-step grid (None outside a sampler),
    and the latents' (h, w) `latent_size`. Compared by identity: one object per call."""

    halves: int = 1
    step_index: Optional[int] = None
    total_steps: Optional[int] = None
    latent_size: Optional[tuple[int, int]] = None

    def __post_init__(self) -> None:
        if self.halves < 1:
            raise ValueError(f"a batch holds at least one guidance half, got {self.halves}")
        if (self.step_index is None) != (self.total_steps is None):
            raise ValueError("give both the step index and the number of steps, or neither")

    @property
    def progress(self) -> Optional[float]:
        """step index / number of steps: 0 at the first step of the whole grid; None outside a sampler.
        img2img, which samples the grid's last steps, starts part way."""
        if self.step_index is None:
            return None
        return self.step_index / self.total_steps

    def token_grid(self, tag: str) -> tuple[int, int]:
        """The (h, w) token grid of a layer of level `tag` (e.g. "up.32") on these latents: each level below
        the first halves the grid, rounding up as the UNet's stride-2 convolutions (padding 1) do."""
        if self.latent_size is None:
            raise ValueError("this step context has no latent size to derive token grids from")
        factor = TAG_BASE_RESOLUTION // int(tag.split(".")[1])
        return math.ceil(self.latent_size[0] / factor), math.ceil(self.latent_size[1] / factor)


@dataclass(frozen=True)
class LayerCall:
    """What one attention layer receives besides its input: the model call's step context and the
    (h, w) token grid of its feature map (tokens are the grid's cells, row-major)."""

    step: StepContext
    grid: tuple[int, int]
