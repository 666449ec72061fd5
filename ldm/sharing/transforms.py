"""Transforms of queries, keys and values before the sharing kernels (ldm/sharing/kernels.py).

Layouts: q, k, v (B, heads, N, d) for a batch of `halves` guidance halves, each one sharing group of
G = B / halves consecutive images; a layer's N tokens lie on its token grid (h, w), row-major.

- AdaIN: every image's per-channel statistics of its queries and keys set to those of its group's first
  image, so that the images' attention statistics, and with them style, line up.
- Group mean ("mean" mode): keys and values from (group mean + 2 x own) / 3.
- 2x2 pooling ("pooled" mode): the tokens an image offers, averaged over 2x2 cells of its grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

ADAIN_EPS = 1e-5


def channel_statistics(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over the tokens (dim -2) of t (..., N, d): each (..., 1, d). The std is
    the population one plus `ADAIN_EPS`, so a constant channel divides by a small number, not by 0."""
    return t.mean(dim=-2, keepdim=True), t.std(dim=-2, keepdim=True, unbiased=False) + ADAIN_EPS


def adain_transfer(t: torch.Tensor, statistics: tuple[torch.Tensor, torch.Tensor],
                   target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """t with its own (mean, std) `statistics` replaced by `target`'s (broadcast over the tokens)."""
    (mean, std), (target_mean, target_std) = statistics, target
    return (t - mean) / std * target_std + target_mean


def adain_to_group_reference(t: torch.Tensor, halves: int) -> torch.Tensor:
    """AdaIN: every image's per-channel (per head and channel, over its tokens) mean and std set to those
    of the first image of its sharing group. t (B, heads, N, d) -> same; the reference is unchanged."""
    groups = rearrange(t, "(k b) h n d -> k b h n d", k=halves)  # (halves, G, heads, N, d)
    mean, std = channel_statistics(groups)  # (halves, G, heads, 1, d) each
    normalised = adain_transfer(groups, (mean, std), (mean[:, :1], std[:, :1]))
    normalised[:, 0] = groups[:, 0]  # the reference itself stays exactly as it was
    return rearrange(normalised, "k b h n d -> (k b) h n d")


def blend_with_group_mean(t: torch.Tensor, halves: int) -> torch.Tensor:
    """(mean over the group + 2 * own) / 3, per image. t (B, heads, N, d) -> same. Keys and values are
    linear in the layer input (no bias), so blending them equals computing them from the blended input."""
    groups = rearrange(t, "(k b) h n d -> k b h n d", k=halves)  # (halves, G, heads, N, d)
    blended = (groups.mean(dim=1, keepdim=True) + 2.0 * groups) / 3.0
    return rearrange(blended, "k b h n d -> (k b) h n d")


def pool_tokens(t: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """2x2 average pooling over the token grid: t (B, heads, h*w, d) -> (B, heads, ceil(h/2)*ceil(w/2), d)
    and the pooled grid. An odd last row or column is averaged over the cells it has."""
    h, w = grid
    image = rearrange(t, "b e (h w) d -> (b e) d h w", h=h, w=w)
    pooled = F.avg_pool2d(image, kernel_size=2, ceil_mode=True)  # (B*heads, d, h', w')
    out_grid = (pooled.shape[-2], pooled.shape[-1])
    return rearrange(pooled, "(b e) d h w -> b e (h w) d", b=t.shape[0]), out_grid


def adain_per_subject(t: torch.Tensor, labels: torch.Tensor, halves: int) -> torch.Tensor:
    """AdaIN for isolated subjects: in every image, the tokens of subject a (labels == a, a >= 1) get the
    per-channel mean and std of subject a's tokens in the first image of its sharing group; tokens of no
    subject, a subject the first image does not show, and the first image itself stay as they are.
    t (B, heads, N, d), labels (B, N) in 0..S -> same shape as t."""
    out = t.clone()
    group = t.shape[0] // halves
    for half in range(halves):
        first = half * group
        for label in torch.unique(labels[first]).tolist():
            if label == 0:
                continue
            target = channel_statistics(t[first][:, labels[first] == label])  # (heads, 1, d) each
            for i in range(first + 1, first + group):
                rows = labels[i] == label  # (N,)
                if rows.any():
                    out[i][:, rows] = adain_transfer(t[i][:, rows], channel_statistics(t[i][:, rows]), target)
    return out
