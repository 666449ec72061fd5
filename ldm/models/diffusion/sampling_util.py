"""What the samplers share: timestep grids, the DDIM update, and the base class with the sampling loop.

Conventions for every sampler (DDIM, PLMS, DPM-Solver):
- A grid holds S distinct integer timesteps in [0, num_timesteps - 1], stored ASCENDING
  (`ddim_timesteps`, as in CompVis) and visited in descending order. `index` is a position in that
  ascending array; `step_index` counts steps in sampling order (0 = first, noisiest step).
- `alphas_cumprod[t]` is \\bar{alpha}_t of x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps. Step `index` goes
  from level `ddim_alphas[index]` to `ddim_alphas_prev[index]`; the last step lands on
  alphas_cumprod[0] (CompVis' choice), not on a noise-free level 1.
- Schedule values are kept in float64 and enter the update as Python floats, so the arithmetic keeps
  the latent's dtype and device and the coefficients carry no float32 rounding of their own.
- Latents are (B, C, H, W). The model is called only through `ClassifierFreeGuidance`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from ldm.models.diffusion.guidance import ClassifierFreeGuidance

StepResult = tuple[torch.Tensor, torch.Tensor]  # (x at the next level, predicted x_0)


def check_num_steps(num_steps: int, num_timesteps: int) -> None:
    if not 1 <= int(num_steps) <= num_timesteps:
        raise ValueError(f"number of sampling steps must be between 1 and {num_timesteps} (the model's "
                         f"training timesteps), got {num_steps}")


def leading_timesteps(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """CompVis' "uniform" DDIM grid: multiples of T // S plus one, ascending, exactly S entries.

    CompVis builds `range(0, T, T // S)`, which has more than S entries whenever S does not divide T
    and then reaches index T (it crashes for S = 3, 9, 27, 36, ...). Taking the first S multiples
    gives diffusers' `timestep_spacing="leading", steps_offset=1` grid. The +1 offset is dropped only
    when it would reach index T, which happens for S == T alone.
    """
    check_num_steps(num_steps, num_timesteps)
    timesteps = np.arange(num_steps, dtype=np.int64) * (num_timesteps // num_steps)
    offset = 1 if timesteps[-1] + 1 < num_timesteps else 0
    return timesteps + offset


def linspace_timesteps(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """Time-uniform grid: S rounded points of linspace(0, T - 1, S + 1) without the 0, ascending.

    This is DPM-Solver's "time_uniform" skip type on integer timesteps (diffusers'
    `timestep_spacing="linspace"`); the last step goes down to level alphas_cumprod[0]. The spacing
    (T - 1) / S is at least 1 for S < T, so rounding never repeats a timestep; for S == T every
    timestep is used and the final step (t = 0 to level alphas_cumprod[0]) has size zero.
    """
    check_num_steps(num_steps, num_timesteps)
    if num_steps == num_timesteps:
        return np.arange(num_timesteps, dtype=np.int64)
    return np.linspace(0, num_timesteps - 1, num_steps + 1).round()[1:].astype(np.int64)


TIMESTEP_GRIDS: dict[str, Callable[[int, int], np.ndarray]] = {
    "leading": leading_timesteps,
    "linspace": linspace_timesteps,
}


def ddim_sigmas(alphas: torch.Tensor, alphas_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIM noise scale (Song et al. 2021, eq. 16): eta * sqrt((1-a_prev)/(1-a)) * sqrt(1 - a/a_prev)."""
    return eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))


# One generator for a whole batch, or one per image (see `draw_noise`).
Generators = Optional[Union[torch.Generator, Sequence[torch.Generator]]]


