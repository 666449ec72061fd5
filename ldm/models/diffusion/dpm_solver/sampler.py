"""DPM-Solver sampler with the same interface as DDIMSampler / PLMSSampler.

Grid: time-uniform ("linspace", DPM-Solver's "time_uniform" skip type) from timestep 999 down to a
final level alphas_cumprod[0]; the solver math lives in `dpm_solver.py`.
"""
from __future__ import annotations

import torch

from ldm.models.diffusion.dpm_solver.dpm_solver import (NoiseLevel, first_order_update,
                                                        second_order_multistep_update)
from ldm.models.diffusion.sampling_util import DiffusionSampler, SamplingRun, StepResult

# Below this many steps the last step falls back to first order (as in the DPM-Solver reference code),
# which is more stable for very short runs.
LOWER_ORDER_FINAL_BELOW = 15


class DPMSolverSampler(DiffusionSampler):
    """DPM-Solver++(2M): multistep second-order solver of the diffusion probability-flow ODE in data
    prediction (Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models", arXiv:2211.01095, 2022), the algorithm CompVis' DPMSolverSampler
    runs (multistep, order 2, predict_x0).

    One model evaluation per step. The first step is first order (no history yet); so is the last
    when S < 15. Deterministic: eta must be 0.
    """

    timestep_spacing = "linspace"
    supports_eta = False
    progress_name = "DPM-Solver++(2M) Sampler"

    def _step(self, x: torch.Tensor, index: int, run: SamplingRun) -> StepResult:
        eps = run.eps(x, int(self.ddim_timesteps[index]))
        s = NoiseLevel.from_alpha_cumprod(float(self.ddim_alphas[index]))
        t = NoiseLevel.from_alpha_cumprod(float(self.ddim_alphas_prev[index]))
        x0 = s.predict_x0(x, eps)
        lower_order_final = index == 0 and len(self.ddim_timesteps) < LOWER_ORDER_FINAL_BELOW
        if run.history and not lower_order_final:
            x0_prev, prev = run.history[-1]
            x_next = second_order_multistep_update(x, x0, x0_prev, prev, s, t)
        else:
            x_next = first_order_update(x, x0, s, t)
        run.history[:] = [(x0, s)]
        return x_next, x0
