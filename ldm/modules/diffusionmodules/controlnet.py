"""The ControlNet of Stable Diffusion v1 (`control_model` in a ControlNet v1.1 checkpoint).

A ControlNet (Zhang, Rao & Agrawala, 2023) steers the frozen UNet with a spatial hint (a pose skeleton, an
edge map, a depth map, ...). It is a trainable copy of the UNet's encoder, built here from the very blocks
the UNet is built from (`UNetBlocks`): `time_embed`, `input_blocks`, `middle_block`. Two things are added:
- `input_hint_block`: eight 3x3 convolutions with SiLU between them, three of stride 2, encoding the hint
  image (B, hint_channels, 8h, 8w) in [0, 1] to (B, model_channels, h, w); its output is added to the
  latents' features right after the first convolution (`input_blocks.0`).
- zero convolutions: every encoder block's output passes its own 1x1 convolution (`zero_convs.N.0`, and
  `middle_block_out.0` for the middle block), initialised to zero so that an untrained ControlNet changes
  nothing.
The result is one residual per UNet skip connection (in `input_blocks` order) plus one for the middle block,
which `UNetModel.forward(control=...)` adds to the skip connections and the middle block's output. How
residuals are scaled, windowed and combined during sampling is `ldm/modules/control.py`'s job.

Attribute names are the published checkpoint keys without the `control_model.` prefix the files carry
(`ldm/checkpoint/controlnet.py` reads them). The ControlNet's self-attention layers are not tagged, so batch
sharing (which lives in the UNet's self-attention) never selects them.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.openaimodel import UNetBlocks
from ldm.modules.diffusionmodules.util import conv_nd, timestep_embedding, zero_module

# The hint encoder's widths in the published ControlNet (diffusers: conditioning_embedding_out_channels).
HINT_CHANNELS = (16, 32, 96, 256)
HINT_DOWNSAMPLING = 2 ** (len(HINT_CHANNELS) - 1)  # one stride-2 convolution per width after the first: 8


def hint_encoder(hint_channels: int, model_channels: int, dims: int = 2) -> nn.Sequential:
    """conv, SiLU, (conv, SiLU, stride-2 conv, SiLU) per width step, then a zero conv to model_channels.

    Indices of the convolutions (the checkpoint keys): 0, 2, 4, ..., 14 for the published widths."""
    layers: list[nn.Module] = [conv_nd(dims, hint_channels, HINT_CHANNELS[0], 3, padding=1), nn.SiLU()]
    for width, next_width in zip(HINT_CHANNELS, HINT_CHANNELS[1:]):
        layers += [conv_nd(dims, width, width, 3, padding=1), nn.SiLU(),
                   conv_nd(dims, width, next_width, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(zero_module(conv_nd(dims, HINT_CHANNELS[-1], model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


class ControlNet(nn.Module):
    """The UNet's encoder copy with zero convolutions and the hint encoder; `forward` returns the residuals.

    Takes the UNet's constructor parameters (as the published `cldm.ControlNet` does) plus `hint_channels`.
    `global_average_pooling` (the published shuffle model's setting, `global_pool_conditions` in diffusers)
    averages each residual over its pixels, so the hint steers the whole image alike.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, hint_channels: int,
                 num_res_blocks: int, attention_resolutions: Sequence[int], channel_mult: Sequence[int] = (1, 2, 4, 8),
                 conv_resample: bool = True, dims: int = 2, use_fp16: bool = False, num_heads_upsample: int = -1,
                 use_new_attention_order: bool = False, global_average_pooling: bool = False,
                 **block_options: Any):
        """`block_options`: the UNet's options for its blocks (num_heads, context_dim, use_spatial_transformer,
        dropout, use_checkpoint, ...: `UNetBlocks`' parameters). use_fp16, num_heads_upsample and
        use_new_attention_order are accepted for CompVis configs and unused, as in `UNetModel`."""
        super().__init__()
        blocks = UNetBlocks(model_channels, dims=dims, **block_options)
        self.image_size = image_size
        self.in_channels = in_channels
        self.hint_channels = hint_channels
        self.model_channels = model_channels
        self.global_average_pooling = bool(global_average_pooling)
        # Registered in the published order (time_embed, input_blocks, zero_convs, input_hint_block,
        # middle_block, middle_block_out), so a state dict lists its keys as the published files do.
        self.time_embed = blocks.time_embed(model_channels)
        self.input_blocks, channels = blocks.down_path(in_channels, model_channels, tuple(channel_mult),
                                                       num_res_blocks, tuple(attention_resolutions), conv_resample,
                                                       tagged=False)
        self.zero_convs = nn.ModuleList(self._zero_conv(dims, ch) for ch in channels)
        self.input_hint_block = hint_encoder(hint_channels, model_channels, dims)
        self.middle_block = blocks.middle_block(channels[-1], len(channel_mult), tagged=False)
        self.middle_block_out = self._zero_conv(dims, channels[-1])

    @staticmethod
    def _zero_conv(dims: int, channels: int) -> nn.Sequential:
        return nn.Sequential(zero_module(conv_nd(dims, channels, channels, 1, padding=0)))

    @property
    def residual_count(self) -> int:
        """How many residuals `forward` returns: one per UNet skip connection, one for the middle block."""
        return len(self.zero_convs) + 1

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor) -> list[torch.Tensor]:
        """Residuals for latents x (B, C, h, w) at timesteps (B,) with text context (B, 77, context_dim) and
        hint images (B, hint_channels, 8h, 8w) in [0, 1]: (B, C_i, h_i, w_i) per skip connection, then the
        middle block's; (B, C_i, 1, 1) each with global average pooling. Unscaled (scale 1)."""
        expected = (x.shape[-2] * HINT_DOWNSAMPLING, x.shape[-1] * HINT_DOWNSAMPLING)
        if hint.shape[0] != x.shape[0] or tuple(hint.shape[-2:]) != expected or hint.shape[1] != self.hint_channels:
            raise ValueError(f"hint of shape {tuple(hint.shape)} does not fit latents {tuple(x.shape)}: expected "
                             f"({x.shape[0]}, {self.hint_channels}, {expected[0]}, {expected[1]}), the image size")
        dtype = self.time_embed[0].weight.dtype  # run in the weights' dtype, as the UNet does
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))  # (B, 4*model_channels)
        context = context.to(dtype)
        guided_hint = self.input_hint_block(hint.to(dtype))  # (B, model_channels, h, w)
        residuals = []
        h = x.to(dtype)
        for index, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if index == 0:  # the hint joins the latents' features after the first convolution
                h = h + guided_hint
            residuals.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        residuals.append(self.middle_block_out(h))
        if self.global_average_pooling:
            residuals = [r.mean(dim=(2, 3), keepdim=True) for r in residuals]  # (B, C_i, 1, 1)
        return residuals