def ddim_update(x: torch.Tensor, eps: torch.Tensor, alpha: float, alpha_prev: float,
                sigma: float = 0.0, noise: Optional[torch.Tensor] = None) -> StepResult:
    """One DDIM step (Song et al. 2021, eq. 12) from level `alpha` to level `alpha_prev`.

    pred_x0 = (x - sqrt(1-a) eps) / sqrt(a);
    x_prev = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * noise.
    """
    pred_x0 = (x - math.sqrt(1.0 - alpha) * eps) / math.sqrt(alpha)
    x_prev = math.sqrt(alpha_prev) * pred_x0 + math.sqrt(1.0 - alpha_prev - sigma ** 2) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def draw_noise(shape: tuple[int, ...], generator: Generators, device: torch.device,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn from `generator` when given.

    `generator` may be one generator for the whole tensor or a sequence with one generator per entry of
    the first (batch) dimension; then image i's noise is the next draw of its own generator, so it does
    not depend on the image's batch position or on its batch mates. Noise is drawn on the generator's
    own device and then moved (`to_device_without_waiting`), so a CPU generator also works for a GPU model.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; give one per image")
        noise = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return to_device_without_waiting(torch.stack(noise), device)
    source = generator.device if generator is not None else device
    return to_device_without_waiting(torch.randn(shape, generator=generator, device=source, dtype=dtype), device)


def to_device_without_waiting(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor.to(device)`, except that a CPU -> CUDA copy does not make the host wait for the GPU.

    A copy from ordinary (pageable) memory synchronises with the GPU, so the sampler would stall after
    every step that draws eta noise; from pinned memory it is queued behind the running step instead
    (the pinned block stays reserved until the copy is done). The values are the same either way.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _batch_size_of(conditioning: Any) -> Optional[int]:
    """Batch size of the first tensor inside a (possibly nested) conditioning, or None."""
    if isinstance(conditioning, torch.Tensor):
        return conditioning.shape[0]
    if isinstance(conditioning, dict):
        conditioning = list(conditioning.values())
    if isinstance(conditioning, (list, tuple)):
        for item in conditioning:
            size = _batch_size_of(item)
            if size is not None:
                return size
    return None


def _reject_unsupported_options(options: dict[str, Any]) -> None:
    """Accept the CompVis `sample` keywords our samplers do not implement, as long as they do nothing."""
    inert = {"mask": None, "quantize_x0": False, "temperature": 1.0, "noise_dropout": 0.0,
             "score_corrector": None}
    ignored = {"normals_sequence", "x0", "corrector_kwargs"}  # only read by CompVis together with the above
    for name, value in options.items():
        if name in inert:
            default = inert[name]
            if (value is not None) if default is None else (value != default):
                raise NotImplementedError(f"{name}={value!r} is not supported by these samplers; leave it at "
                                          f"its default {inert[name]!r}")
        elif name not in ignored:
            raise TypeError(f"sample() got an unexpected keyword argument {name!r}")


@dataclass
class SamplingRun:
    """One pass of the denoising loop, handed to every `_step`: the guided model and the current step.

    `history` is the per-run memory of multistep samplers (PLMS: past eps; DPM-Solver: past x_0).
    """

    guide: ClassifierFreeGuidance
    total_steps: int
    generator: Generators = None
    step_index: int = 0
    history: list[Any] = field(default_factory=list)

    def eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Guided eps of latents x (B, C, H, W) at timestep t, reported as part of the current step."""
        return self.guide(x, t, self.step_index, self.total_steps)


class DiffusionSampler:
    """Base class: builds the timestep grid, draws x_T, and runs the denoising loop.

    Subclasses set `timestep_spacing`, `supports_eta` and `progress_name`, and implement `_step`,
    which takes one step from level `ddim_alphas[index]` to `ddim_alphas_prev[index]`.
    """

    timestep_spacing = "leading"
    supports_eta = True
    progress_name = "Sampler"

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any) -> None:
        # `schedule` and extra keywords are accepted for CompVis compatibility: the beta schedule is the
        # model's own (`model.alphas_cumprod`).
        self.model = model
        self.schedule = schedule
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.ddim_timesteps: Optional[np.ndarray] = None

    def make_schedule(self, ddim_num_steps: int, ddim_eta: float = 0.0, ddim_discretize: str = "uniform",
                      verbose: bool = False) -> None:
        """Build the S-step grid and its coefficients (CompVis attribute names, float64 on the CPU)."""
        if ddim_discretize != "uniform":
            raise NotImplementedError(f"ddim_discretize={ddim_discretize!r} is not supported; use 'uniform'")
        if ddim_eta < 0:
            raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like noise), got {ddim_eta}")
        if ddim_eta != 0 and not self.supports_eta:
            raise ValueError(f"{type(self).__name__} is deterministic and needs eta = 0 (got {ddim_eta}); "
                             "use DDIMSampler for eta > 0")
        if getattr(self.model, "parameterization", "eps") != "eps":
            raise NotImplementedError("these samplers expect a model that predicts eps "
                                      f"(parameterization 'eps'), got {self.model.parameterization!r}")
        timesteps = TIMESTEP_GRIDS[self.timestep_spacing](ddim_num_steps, self.ddpm_num_timesteps)
        alphas_cumprod = self.model.alphas_cumprod.detach().to("cpu", torch.float64)  # (T,)
        self.ddim_timesteps = timesteps
        self.ddim_alphas = alphas_cumprod[timesteps]  # (S,)
        self.ddim_alphas_prev = torch.cat([alphas_cumprod[:1], self.ddim_alphas[:-1]])  # (S,)
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1 - self.ddim_alphas)
        self.ddim_eta = float(ddim_eta)
        self.ddim_sigmas = ddim_sigmas(self.ddim_alphas, self.ddim_alphas_prev, self.ddim_eta)
        if bool((1 - self.ddim_alphas_prev - self.ddim_sigmas ** 2 < 0).any()):
            raise ValueError(f"eta = {ddim_eta} makes the DDIM noise larger than the step allows; use eta <= 1")
        if verbose:
            print(f"{self.progress_name}: {len(timesteps)} steps, timesteps {timesteps[::-1].tolist()[:8]}..., "
                  f"eta {self.ddim_eta}")

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: tuple[int, int, int], conditioning: Any = None,
               callback: Optional[Callable[[int], None]] = None, *,
               img_callback: Optional[Callable[[torch.Tensor, int], None]] = None,
               eta: float = 0.0, x_T: Optional[torch.Tensor] = None, verbose: bool = True,
               log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, generator: Generators = None,
               **compvis_options: Any) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample `batch_size` latents of `shape` = (C, H, W) in S steps.

        Arguments after `callback` are keyword-only: CompVis' positional order differs after it.
        Returns (samples (B, C, H, W), {"x_inter": [...], "pred_x0": [...]}). `callback(i)` and
        `img_callback(pred_x0, i)` run after each step i. x_T (and DDIM's eta noise) is drawn from
        `generator` when given, so a seeded generator reproduces the samples; a list of generators, one
        per image, makes each image's noise its own (see `draw_noise`).
        """
        _reject_unsupported_options(compvis_options)
        cond_batch = _batch_size_of(conditioning)
        if cond_batch is not None and cond_batch != batch_size:
            raise ValueError(f"conditioning has batch size {cond_batch} but batch_size is {batch_size}; "
                             "give one conditioning per sample")
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        if x_T is None:
            x_T = draw_noise((batch_size, *shape), generator, self.model.alphas_cumprod.device)
        guide = ClassifierFreeGuidance(self.model, conditioning, unconditional_conditioning,
                                       unconditional_guidance_scale)
        return self._denoise(x_T, guide, num_steps=S, callback=callback, img_callback=img_callback,
                             log_every_t=log_every_t, generator=generator, verbose=verbose)

    def _denoise(self, x: torch.Tensor, guide: ClassifierFreeGuidance, num_steps: int,
                 callback: Optional[Callable[[int], None]] = None,
                 img_callback: Optional[Callable[[torch.Tensor, int], None]] = None,
                 log_every_t: int = 100, generator: Generators = None,
                 verbose: bool = True) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Run the last `num_steps` steps of the grid (all of them for txt2img), noisiest first.

        The guidance hears each step's place in the whole grid (img2img's first step of 50 at strength
        0.5 is step 25 of 50, progress 0.5), so a step window and recorded anchors mean the same noise
        level in txt2img and img2img; `callback(i)` counts the steps run here, from 0."""
        intermediates = {"x_inter": [x], "pred_x0": [x]}
        grid_steps = len(self.ddim_timesteps)
        run = SamplingRun(guide, total_steps=grid_steps, generator=generator)
        indices = range(num_steps - 1, -1, -1)
        steps = tqdm(indices, desc=self.progress_name, total=num_steps) if verbose else indices
        for step_index, index in enumerate(steps):
            run.step_index = grid_steps - 1 - index
            x, pred_x0 = self._step(x, index, run)
            # CompVis logs every log_every_t-th grid position and the first step.
            if index % log_every_t == 0 or index == num_steps - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
            if callback is not None:
                callback(step_index)
            if img_callback is not None:
                img_callback(pred_x0, step_index)
        return x, intermediates

    def _step(self, x: torch.Tensor, index: int, run: SamplingRun) -> StepResult:
        """Move x from level ddim_alphas[index] to ddim_alphas_prev[index]; return (x_next, pred_x0)."""
        raise NotImplementedError

    def _ddim_step(self, x: torch.Tensor, eps: torch.Tensor, index: int,
                   generator: Generators = None) -> StepResult:
        """DDIM update of grid position `index` with this grid's eta noise."""
        sigma = float(self.ddim_sigmas[index])
        noise = draw_noise(x.shape, generator, x.device, x.dtype) if sigma > 0 else None
        return ddim_update(x, eps, float(self.ddim_alphas[index]), float(self.ddim_alphas_prev[index]),
                           sigma, noise)
