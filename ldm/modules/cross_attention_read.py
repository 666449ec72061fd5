"""Reading a UNet's cross-attention without changing it: the attention probabilities of chosen text tokens.

Two users: the evaluation's recorder (`ldm.eval.cross_attention`) and the subject masks of batch
sharing (`ldm.sharing.masks`). Both add a reader (ldm/modules/attention.py) to the cross-attention
layers (`attn2`) and recompute, from the layer's own `to_q` / `to_k` and the reader's inputs, the
probabilities softmax(q k^T * scale) over the T text tokens. A reader returns nothing, so the layer's
output is the one its processor computed (bit for bit).

Layouts: q (B, heads, N, d) for N image tokens, k (B, heads, T, d) for T text tokens. Probabilities are
built for one image and at most `chunk` queries at a time, (heads, chunk, T), never for the whole batch
or the whole image at once, so reading runs at SD v1's 4096 tokens and never builds (B*N)^2 of anything.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from einops import rearrange
from torch import nn

from ldm.modules.attention import BasicTransformerBlock

QUERY_CHUNK = 1024


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(module path, level tag, layer) of every `attn2` of a UNet, in forward order. Cross-attention
    layers carry no tag; they take the level of the self-attention layer of the same block."""
    return [(f"{name}.attn2", block.attn1.tag, block.attn2) for name, block in unet.named_modules()
            if isinstance(block, BasicTransformerBlock)]


@torch.no_grad()
def layer_queries_and_keys(layer: nn.Module, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, heads, N, d) and k (B, heads, T, d) as `layer` computes them from x (B, N, C), context (B, T, D)."""
    q = rearrange(layer.to_q(x), "b n (h d) -> b h n d", h=layer.heads)
    k = rearrange(layer.to_k(context), "b t (h d) -> b h t d", h=layer.heads)
    return q, k


def probability_chunks(q: torch.Tensor, k: torch.Tensor, scale: float,
                       chunk: int = QUERY_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
    """For one image, q (heads, N, d) and k (heads, T, d): (first query, probabilities (heads, n, T)) for
    consecutive chunks of at most `chunk` queries, in float32."""
    keys = k.float().transpose(-1, -2)  # (heads, d, T)
    for start in range(0, q.shape[1], chunk):
        yield start, (q[:, start:start + chunk].float() @ keys * scale).softmax(dim=-1)  # (heads, n, T)


def token_probability_map(q: torch.Tensor, k: torch.Tensor, scale: float, positions: Sequence[Sequence[int]],
                          chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """(B, N) float32: for each image b and query token, the probability its cross-attention gives to the
    text tokens `positions[b]` (summed over them), averaged over heads. q (B, heads, N, d), k (B, heads, T, d)."""
    batch, heads, pixels, _ = q.shape
    if len(positions) != batch:
        raise ValueError(f"got token positions for {len(positions)} prompts but the batch holds {batch} images")
    out = torch.zeros(batch, pixels, device=q.device)
    for b in range(batch):
        wanted = list(positions[b])
        for start, probs in probability_chunks(q[b], k[b], scale, chunk):
            out[b, start:start + probs.shape[1]] = probs[..., wanted].sum(dim=-1).mean(dim=0)  # (n,)
    return out
