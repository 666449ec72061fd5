"""The autoencoder's posterior q(z | x): a diagonal Gaussian over latents (B, C, H, W).

The encoder emits (B, 2C, H, W): the first C channels are the mean, the last C the log-variance.
KL and negative log-likelihood are summed over all non-batch dimensions and returned per sample, (B,).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

# The log-variance is clamped before exponentiating so that an untrained or diverging encoder cannot
# produce infinite or zero variances (exp(20) ~ 5e8, exp(-30) ~ 1e-13).
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) over latents; `deterministic=True` collapses it to its mean."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        if parameters.shape[1] % 2:
            raise ValueError(f"expected (B, 2C, ...) parameters holding mean and log-variance, "
                             f"got {parameters.shape[1]} channels (odd)")
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # each (B, C, H, W)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Reparameterised draw mean + std * eps; the same `generator` state gives the same sample."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> torch.Tensor:
        """KL(self || other) per sample, (B,); `other` defaults to the standard normal N(0, I)."""
        dims = list(range(1, self.mean.ndim))
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=dims)

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """-log q(sample) summed over `dims`."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=list(dims))
