"""Helpers for the benchmarks: build full-size SD v1 UNets and time alternately.

These machines are noisy, so every benchmark measures its reference in the same run and reports
ratios: the candidates are run in turns (A B A B ...) and each is summarised by its median.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.util import instantiate_from_config  # noqa: E402

SD_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"


def sd_unet(seed: int = 0) -> torch.nn.Module:
    """The full-size SD v1 UNet (860M parameters), randomly initialised, fp32, eval mode.

    A fresh UNet zero-initialises the last convolution of every residual block and attention block and
    its output convolution, so its output would be exactly 0 and comparing two implementations'
    outputs would prove nothing. Those weights get small random values here (timing is unaffected).
    """
    torch.manual_seed(seed)
    config = OmegaConf.load(SD_CONFIG)
    unet = instantiate_from_config(config.model.params.unet_config).eval()
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(std=0.02 if p.dim() > 1 else 0.1)
    return unet


def unet_inputs(batch: int, latent: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded UNet inputs: latents (B, 4, latent, latent), timesteps (B,) at 500, text context (B, 77, 768)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.full((batch,), 500)
    context = torch.randn(batch, 77, 768, generator=g)
    return x, t, context


def time_alternately(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate, run in turns so machine noise hits all of them."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
