"""Convolutional encoder and decoder of the KL autoencoder (the "first stage" of Stable Diffusion v1).

Images and latents are (B, C, H, W). The encoder halves H and W once per entry of `ch_mult` except the
last (SD v1: 256 -> 32, factor 8) and ends in `2 * z_channels` channels when `double_z` (mean and
log-variance of a diagonal Gaussian); the decoder mirrors it. There is no timestep embedding here.

Attribute names follow the CompVis module tree, so an SD v1 checkpoint's `first_stage_model.encoder.*` /
`first_stage_model.decoder.*` weights load without renaming: `down.{level}.block.{i}`,
`down.{level}.attn.{i}`, `down.{level}.downsample`, `mid.block_1`, `mid.attn_1`, `mid.block_2`,
`up.{level}.upsample`, `norm_out`, `conv_out`. `up` is indexed by resolution level (0 = full size), so the
decoder runs it from the last index to the first.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ldm.modules.attention_kernel import memory_linear_attention

# The encoder and decoder are both built from the same `ddconfig`; each accepts, and ignores, the
# options that only concern the other one.
_DECODER_ONLY_OPTIONS = frozenset({"give_pre_end", "tanh_out"})
_ENCODER_ONLY_OPTIONS = frozenset({"double_z"})


def _reject_unknown_options(options: dict, allowed: Iterable[str], owner: str) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{owner} got unknown ddconfig options {unknown}; remove them from the config "
                        f"(the options it ignores are {sorted(allowed)})")


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the autoencoder's eps of 1e-6 (not PyTorch's 1e-5); the checkpoint was trained so."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2, optionally followed by a 3x3 convolution."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 convolution, or 2x2 average pooling without `with_conv`."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, kernel_size=2, stride=2)  # (B, C, H/2, W/2)
        # Zero padding on the right and bottom only (not padding=1 on all sides): this asymmetric
        # window placement is what the checkpoint was trained with.
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice, plus a 1x1 (or 3x3) shortcut
    when the channel count changes."""

    def __init__(self, *, in_channels: int, out_channels: int | None = None, conv_shortcut: bool = False,
                 dropout: float = 0.0, norm_num_groups: int = 32) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels, norm_num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels, norm_num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection.

    q, k, v and proj_out are 1x1 convolutions because that is how the checkpoint stores them. The
    attention itself is `scaled_dot_product_attention` (scale 1/sqrt(C)) on 4-D (B, 1 head, HW, C)
    inputs, the layout PyTorch's fused kernels take (3-D inputs always ran the math path and its
    (HW x HW) score matrix); where no fused kernel applies (mps, C beyond a kernel's head width), the
    queries are chunked (`ldm/modules/attention_kernel.py`). At 512x512 the mid blocks have 4096 positions.
    """

    def __init__(self, in_channels: int, norm_num_groups: int = 32) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels, norm_num_groups)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        q, k, v = (rearrange(proj(h), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = memory_linear_attention(q, k, v)  # (B, 1, HW, C)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width)  # (B, C, H, W)
        return x + self.proj_out(h)


def _make_mid(channels: int, dropout: float, norm_num_groups: int = 32) -> nn.Module:
    """The bottleneck shared by encoder and decoder: resnet, attention, resnet."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout,
                              norm_num_groups=norm_num_groups)
    mid.attn_1 = AttnBlock(channels, norm_num_groups)
    mid.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout,
                              norm_num_groups=norm_num_groups)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The resnet blocks of one resolution level, each followed by its attention block if the level has them."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent moments (B, 2*z_channels or z_channels, H/f, W/f),
    f = 2 ** (len(ch_mult) - 1)."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 norm_num_groups: int = 32, **decoder_options) -> None:
        super().__init__()
        _reject_unknown_options(decoder_options, _DECODER_ONLY_OPTIONS, "Encoder")
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        current_resolution = resolution
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout,
                                          norm_num_groups=norm_num_groups))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_num_groups))
            level = nn.Module()
            level.block = blocks
            level.attn = attns
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                current_resolution //= 2
            self.down.append(level)

        self.mid = _make_mid(block_in, dropout, norm_num_groups)
        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels,
                                  kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for i_level, level in enumerate(self.down):
            h = _run_level(level, h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f), f = 2 ** (len(ch_mult) - 1).

    `give_pre_end` returns the features before the output norm and convolution; `tanh_out` squashes the
    output to [-1, 1].
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, norm_num_groups: int = 32, **encoder_options) -> None:
        super().__init__()
        _reject_unknown_options(encoder_options, _ENCODER_ONLY_OPTIONS, "Decoder")
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[-1]
        current_resolution = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, current_resolution, current_resolution)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _make_mid(block_in, dropout, norm_num_groups)

        # Built from the coarsest level up, but stored so that up[0] is the full-resolution level.
        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            # One block more than the encoder per level.
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout,
                                          norm_num_groups=norm_num_groups))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_num_groups))
            level = nn.Module()
            level.block = blocks
            level.attn = attns
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                current_resolution *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, ch * ch_mult[-1], h, w)
        h = _run_mid(self.mid, h)
        for i_level in reversed(range(self.num_resolutions)):
            h = _run_level(self.up[i_level], h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, H, W)
        return torch.tanh(h) if self.tanh_out else h
