"""ControlNet control during sampling: which residuals the UNet gets at one model call.

A run is described once, before sampling, by a frozen `ControlRun`: one `ControlUnit` per ControlNet, each
with its hint images, its scale, its step window and whether it runs in guess mode. At every model call the
guidance helper asks `control_residuals(run, x, t, context, halves, progress)` for the residuals and hands
them to `UNetModel.forward(control=...)`, which adds them to the skip connections and the middle block's
output. The UNet's self-attention, where batch sharing lives, is untouched: control only shifts the features
the shared layers read.

Conventions (those of `ldm/models/diffusion/guidance.py`):
- The model batch holds `halves` guidance halves in `GUIDANCE_HALVES` order, unconditional first:
  x (halves * B, C, h, w), t (halves * B,), context (halves * B, 77, D).
- Hints are images in [0, 1] (the inpainting ControlNet's mask: -1), (N, C_hint, 8h, 8w): N = 1 (the same hint for every image) or N = B (one per
  image of the batch: a pose per frame). Both halves of image i read hint i.
- `progress` = step index / number of steps of the whole grid, 0 at the first (noisiest) step; a unit acts
  at the steps with start <= progress < end (the rule of the sharing step window); None (outside a sampler)
  counts as inside every window.

What each unit adds, as published (ControlNet v1.1's ControlLDM, diffusers' pipelines):
- every residual times `scale`;
- guess mode: the ControlNet sees the conditional half only (the unconditional half gets no control, as if
  it had no hint), and residual i of n is scaled by scale * 0.825 ** (n - 1 - i), so the deep residuals weigh
  most (the published factor; diffusers' pipelines use 10 ** (-(n - 1 - i) / (n - 1)), within 0.6% of it);
- several ControlNets: their residuals are summed.
When no unit acts at a step, `control_residuals` returns None and the UNet runs exactly as without control.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ldm.errors import InvalidValue

GUESS_MODE_DECAY = 0.825  # the published per-residual factor of guess mode (ControlNet v1.1's gradio apps)


def guess_mode_scales(count: int, scale: float = 1.0) -> list[float]:
    """scale * 0.825 ** (count - 1 - i) for residual i of `count`: 1 at the middle block, 0.825 ** 12 ~ 0.1 at
    the first of SD v1's 13 residuals."""
    return [scale * GUESS_MODE_DECAY ** (count - 1 - i) for i in range(count)]


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet and what it is given for a run.

    `hints` (N, C_hint, H, W) in [0, 1]: N = 1 for every image of a batch, or one per image. `steps`: the
    (start, end) fraction of the steps at which it acts. `name` and `fingerprint` say which file it came from
    (for the images' metadata)."""

    model: nn.Module = field(repr=False, compare=False)
    hints: torch.Tensor = field(repr=False, compare=False)
    scale: float = 1.0
    steps: tuple[float, float] = (0.0, 1.0)
    guess_mode: bool = False
    name: str = ""
    fingerprint: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", (float(self.steps[0]), float(self.steps[1])))
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not math.isfinite(self.scale):
            raise InvalidValue("scale", self.scale, "the control scale must be a finite number (1 as published)")
        start, end = self.steps
        if not 0.0 <= start < end <= 1.0:
            raise InvalidValue("steps", self.steps, f"the step window {start:g}:{end:g} must satisfy 0 <= start < end "
                                                    "<= 1 (fractions of the steps)")
        hints = self.hints
        if not isinstance(hints, torch.Tensor) or hints.dim() != 4:
            raise InvalidValue("hints", getattr(hints, "shape", hints), "hints must be a tensor (N, C, H, W)")
        channels = getattr(self.model, "hint_channels", hints.shape[1])
        if hints.shape[1] != channels:
            raise InvalidValue("hints", tuple(hints.shape), f"this ControlNet reads {channels}-channel hints")
        if not torch.isfinite(hints).all():  # not [0, 1]: the inpainting ControlNet marks its mask with -1
            raise InvalidValue("hints", tuple(hints.shape), "hint values must be finite numbers")

    def acts_at(self, progress: Optional[float]) -> bool:
        start, end = self.steps
        return progress is None or start <= progress < end

    def hints_for(self, batch: int) -> torch.Tensor:
        """The hints of a batch of `batch` images: (batch, C_hint, H, W)."""
        count = self.hints.shape[0]
        if count == 1:
            return self.hints.expand(batch, -1, -1, -1)
        if count != batch:
            raise InvalidValue("hints", count, f"give one control image for every image, or one per image of the "
                                               f"batch ({batch}), not {count}")
        return self.hints

    def as_metadata(self) -> dict[str, Any]:
        return {"controlnet": self.name, "fingerprint": self.fingerprint, "scale": self.scale,
                "steps": f"{self.steps[0]:g}:{self.steps[1]:g}", "guess_mode": self.guess_mode,
                "hints": int(self.hints.shape[0])}


@dataclass(frozen=True)
class ControlRun:
    """The ControlNets of a run (their residuals are summed); built once, before sampling."""

    units: tuple[ControlUnit, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", tuple(self.units))
        if not self.units:
            raise InvalidValue("units", 0, "a control run needs at least one ControlNet")
        counts = {unit.model.residual_count for unit in self.units}
        if len(counts) > 1:
            raise InvalidValue("units", sorted(counts), "ControlNets combined in one run must fit the same UNet")

    def check_batch(self, batch: int, image_size: tuple[int, int]) -> None:
        """Refuse hints that cannot serve a batch of `batch` images of (height, width) `image_size`: checked
        before sampling, so a bad run fails before its first step."""
        for index, unit in enumerate(self.units):
            try:
                unit.hints_for(batch)
                if tuple(unit.hints.shape[-2:]) != tuple(image_size):
                    raise InvalidValue("hints", tuple(unit.hints.shape[-2:]),
                                       f"control images must have the images' size {image_size[1]}x{image_size[0]} "
                                       f"(width x height), not {unit.hints.shape[-1]}x{unit.hints.shape[-2]}")
            except InvalidValue as error:
                raise error.within(f"units[{index}]") from None

    def as_metadata(self) -> list[dict[str, Any]]:
        return [unit.as_metadata() for unit in self.units]


def control_residuals(run: Optional[ControlRun], x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      halves: int, progress: Optional[float]) -> Optional[list[torch.Tensor]]:
    """The summed, scaled residuals of the run's ControlNets for one model call, or None when none acts.

    x (halves * B, C, h, w), t (halves * B,), context (halves * B, 77, D) in `GUIDANCE_HALVES` order
    (unconditional first). Returns one tensor per UNet skip connection and one for the middle block, each
    (halves * B, C_i, h_i, w_i) (or (.., 1, 1) for a ControlNet with global average pooling)."""
    if run is None:
        return None
    if halves not in (1, 2) or x.shape[0] % halves:
        raise ValueError(f"a batch of {x.shape[0]} cannot hold {halves} guidance halves")
    batch = x.shape[0] // halves
    total: Optional[list[torch.Tensor]] = None
    for unit in run.units:
        if not unit.acts_at(progress):
            continue
        residuals = _unit_residuals(unit, x, t, context, halves, batch)
        total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
    return total


def _unit_residuals(unit: ControlUnit, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, halves: int,
                    batch: int) -> list[torch.Tensor]:
    hints = unit.hints_for(batch).to(x.device)  # (B, C_hint, H, W)
    if unit.guess_mode and halves == 2:
        conditional = slice(batch, 2 * batch)  # the second half (GUIDANCE_HALVES: unconditional first)
        residuals = unit.model(x[conditional], hints, t[conditional], context[conditional])
        scales = guess_mode_scales(len(residuals), unit.scale)
        # The unconditional half gets zero residuals: adding them leaves its features exactly as without control.
        return [torch.cat([torch.zeros_like(r), r * s]) for r, s in zip(residuals, scales)]  # (2B, C_i, h_i, w_i)
    residuals = unit.model(x, hints.repeat(halves, 1, 1, 1), t, context)  # hint i serves image i in each half
    scales = guess_mode_scales(len(residuals), unit.scale) if unit.guess_mode else [unit.scale] * len(residuals)
    return [r * s for r, s in zip(residuals, scales)]
