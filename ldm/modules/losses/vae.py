"""A training loss for the KL autoencoder that needs no downloads: reconstruction + weighted KL.

CompVis trains the SD autoencoder with LPIPS and a patch discriminator on top of this; those need
pretrained VGG weights and a second optimizer, so they are left out. What remains keeps CompVis'
scaling, so `kl_weight` means the same thing: the reconstruction error is summed over (C, H, W) and
the KL to N(0, I) is summed over the latent, both then averaged over the batch.
Images are (B, C, H, W) in [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

_PIXEL_LOSSES = ("l1", "l2")


class ReconstructionKLLoss(nn.Module):
    """loss = mean_b sum_chw |x - x_rec|^p + kl_weight * mean_b KL(q(z|x) || N(0, I)), p = 1 or 2."""

    def __init__(self, kl_weight: float = 1e-6, pixel_loss: str = "l1") -> None:
        super().__init__()
        if pixel_loss not in _PIXEL_LOSSES:
            raise ValueError(f"unknown pixel_loss {pixel_loss!r}; choose one of {_PIXEL_LOSSES}")
        self.kl_weight = kl_weight
        self.pixel_loss = pixel_loss

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                posterior: DiagonalGaussianDistribution, split: str = "train") -> tuple[torch.Tensor, dict]:
        """Returns the scalar loss and detached metrics named `{split}/...` for logging."""
        diff = inputs - reconstructions  # (B, C, H, W)
        per_pixel = diff.abs() if self.pixel_loss == "l1" else diff.pow(2)
        rec_loss = per_pixel.flatten(1).sum(dim=1).mean()
        kl_loss = posterior.kl().mean()
        loss = rec_loss + self.kl_weight * kl_loss
        log = {f"{split}/total_loss": loss.detach(), f"{split}/rec_loss": rec_loss.detach(),
               f"{split}/kl_loss": kl_loss.detach()}
        return loss, log
