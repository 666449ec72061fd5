"""The token grid each tagged self-attention layer runs on, measured by one forward pass of the UNet.

A layer's tag names its level by the SD v1 latent side at 512 px (`down.64`, `mid.8`, ...), whatever
the model and the image size: on the demo model (64 px images, autoencoder factor 4, 16x16 latents)
`up.64` runs on a 16x16 grid, and on SD v1 at 768x512 px on a 96x64 one. What a layer actually sees
is read here from the model itself rather than from the tag: `self_attention_grids` runs the UNet once
(batch 1, zero latents and text, no gradient) at a latent size, with a reader on each tagged `attn1`
layer, which sees the (H, W) token grid its transformer hands it and how many tokens it receives, and
returns what the readers saw. The readers only read; all are removed before returning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ldm.modules.attention import CrossAttention, readers_added
from ldm.modules.step_context import LayerCall

CONTEXT_TOKENS = 77  # CLIP's text length; self-attention grids do not depend on it


@dataclass(frozen=True)
class LayerGrid:
    """The token grid one self-attention layer ran on: `tokens` as received, H x W of its feature map."""

    name: str  # module path inside the UNet, as `tagged_layers` names it
    tag: str  # path.level, e.g. "up.64"
    height: int
    width: int
    tokens: int

    @property
    def shape(self) -> str:
        return f"{self.height}x{self.width}"


def _context_dim(unet: nn.Module) -> int:
    """The text width the cross-attention layers read (the key projection's input features)."""
    for module in unet.modules():
        if isinstance(module, CrossAttention) and module.tag is None:  # attn2 layers carry no tag
            return int(module.to_k.in_features)
    raise ValueError("this UNet has no cross-attention layers to read the text width from")


@torch.no_grad()
def self_attention_grids(unet: nn.Module, latent_size: tuple[int, int],
                         context: Optional[torch.Tensor] = None) -> list[LayerGrid]:
    """One LayerGrid per tagged self-attention layer, in forward order, for latents of `latent_size`
    (height, width). `context`: the text embedding to run with, (1, L, D); zeros of the model's text width
    when None (the self-attention grids do not depend on it)."""
    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    height, width = latent_size
    x = torch.zeros(1, int(unet.in_channels), height, width, device=device, dtype=dtype)  # (1, C_in, h, w)
    timesteps = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
    if context is None:
        context = torch.zeros(1, CONTEXT_TOKENS, _context_dim(unet), device=device, dtype=dtype)  # (1, L, D)

    seen: list[LayerGrid] = []

    def reader(name: str):
        def read(layer: CrossAttention, x: torch.Tensor, context: Optional[torch.Tensor], call: LayerCall,
                 out: torch.Tensor) -> None:
            seen.append(LayerGrid(name, layer.tag, call.grid[0], call.grid[1], int(x.shape[1])))  # x (B, N, C)
        return read

    layers = [(layer, reader(name)) for name, layer in unet.named_modules()
              if isinstance(layer, CrossAttention) and layer.tag is not None]
    with readers_added(layers):
        unet(x, timesteps, context=context)
    return seen
