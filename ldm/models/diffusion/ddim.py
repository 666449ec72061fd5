"""DDIM sampler with CompVis' interface, including the img2img pair `stochastic_encode` / `decode`.

Grid: S timesteps "leading" with +1 offset (see `sampling_util.leading_timesteps`), exactly S of
them for every S in 1..1000; this matches diffusers' DDIMScheduler(timestep_spacing="leading",
steps_offset=1, set_alpha_to_one=False) wherever that one is valid (S < 1000).

img2img convention (differs from CompVis, see `stochastic_encode`): `stochastic_encode(x0, t)` noises
to exactly the level at which `decode(..., t_start=t)` takes its first step, for every t in 0..S.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from ldm.models.diffusion.guidance import ClassifierFreeGuidance
from ldm.models.diffusion.sampling_util import DiffusionSampler, Generators, SamplingRun, StepResult, draw_noise
from ldm.modules.diffusionmodules.util import extract_into_tensor


class DDIMSampler(DiffusionSampler):
    """Denoising Diffusion Implicit Models (Song, Meng & Ermon, ICLR 2021, arXiv:2010.02502).

    Each step predicts x_0 from eps and moves to the next grid level along eq. 12; eta = 0 is the
    deterministic probability-flow-like sampler, eta = 1 adds DDPM-like noise (eq. 16).
    """

    timestep_spacing = "leading"
    supports_eta = True
    progress_name = "DDIM Sampler"

    def _step(self, x: torch.Tensor, index: int, run: SamplingRun) -> StepResult:
        eps = run.eps(x, int(self.ddim_timesteps[index]))
        return self._ddim_step(x, eps, index, run.generator)

    def _require_schedule(self) -> None:
        if self.ddim_timesteps is None:
            raise RuntimeError("call sampler.make_schedule(ddim_num_steps, ddim_eta) before stochastic_encode/decode")

    def _check_t_start(self, t: torch.Tensor) -> None:
        num_steps = len(self.ddim_timesteps)
        if bool(((t < 0) | (t > num_steps)).any()):
            raise ValueError(f"t must be between 0 and the number of DDIM steps ({num_steps}), got {t.tolist()}; "
                             "for img2img use t = int(strength * ddim_steps) with 0 <= strength <= 1")

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: Union[int, torch.Tensor], use_original_steps: bool = False,
                          noise: Optional[torch.Tensor] = None,
                          generator: Generators = None) -> torch.Tensor:
        """q_sample: sqrt(a) x0 + sqrt(1 - a) noise, with a the level `decode(..., t_start=t)` starts at.

        t (int or (B,) ints) counts DDIM steps: t = S (strength 1) is the noisiest grid timestep,
        t = k >= 1 is `ddim_timesteps[k - 1]`, t = 0 is the level the sampler ends on. CompVis used
        `ddim_alphas[t]`, one grid step noisier than where `decode` starts, and crashed for t = S.
        With `use_original_steps`, t is a training timestep (0..T-1) and a = alphas_cumprod[t].
        """
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).expand(x0.shape[0]).cpu()  # (B,)
        if use_original_steps:
            levels = self.model.alphas_cumprod.detach().to("cpu", torch.float64)  # (T,)
        else:
            self._require_schedule()
            self._check_t_start(t)
            # levels[k] is the input level of grid step k - 1; levels[0] the final output level.
            levels = torch.cat([self.ddim_alphas_prev[:1], self.ddim_alphas])  # (S + 1,)
        alpha = extract_into_tensor(levels, t, x0.shape).to(x0.device, x0.dtype)  # (B, 1, 1, 1)
        if noise is None:
            noise = draw_noise(x0.shape, generator, x0.device, x0.dtype)
        return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, callback: Optional[Callable[[int], None]] = None,
               generator: Generators = None, verbose: bool = True) -> torch.Tensor:
        """Denoise `x_latent` with the last `t_start` steps of the grid (img2img); t_start in 0..S.

        t_start = S (strength 1.0) runs the whole grid, t_start = 0 returns `x_latent` unchanged.
        `callback(i)` runs after each of the t_start steps.
        """
        self._require_schedule()
        self._check_t_start(torch.tensor([int(t_start)]))
        guide = ClassifierFreeGuidance(self.model, cond, unconditional_conditioning, unconditional_guidance_scale)
        x, _ = self._denoise(x_latent, guide, num_steps=int(t_start), callback=callback,
                             generator=generator, verbose=verbose)
        return x
