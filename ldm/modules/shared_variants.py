"""The kernels of the sharing variants beyond plain concatenation (see ldm/modules/shared_attention.py).

Layouts: q, k, v are (B, heads, N, d) for a batch of `halves` guidance halves, each one sharing group
of G = B / halves consecutive images; a layer's N tokens lie on its token grid (h, w), row-major.

The gathered kernel
-------------------
Subject masks, dropout, "others" and "pooled" all decide, for each query image i, which tokens of
which other images it sees. Rather than masking a (B*N) x (B*N) problem, each image j *offers* a
gathered set of tokens (its masked / kept / pooled keys and values, M_j of them), and each query image
i attends to [its own N tokens (not in "others"); the offers of the images it sees]. Where the key sets
have different lengths, each query image is its own attention call over exactly its keys (no padding);
the `strength` bias on offered tokens enters as one extra query/key channel (query 1, key bias / scale)
rather than as a mask, so the fused attention kernels still apply and memory stays linear in the tokens
actually seen. What is dropped or masked is never computed: this is where dropout and masks save time.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from ldm.modules.attention_kernel import memory_linear_attention

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


def others_seen(batch: int, halves: int, mode: str, anchors: int) -> list[list[int]]:
    """For each image of the batch, the other images (batch indices, same half) whose offers it sees:
    every other image of its group, or in "anchor" mode the anchors (an anchor: the other anchors)."""
    group = batch // halves
    seen = []
    for i in range(batch):
        start = (i // group) * group
        members = list(range(start, start + group))
        if mode == "anchor" and anchors < group:
            members = members[:anchors]
        seen.append([j for j in members if j != i])
    return seen


def attend_own_and_offered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offered_k: Sequence[torch.Tensor],
                           offered_v: Sequence[torch.Tensor], seen: Sequence[Sequence[int]], *, include_own: bool,
                           strength: float, scale: float) -> torch.Tensor:
    """Query image i attends to [own k_i, v_i (if `include_own`); offered_k[j], offered_v[j] for j in
    seen[i]], with `strength` added to the offered tokens' logits. q, k, v (B, heads, N, d); offers
    (heads, M_j, d). Returns (B, heads, N, d). Every query image must see at least one token.

    When every image sees as many keys (no masks or dropout) the batch is one attention call. Otherwise
    each query image is its own call over exactly its L_i keys: padding the key sets to the longest
    would cost attention FLOPs on keys that are then switched off, and the stacked, padded copies of
    the keys and values (B x longest, plus a wider copy for the padding channel) would raise the peak
    memory of the layer by several times its keys and values."""
    batch, heads, _, d = q.shape
    keys, values = [], []
    for i in range(batch):
        parts_k = ([k[i]] if include_own else []) + [offered_k[j] for j in seen[i]]
        parts_v = ([v[i]] if include_own else []) + [offered_v[j] for j in seen[i]]
        if sum(p.shape[1] for p in parts_k) == 0:
            raise ValueError(f"image {i} would attend to no token at all; keep its own tokens or offer some")
        keys.append(parts_k)
        values.append(parts_v)
    own = k.shape[2] if include_own else 0
    lengths = [sum(p.shape[1] for p in parts) for parts in keys]
    if len(set(lengths)) == 1 and (strength == 0.0 or lengths[0] == own):
        k_all = torch.stack([torch.cat(parts, dim=1) for parts in keys])  # (B, heads, L, d)
        v_all = torch.stack([torch.cat(parts, dim=1) for parts in values])
        return memory_linear_attention(q, k_all, v_all, scale=scale)
    out = q.new_empty(q.shape)  # (B, heads, N, d)
    for i in range(batch):
        k_i, v_i = torch.cat(keys[i], dim=1)[None], torch.cat(values[i], dim=1)[None]  # (1, heads, L_i, d)
        q_i = q[i:i + 1]
        if strength != 0.0 and lengths[i] > own:
            # One extra channel: query 1, key 0 (own) or strength / scale (offered), so that
            # scale * (q_extra . k_extra) is the bias; padded to one multiple of 8 so fused kernels apply.
            width = 8 * math.ceil((d + 1) / 8)
            bias = torch.cat([q.new_zeros(own), q.new_full((lengths[i] - own,), strength / scale)])  # (L_i,)
            q_i = F.pad(torch.cat([q_i, q.new_ones(1, heads, q.shape[2], 1)], dim=-1), (0, width - d - 1))
            k_i = F.pad(torch.cat([k_i, bias[None, None, :, None].expand(1, heads, -1, 1)], dim=-1),
                        (0, width - d - 1))
            v_i = F.pad(v_i, (0, width - d))
        out[i] = memory_linear_attention(q_i, k_i, v_i, scale=scale)[0, ..., :d]
    return out


def offers(k: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each image's offered tokens: k, v (B, heads, M, d) gathered where keep (B, M) is True (all if None)."""
    if keep is None:
        return list(k.unbind(0)), list(v.unbind(0))
    return ([k[j][:, keep[j]] for j in range(k.shape[0])],  # (heads, M_j, d) each
            [v[j][:, keep[j]] for j in range(v.shape[0])])
