"""PLMS sampler (CompVis interface): DDIM steps driven by a linear-multistep combination of eps.

Uses the same "leading" grid as DDIM. The first step is the pseudo improved-Euler warm-up, which
evaluates the model twice; every later step evaluates it once. For S = 1 the warm-up's second
evaluation reuses the only timestep, as CompVis does (`t_next` is clamped to the grid).
"""
from __future__ import annotations

import torch

from ldm.models.diffusion.sampling_util import DiffusionSampler, SamplingRun, StepResult

# Adams-Bashforth weights on (eps_now, eps_prev, eps_prev2, ...) and their common denominator,
# keyed by how many earlier eps are available.
ADAMS_BASHFORTH = {
    1: ((3, -1), 2),
    2: ((23, -16, 5), 12),
    3: ((55, -59, 37, -9), 24),
}


class PLMSSampler(DiffusionSampler):
    """Pseudo Linear Multi-Step sampler (Liu, Ren, Lin & Zhao, "Pseudo Numerical Methods for Diffusion
    Models on Manifolds", ICLR 2022, arXiv:2202.09778), in the form CompVis ships.

    Each step is a DDIM (eta = 0) transfer whose eps is replaced by eps': the mean of eps at both ends
    of the step for the first step (pseudo improved Euler), then 2nd, 3rd and 4th order
    Adams-Bashforth on the history of eps.
    """

    timestep_spacing = "leading"
    supports_eta = False
    progress_name = "PLMS Sampler"

    def _step(self, x: torch.Tensor, index: int, run: SamplingRun) -> StepResult:
        eps = run.eps(x, int(self.ddim_timesteps[index]))
        if run.history:
            weights, denominator = ADAMS_BASHFORTH[len(run.history)]
            past = [eps, *reversed(run.history)]  # newest first
            eps_prime = sum(w * e for w, e in zip(weights, past)) / denominator
        else:
            x_euler, _ = self._ddim_step(x, eps, index)
            t_next = int(self.ddim_timesteps[max(index - 1, 0)])
            eps_prime = (eps + run.eps(x_euler, t_next)) / 2
        run.history.append(eps)
        del run.history[:-3]  # fourth order needs the three previous eps
        return self._ddim_step(x, eps_prime, index)
