"""Classifier-free guidance (Ho & Salimans, 2021): the one object that turns a model into a guided eps.

Every sampler calls `ClassifierFreeGuidance` for each model evaluation and never calls
`model.apply_model` itself, so the batch layout is decided here only:

- Half order: the batch given to the model is `[unconditional; conditional]`, unconditional half
  FIRST (`GUIDANCE_HALVES`). The conditionings are concatenated in that order once, when the helper
  is built; the model output is split with `chunk(2)` in the same order.
- eps = eps_u + scale * (eps_c - eps_u). With scale == 1 or no unconditional conditioning the
  result would equal eps_c, so only the conditional batch is run (half the compute).
- Every model call gets a new `StepContext` (ldm/modules/step_context.py), passed as
  `apply_model(..., step=...)` down to every attention layer: the number of halves (so that nothing
  that looks across a batch, such as batch-shared attention, ever mixes the two halves), the step's
  place in the whole grid (step_index / total_steps, 0 for the first, noisiest step; img2img, which
  runs its last steps only, starts part way) and the latents' size. The step comes from the sampler,
  never from counting model calls (PLMS evaluates the model twice in its first step). This helper
  knows nothing of what the layers do with it.

Assumes latents (B, C, H, W), timesteps shared by the whole batch, and conditionings that are
tensors (B, ...) or lists / dicts of them (CompVis hybrid conditioning), matching key by key.
"""
from __future__ import annotations

from typing import Any

import torch

from ldm.modules.step_context import StepContext

GUIDANCE_HALVES = ("unconditional", "conditional")
"""Order of the two halves of a guided batch; batching and splitting both follow this tuple."""


def _in_half_order(unconditional: Any, conditional: Any) -> list[Any]:
    by_name = {"unconditional": unconditional, "conditional": conditional}
    return [by_name[name] for name in GUIDANCE_HALVES]


def _stack_halves(unconditional: Any, conditional: Any) -> Any:
    """Batch two conditionings in `GUIDANCE_HALVES` order, element by element for lists and dicts."""
    if isinstance(conditional, torch.Tensor):
        if not isinstance(unconditional, torch.Tensor):
            raise TypeError("conditioning is a tensor but unconditional_conditioning is "
                            f"{type(unconditional).__name__}; give both in the same form")
        return torch.cat(_in_half_order(unconditional, conditional))  # (2B, ...)
    if isinstance(conditional, dict):
        if not isinstance(unconditional, dict) or unconditional.keys() != conditional.keys():
            other = sorted(unconditional) if isinstance(unconditional, dict) else type(unconditional).__name__
            raise TypeError("dict conditioning needs an unconditional_conditioning dict with the same keys "
                            f"(got {sorted(conditional)} and {other})")
        return {key: _stack_halves(unconditional[key], conditional[key]) for key in conditional}
    if isinstance(conditional, (list, tuple)):
        if not isinstance(unconditional, (list, tuple)) or len(unconditional) != len(conditional):
            raise TypeError("list conditioning needs an unconditional_conditioning list of the same length")
        return [_stack_halves(u, c) for u, c in zip(unconditional, conditional)]
    raise TypeError(f"cannot batch a conditioning of type {type(conditional).__name__}; use tensors, lists or dicts")


class ClassifierFreeGuidance:
    """Guided noise prediction eps(x, t) for one sampling run.

    Built once per run with the conditionings; then called as `guide(x, t, step_index, total_steps)`.
    """

    def __init__(self, model: Any, conditioning: Any, unconditional_conditioning: Any = None,
                 scale: float = 1.0) -> None:
        self.model = model
        self.scale = float(scale)
        self.guided = unconditional_conditioning is not None and self.scale != 1.0
        if self.guided and conditioning is None:
            raise ValueError("unconditional_guidance_scale != 1 needs a conditioning to guide towards; "
                             "pass conditioning, or set the scale to 1")
        self.conditioning = conditioning
        # Batched once here rather than at every step.
        self._both_halves = _stack_halves(unconditional_conditioning, conditioning) if self.guided else None

    @property
    def halves(self) -> int:
        """How many conditioning halves each model batch holds (2 when guided, else 1)."""
        return 2 if self.guided else 1

    def __call__(self, x: torch.Tensor, t: int, step_index: int, total_steps: int) -> torch.Tensor:
        """eps for latents x (B, C, H, W) at integer timestep t, during step `step_index` of `total_steps`."""
        step = StepContext(halves=self.halves, step_index=step_index, total_steps=total_steps,
                           latent_size=(x.shape[-2], x.shape[-1]))
        if not self.guided:
            t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)  # (B,)
            return self.model.apply_model(x, t_batch, self.conditioning, step=step)
        x_in = torch.cat([x, x])  # (2B, C, H, W) in GUIDANCE_HALVES order
        t_in = torch.full((x_in.shape[0],), int(t), device=x.device, dtype=torch.long)  # (2B,)
        eps = self.model.apply_model(x_in, t_in, self._both_halves, step=step)
        eps_by_half = dict(zip(GUIDANCE_HALVES, eps.chunk(2)))  # (2B, C, H, W) -> 2 x (B, C, H, W)
        eps_unconditional, eps_conditional = eps_by_half["unconditional"], eps_by_half["conditional"]
        return eps_unconditional + self.scale * (eps_conditional - eps_unconditional)
