"""DPM-Solver++ update rules (Lu et al. 2022, arXiv:2211.01095) for a discrete-time VP diffusion.

Notation: x_t = alpha_t x_0 + sigma_t eps with alpha_t = sqrt(alphas_cumprod[t]),
sigma_t = sqrt(1 - alphas_cumprod[t]) and half log-SNR lambda_t = log(alpha_t / sigma_t), which grows
as t goes down. A step goes from level s to level t with h = lambda_t - lambda_s > 0.
The solvers integrate the data prediction x_0(x_s) ("++" form), which is what keeps them stable under
large classifier-free guidance scales. Latents are (B, C, H, W); levels are Python floats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseLevel:
    """One point of the noise schedule: x = alpha * x_0 + sigma * eps."""

    alpha: float
    sigma: float

    @classmethod
    def from_alpha_cumprod(cls, alpha_cumprod: float) -> "NoiseLevel":
        return cls(math.sqrt(alpha_cumprod), math.sqrt(1.0 - alpha_cumprod))

    @property
    def log_snr(self) -> float:
        """lambda = log(alpha / sigma)."""
        return math.log(self.alpha) - math.log(self.sigma)

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Data prediction from a noise prediction: x_0 = (x - sigma eps) / alpha."""
        return (x - self.sigma * eps) / self.alpha


def first_order_update(x: torch.Tensor, x0: torch.Tensor, s: NoiseLevel, t: NoiseLevel) -> torch.Tensor:
    """DPM-Solver++(1): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x_0.

    The exact solution of the ODE if x_0 were constant over the step; equal to DDIM with eta = 0.
    """
    h = t.log_snr - s.log_snr
    return (t.sigma / s.sigma) * x - (t.alpha * math.expm1(-h)) * x0


def second_order_multistep_update(x: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor,
                                  prev: NoiseLevel, s: NoiseLevel, t: NoiseLevel) -> torch.Tensor:
    """DPM-Solver++(2M) (Algorithm 2 of the paper): the first-order update with x_0 replaced by
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev / h, a linear extrapolation of x_0 in lambda
    from the previous level `prev` (where x0_prev was predicted) through the current level `s`.
    """
    h = t.log_snr - s.log_snr
    h_prev = s.log_snr - prev.log_snr
    # 1/(2r) written as h / (2 h_prev), so a zero-size step (h = 0) stays finite.
    half_inverse_ratio = 0.5 * h / h_prev
    extrapolated_x0 = (1.0 + half_inverse_ratio) * x0 - half_inverse_ratio * x0_prev
    return first_order_update(x, extrapolated_x0, s, t)
