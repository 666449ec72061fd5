"""The denoising UNet of Stable Diffusion v1 (`model.diffusion_model` in a checkpoint).

Layout: latents (B, C, H, W); timesteps (B,) integers; text context (B, 77, context_dim). The UNet is
`input_blocks` (down path) -> `middle_block` -> `output_blocks` (up path, each block also taking the
skip connection of its mirror block) -> `out`. Attribute names are the checkpoint keys.

Self-attention layers are tagged here, while the UNet is built, with their resolution group: the path
(`down`, `mid`, `up`) and the level, written as the latent side length SD v1 has there at 512 px
(64, 32, 16, 8 = 64 / downsampling factor). SD v1 has 16 such layers: down.64 x2, down.32 x2,
down.16 x2, mid.8 x1, up.16 x3, up.32 x3, up.64 x3. Batch sharing (`ldm/sharing/`) selects layers
by these tags.

Per-call state reaches the attention layers as an argument: `forward(..., step=StepContext)` hands the
model call's step context (ldm/modules/step_context.py) to every transformer, which adds its token grid.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import CrossAttention, SpatialTransformer
from ldm.modules.diffusionmodules.util import (avg_pool_nd, checkpoint, conv_nd, normalization,
                                               timestep_embedding, zero_module)
from ldm.modules.step_context import TAG_BASE_RESOLUTION, StepContext


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers; each gets what it needs: ResBlocks the time embedding, transformers the text."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None,
                step: Optional[StepContext] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, step)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:  # keep the depth axis, upsample the two spatial axes
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution (`op`), or average pooling without `use_conv`."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without a convolution cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (added per channel, or as scale and shift)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False, norm_num_groups: int = 32):
        super().__init__()
        if up or down:
            raise NotImplementedError("resblock_updown is not used by Stable Diffusion and is not implemented")
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels, norm_num_groups), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, norm_num_groups), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        emb_out = self.emb_layers(emb).type(h.dtype)  # (B, C_out) or (B, 2*C_out)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.dim() - 2)))  # (B, C, 1, 1)
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class UNetBlocks:
    """Builds the UNet's blocks with one set of options, so the ControlNet's encoder copy
    (`ldm.modules.diffusionmodules.controlnet`) is made of exactly the blocks the UNet is made of.

    Takes the CompVis constructor parameters and refuses the options Stable Diffusion does not use
    (`use_spatial_transformer=False`, `resblock_updown`, `n_embed`) instead of building something different.
    """

    def __init__(self, model_channels: int, dropout: float = 0.0, dims: int = 2, use_checkpoint: bool = False,
                 num_heads: int = -1, num_head_channels: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_spatial_transformer: bool = False, transformer_depth: int = 1,
                 context_dim: Optional[int] = None, n_embed: Optional[int] = None, legacy: bool = True,
                 use_linear_in_transformer: bool = False, norm_num_groups: int = 32):
        if not use_spatial_transformer:
            raise NotImplementedError("only use_spatial_transformer: True (the Stable Diffusion UNet) is implemented")
        if context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim (768 for SD v1's CLIP text encoder)")
        if resblock_updown or n_embed is not None:
            raise NotImplementedError("resblock_updown and n_embed are not used by Stable Diffusion and are not implemented")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        if hasattr(context_dim, "__len__"):  # OmegaConf ListConfig of one element
            context_dim = list(context_dim)[0]
        self.time_embed_dim = model_channels * 4
        self.dropout, self.dims, self.use_checkpoint = dropout, dims, use_checkpoint
        self.num_heads, self.num_head_channels, self.legacy = num_heads, num_head_channels, legacy
        self.use_scale_shift_norm, self.norm_num_groups = use_scale_shift_norm, norm_num_groups
        self.transformer_depth, self.context_dim = transformer_depth, context_dim
        self.use_linear_in_transformer = use_linear_in_transformer

    def time_embed(self, model_channels: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(model_channels, self.time_embed_dim), nn.SiLU(),
                             nn.Linear(self.time_embed_dim, self.time_embed_dim))

    def res_block(self, ch_in: int, ch_out: int) -> "ResBlock":
        return ResBlock(ch_in, self.time_embed_dim, self.dropout, out_channels=ch_out, dims=self.dims,
                        use_checkpoint=self.use_checkpoint, use_scale_shift_norm=self.use_scale_shift_norm,
                        norm_num_groups=self.norm_num_groups)

    def transformer(self, ch: int, tag: Optional[str]) -> SpatialTransformer:
        """A spatial transformer on `ch` channels whose self-attention layers carry `tag` (None: untagged,
        so batch sharing can never select them)."""
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, ch // self.num_heads
        else:
            heads, dim_head = ch // self.num_head_channels, self.num_head_channels
        if self.legacy:
            dim_head = ch // heads
        layer = SpatialTransformer(ch, heads, dim_head, depth=self.transformer_depth, dropout=self.dropout,
                                   context_dim=self.context_dim, use_checkpoint=self.use_checkpoint,
                                   use_linear=self.use_linear_in_transformer, norm_num_groups=self.norm_num_groups)
        for attn in layer.self_attention_layers():
            attn.tag = tag
        return layer

    def down_path(self, in_channels: int, model_channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                  attention_resolutions: Sequence[int], conv_resample: bool = True,
                  tagged: bool = True) -> tuple[nn.ModuleList, list[int]]:
        """`input_blocks` and the channels of each block's output (the skip connections, in order).

        The downsampling factor `ds` starts at 1 and doubles at each level; attention_resolutions lists the
        ds values that get a transformer (SD v1: 4, 2, 1, i.e. every level but the lowest). With `tagged`,
        self-attention layers are tagged `down.<64 // ds>`."""
        input_blocks = nn.ModuleList([
            TimestepEmbedSequential(conv_nd(self.dims, in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [self.res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(self.transformer(ch, f"down.{TAG_BASE_RESOLUTION // ds}" if tagged else None))
                input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                input_blocks.append(TimestepEmbedSequential(
                    Downsample(ch, conv_resample, dims=self.dims, out_channels=ch)))
                skip_channels.append(ch)
                ds *= 2
        return input_blocks, skip_channels

    def middle_block(self, ch: int, levels: int, tagged: bool = True) -> TimestepEmbedSequential:
        """ResBlock, transformer, ResBlock at the lowest of `levels` levels (tag `mid.<64 // ds>`)."""
        tag = f"mid.{TAG_BASE_RESOLUTION // 2 ** (levels - 1)}" if tagged else None
        return TimestepEmbedSequential(self.res_block(ch, ch), self.transformer(ch, tag), self.res_block(ch, ch))


class UNetModel(nn.Module):
    """The SD v1 UNet with spatial transformers, built from the CompVis constructor parameters.

    Only the options Stable Diffusion uses are implemented (`use_spatial_transformer=True`); the
    others raise a clear error instead of building something different. `norm_num_groups` (not a
    CompVis option; SD v1 uses 32) lets narrow models keep several channels per normalisation group.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: Optional[int] = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = -1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: int = 1, context_dim: Optional[int] = None, n_embed: Optional[int] = None,
                 legacy: bool = True, use_linear_in_transformer: bool = False, norm_num_groups: int = 32):
        super().__init__()
        blocks = UNetBlocks(model_channels, dropout=dropout, dims=dims, use_checkpoint=use_checkpoint,
                            num_heads=num_heads, num_head_channels=num_head_channels,
                            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                            use_spatial_transformer=use_spatial_transformer, transformer_depth=transformer_depth,
                            context_dim=context_dim, n_embed=n_embed, legacy=legacy,
                            use_linear_in_transformer=use_linear_in_transformer, norm_num_groups=norm_num_groups)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.dtype = torch.float16 if use_fp16 else torch.float32

        self.time_embed = blocks.time_embed(model_channels)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, blocks.time_embed_dim)

        self.input_blocks, skip_channels = blocks.down_path(
            in_channels, model_channels, self.channel_mult, num_res_blocks, self.attention_resolutions, conv_resample)
        ch, ds = skip_channels[-1], 2 ** (len(channel_mult) - 1)
        self.middle_block = blocks.middle_block(ch, len(channel_mult))

        # Up path: one more block per level than on the way down, each concatenating a skip connection.
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [blocks.res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(blocks.transformer(ch, f"up.{TAG_BASE_RESOLUTION // ds}"))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, norm_num_groups), nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)))

    def self_attention_layers(self) -> list[CrossAttention]:
        """Every tagged self-attention layer (`attn1`), in the order the forward pass runs them."""
        blocks: Iterable[nn.Module] = [*self.input_blocks, self.middle_block, *self.output_blocks]
        return [attn for block in blocks for layer in block if isinstance(layer, SpatialTransformer)
                for attn in layer.self_attention_layers()]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None, control: Optional[Sequence[torch.Tensor]] = None,
                step: Optional[StepContext] = None) -> torch.Tensor:
        """eps for latents x (B, C, H, W) at timesteps (B,) given text context (B, 77, context_dim).

        `control`: ControlNet residuals (`ldm.modules.control`), one per skip connection in `input_blocks`
        order and then one for the middle block; each is added to its skip connection where the up path
        reads it, and the last to the middle block's output, as the published ControlNet does. `step`: this
        call's context for the attention layers (guidance halves, sampling step; a plain one when None)."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass class labels y exactly when the model is class-conditional (num_classes)")
        # Inputs are cast to the weights' dtype (float16 after `model.half()`, without autocast) and the
        # output back to the input's, so samplers keep their float32 arithmetic whatever the weights are.
        dtype = self.time_embed[0].weight.dtype
        t_emb = timestep_embedding(timesteps, self.model_channels).to(dtype)  # (B, model_channels)
        emb = self.time_embed(t_emb)  # (B, 4*model_channels)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        context = None if context is None else context.to(dtype)
        if step is None:  # called outside a sampler: one guidance half, no step
            step = StepContext(latent_size=(x.shape[-2], x.shape[-1]))
        skips = []
        h = x.to(dtype)
        for block in self.input_blocks:
            h = block(h, emb, context, step)
            skips.append(h)
        h = self.middle_block(h, emb, context, step)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"control holds {len(control)} residuals; this UNet takes {len(skips) + 1} "
                                 f"({len(skips)} skip connections and the middle block)")
            h = h + control[-1].to(dtype)
            skips = [skip + residual.to(dtype) for skip, residual in zip(skips, control)]
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            h = block(h, emb, context, step)
        return self.out(h).to(x.dtype)
