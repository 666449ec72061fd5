"""Building blocks shared by the UNet, the autoencoder and the diffusion wrapper.

Everything here follows the Stable Diffusion v1 numerics: the "linear" beta schedule is linear in
sqrt(beta), timestep embeddings put the cosine half first, and GroupNorm is computed in float32
even when the model runs in half precision.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
    """Noise variances beta_1..beta_T as float64.

    "linear" (the SD v1 schedule) is linear in sqrt(beta) between sqrt(linear_start) and
    sqrt(linear_end); "cosine" is Nichol & Dhariwal (2021); "sqrt_linear" and "sqrt" are the other
    CompVis options.
    """
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; choose linear, cosine, sqrt_linear or sqrt")
    return betas.numpy()


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000,
                       repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), cosine half first (as in SD v1)."""
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, so fp16 activations do not lose the statistics.

    The weights are cast too: after `model.half()` (no autocast) they are float16 and the float32
    input would not match them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int, num_groups: int = 32) -> nn.Module:
    """The UNet's normalisation layer: 32 groups (SD v1), computed in float32."""
    return GroupNorm32(num_groups, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (used for output projections, so a fresh block starts as identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape) -> torch.Tensor:
    """Pick a[t] for each batch element and shape it to broadcast against x: (B,) -> (B, 1, 1, ...)."""
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def checkpoint(func, inputs: tuple, flag: bool):
    """Run `func(*inputs)`; with `flag` (and gradients on), recompute its activations in the backward
    pass instead of storing them: gradient checkpointing, the `use_checkpoint` option of the configs."""
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
