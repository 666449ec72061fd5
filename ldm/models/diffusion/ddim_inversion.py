"""DDIM inversion: the deterministic DDIM path run backwards, from a clean latent to the noisiest level.

DDIM with eta = 0 (Song, Meng & Ermon, arXiv:2010.02502, eq. 12) maps x_t to x_{t-1} through the
predicted x_0. Run the other way, each step moves from the sampler's output level of grid position
`index` (`ddim_alphas_prev[index]`) to its input level (`ddim_alphas[index]`), with eps evaluated at
the target timestep on the current latent: the usual approximation (eps changes little between two
neighbouring levels), which is why sampling back from the inverted x_T returns close to, not exactly,
the start (the error is measured by tests/test_reference.py on a tiny model).

`invert` returns the whole trajectory: `trajectory[index]` (B, C, h, w) is the latent at the input
level of grid position `index`, i.e. what the sampler's step `S - 1 - index` (0 = noisiest) would see.
"""
from __future__ import annotations

from typing import Callable

import torch

# eps(x (B, C, h, w), timestep, step_index, total_steps) -> (B, C, h, w): a ClassifierFreeGuidance
Guide = Callable[[torch.Tensor, int, int, int], torch.Tensor]


@torch.no_grad()
def invert(sampler, x0: torch.Tensor, guide: Guide) -> list[torch.Tensor]:
    """DDIM-invert the clean latent x0 (B, C, h, w) along `sampler`'s grid (call `make_schedule` first).

    Returns S latents, noise level rising: trajectory[index] is at level `ddim_alphas[index]`."""
    if sampler.ddim_timesteps is None:
        raise RuntimeError("call sampler.make_schedule(steps) before inverting")
    total = len(sampler.ddim_timesteps)
    x = x0
    trajectory = []
    for index in range(total):
        t = int(sampler.ddim_timesteps[index])
        a_from, a_to = float(sampler.ddim_alphas_prev[index]), float(sampler.ddim_alphas[index])
        eps = guide(x, t, total - 1 - index, total)  # the step index the sampler gives this timestep
        pred_x0 = (x - (1 - a_from) ** 0.5 * eps) / a_from ** 0.5
        x = a_to ** 0.5 * pred_x0 + (1 - a_to) ** 0.5 * eps
        trajectory.append(x)
    return trajectory
