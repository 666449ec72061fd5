"""Random degradations that make clean renders look like a small latent diffusion model's output.

The instruments (attribute classifiers, the subject segmenter) are trained on procedural renders but
judge generated images, which are blurrier and noisier; training on degraded copies closes that gap.
Images are (B, 3, H, W) in [-1, 1]; every draw comes from the caller's torch.Generator, so training
stays seeded.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur image b with its own sigma[b] (0 = unchanged), as a matrix product along rows and columns.

    Matrices rather than a grouped convolution: the number of images varies from batch to batch, and
    every new group count costs the CPU convolution backend a slow set-up."""
    side = images.shape[-1]
    offsets = torch.arange(side, dtype=torch.float32)
    distance = offsets[:, None] - offsets[None, :]  # (H, H)
    weights = torch.exp(-0.5 * (distance[None] / sigma.clamp_min(1e-3)[:, None, None]) ** 2)  # (B, H, H)
    # Normalising each row keeps the border pixels' brightness (the kernel is cut off at the edge).
    weights = weights / weights.sum(dim=2, keepdim=True)
    return torch.einsum("bij,bcjk,blk->bcil", weights, images, weights)  # (B, C, H, W)


def _jpeg(images: torch.Tensor, quality: Sequence[int]) -> torch.Tensor:
    """Encode and decode each image as JPEG at its own quality."""
    pixels = ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    out = np.empty_like(pixels)
    for i, q in enumerate(quality):
        buffer = io.BytesIO()
        Image.fromarray(pixels[i]).save(buffer, format="JPEG", quality=int(q))
        out[i] = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return to_model_range(torch.from_numpy(out).permute(0, 3, 1, 2))  # (B, 3, H, W)


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random degradations of (B, 3, H, W) images in [-1, 1] like those of a small latent diffusion model.

    Each image draws its own strengths. Hue is never shifted (colour is a label), and jitter stays small
    enough that neighbouring colours (red / orange / yellow) remain apart.
    """
    b, _, h, w = images.shape
    x = images.clone()

    def chosen(p: float) -> torch.Tensor:  # (B, 1, 1, 1) mask of the images that get a degradation
        return (torch.rand(b, generator=generator) < p).float()[:, None, None, None]

    # Colour jitter: brightness, contrast, saturation, small per-channel gains.
    grey = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    x = grey + _uniform(b, 0.75, 1.25, generator)[:, None, None, None] * (x - grey)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + _uniform(b, 0.85, 1.15, generator)[:, None, None, None] * (x - mean)
    x = x + _uniform(b, -0.08, 0.08, generator)[:, None, None, None]
    x = x * (1 + 0.05 * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1))

    # Loss of detail: blur, or a trip through a lower resolution (as through an 8x latent).
    sigma = _uniform(b, 0.3, 1.0, generator) * chosen(0.5).flatten()
    x = _gaussian_blur(x, sigma)
    low = int(torch.randint(32, 49, (1,), generator=generator))
    resampled = F.interpolate(F.interpolate(x, size=(low, low), mode="bilinear", antialias=True,
                                            align_corners=False), size=(h, w), mode="bilinear", align_corners=False)
    pick = chosen(0.3)
    x = pick * resampled + (1 - pick) * x

    # Smooth colour blotches and pixel noise.
    blotch_side = int(torch.randint(3, 9, (1,), generator=generator))
    blotches = torch.randn(b, 3, blotch_side, blotch_side, generator=generator)
    blotches = F.interpolate(blotches, size=(h, w), mode="bicubic", align_corners=False)  # (B, 3, H, W)
    x = x + chosen(0.5) * _uniform(b, 0.02, 0.08, generator)[:, None, None, None] * blotches
    x = x + chosen(0.5) * _uniform(b, 0.01, 0.08, generator)[:, None, None, None] * torch.randn(
        x.shape, generator=generator)
    x = x.clamp(-1, 1)

    quality = torch.randint(25, 80, (b,), generator=generator)
    pick = torch.rand(b, generator=generator) < 0.2
    if pick.any():
        x[pick] = _jpeg(x[pick], quality[pick].tolist())
    return x
