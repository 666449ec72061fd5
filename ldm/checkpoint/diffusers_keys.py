"""The key mapping from a diffusers-format SD v1 pipeline's weights to this project's (CompVis) names.

diffusers names the same tensors by block type and position (`down_blocks.1.resnets.0.conv1.weight`);
this project's modules are named as the CompVis checkpoint keys (`input_blocks.4.0.in_layers.2.weight`).
The mapping is structural, so it holds for any block counts, the tiny test models included:

UNet (`model.diffusion_model.` + ...), with L = layers_per_block (SD v1: 2):
- `down_blocks.i.resnets.j` / `.attentions.j` -> `input_blocks.{1 + i(L+1) + j}.0` / `.1`;
  `down_blocks.i.downsamplers.0.conv` -> `input_blocks.{(i+1)(L+1)}.0.op`.
- `mid_block.resnets.j` -> `middle_block.{2j}`, `mid_block.attentions.0` -> `middle_block.1`.
- `up_blocks.i.resnets.j` / `.attentions.j` -> `output_blocks.{i(L+1) + j}.0` / `.1`;
  `up_blocks.i.upsamplers.0` -> `output_blocks.{i(L+1) + L}.1` (or `.2` after an attention).
- inside a ResBlock: norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut -> in_layers.0, in_layers.2,
  emb_layers.1, out_layers.0, out_layers.3, skip_connection. Transformer blocks keep their names.
- conv_in, time_embedding.linear_1/2, conv_norm_out, conv_out -> input_blocks.0.0, time_embed.0/2, out.0/2.

VAE (`first_stage_model.` + ...), with N levels:
- `encoder.down_blocks.i.resnets.j` -> `encoder.down.i.block.j`, `.downsamplers.0` -> `.downsample`;
  `decoder.up_blocks.i` -> `decoder.up.{N-1-i}` (diffusers orders the decoder from the bottom),
  `.upsamplers.0` -> `.upsample`; `mid_block.resnets.j` -> `mid.block_{j+1}`, `mid_block.attentions.0` ->
  `mid.attn_1` with group_norm/to_q/to_k/to_v/to_out.0 (older files: query/key/value/proj_attn) ->
  norm/q/k/v/proj_out, whose linear (C, C) weights become 1x1 convolutions (C, C, 1, 1).
- conv_shortcut -> nin_shortcut, conv_norm_out -> norm_out; the rest keeps its name.

ControlNet (a diffusers `ControlNetModel`, in the published cldm names that `ldm.checkpoint.controlnet` loads):
- `controlnet_cond_embedding.conv_in` / `.blocks.k` / `.conv_out` -> `input_hint_block.0` / `.{2k + 2}` / `.14`
  (every second layer of the hint encoder is a SiLU); `controlnet_down_blocks.N` -> `zero_convs.N.0`,
  `controlnet_mid_block` -> `middle_block_out.0`; conv_in, time_embedding, down_blocks and mid_block as in the UNet.

Text encoder: transformers' CLIPTextModel keys (`text_model.*`, the level restored when a file lacks it) sit
under `cond_stage_model.transformer.`.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Optional

import torch

from ldm.checkpoint.errors import CheckpointMismatchError
from ldm.checkpoint.keys import CLIP_PREFIX, CLIP_TEXT_CHILDREN, CLIP_TEXT_LEVEL, COMPONENT_PREFIXES, summarize_keys

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                 "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
VAE_RENAMES = {"conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out"}

_UNET_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_CONTROLNET_HINT = re.compile(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(weight|bias)")
_CONTROLNET_ZERO = re.compile(r"controlnet_down_blocks\.(\d+)\.(weight|bias)")


def _resnet_part(rest: str) -> str:
    """`conv1.weight` -> `in_layers.2.weight` inside a UNet ResBlock."""
    layer, _, param = rest.rpartition(".")
    return f"{UNET_RESNET.get(layer, layer)}.{param}"


def unet_key(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> Optional[str]:
    """A diffusers UNet key in this project's names (without the prefix), or None if not an SD v1 UNet key."""
    head, _, param = key.rpartition(".")
    if head in UNET_TOP:
        return f"{UNET_TOP[head]}.{param}"
    per_level = layers_per_block + 1
    match = _UNET_BLOCK.fullmatch(key)
    if match:
        path, level, kind, index, rest = match.group(1), int(match.group(2)), match.group(3), int(match.group(4)), \
            match.group(5)
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * per_level}.0.op.{rest.removeprefix('conv.')}"
        if kind == "upsamplers":
            position = 2 if level in up_blocks_with_attention else 1
            return f"output_blocks.{level * per_level + layers_per_block}.{position}.{rest}"
        block = f"input_blocks.{1 + level * per_level + index}" if path == "down" else \
            f"output_blocks.{level * per_level + index}"
        return f"{block}.0.{_resnet_part(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    match = _UNET_MID.fullmatch(key)
    if match:
        kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
        return f"middle_block.{2 * index}.{_resnet_part(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    return None


def controlnet_key(key: str, layers_per_block: int) -> Optional[str]:
    """A diffusers ControlNetModel key in the published cldm names (without `control_model.`), or None."""
    from ldm.modules.diffusionmodules.controlnet import HINT_CHANNELS

    match = _CONTROLNET_HINT.fullmatch(key)
    if match:
        layer, block, param = match.groups()
        hint_convs = 2 * len(HINT_CHANNELS)  # conv_in, two per width step, conv_out: 8
        index = 0 if layer == "conv_in" else 2 * (hint_convs - 1) if layer == "conv_out" else 2 * int(block) + 2
        return f"input_hint_block.{index}.{param}"
    match = _CONTROLNET_ZERO.fullmatch(key)
    if match:
        return f"zero_convs.{match.group(1)}.0.{match.group(2)}"
    if key.startswith("controlnet_mid_block."):
        return f"middle_block_out.0.{key.removeprefix('controlnet_mid_block.')}"
    if key.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")):
        return None  # a ControlNet has no decoder
    return unet_key(key, layers_per_block, up_blocks_with_attention=set())


def vae_key(key: str, levels: int) -> Optional[str]:
    """A diffusers AutoencoderKL key in this project's names (without the prefix), or None if unknown."""
    match = _VAE_BLOCK.fullmatch(key)
    if match:
        side, level, kind, index, rest = match.group(1), int(match.group(3)), match.group(4), match.group(5), \
            match.group(6)
        level = level if side == "encoder" else levels - 1 - level
        path = "down" if side == "encoder" else "up"
        if kind == "resnets":
            return f"{side}.{path}.{level}.block.{index}.{_vae_rename(rest)}"
        return f"{side}.{path}.{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
    match = _VAE_MID.fullmatch(key)
    if match:
        side, kind, index, rest = match.groups()
        if kind == "resnets":
            return f"{side}.mid.block_{int(index) + 1}.{_vae_rename(rest)}"
        layer, _, param = rest.rpartition(".")
        return f"{side}.mid.attn_1.{VAE_ATTENTION[layer]}.{param}" if layer in VAE_ATTENTION else None
    side, _, rest = key.partition(".")
    if side in ("encoder", "decoder") and rest.count(".") == 1:
        return f"{side}.{_vae_rename(rest)}"
    return key if key.split(".")[0] in ("quant_conv", "post_quant_conv") and key.count(".") == 1 else None


def _vae_rename(rest: str) -> str:
    layer, _, param = rest.rpartition(".")
    return f"{VAE_RENAMES.get(layer, layer)}.{param}"


def _as_conv_1x1(tensor: torch.Tensor) -> torch.Tensor:
    """A linear weight (C_out, C_in) as the 1x1 convolution weight (C_out, C_in, 1, 1) CompVis' VAE uses."""
    return tensor[:, :, None, None] if tensor.dim() == 2 else tensor


def convert_component(component: str, state_dict: Mapping[str, torch.Tensor], source: str,
                      map_key: Callable[[str], Optional[str]]) -> dict[str, torch.Tensor]:
    """One component's diffusers state dict under this project's full key names; unknown keys are refused."""
    prefix = COMPONENT_PREFIXES[component]
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        name = map_key(key)
        if name is None:
            unknown.append(key)
            continue
        if component == "VAE" and ".mid.attn_1." in name and name.endswith(".weight") and ".norm." not in name:
            tensor = _as_conv_1x1(tensor)
        converted[prefix + name] = tensor
    if unknown:
        raise CheckpointMismatchError(
            f"{source}: {len(unknown)} {component} tensors have names an SD v1 {component} does not have "
            f"({summarize_keys(unknown, 3)}); it was not loaded. Is the folder another kind of pipeline "
            "(SDXL, SD 3, a ControlNet)? Use an SD v1 folder.")
    return converted


def text_encoder_key(key: str) -> Optional[str]:
    """transformers' CLIPTextModel key -> this project's name under `cond_stage_model.` (without it).

    transformers 4.x writes `text_model.embeddings...`; 5.x files drop the `text_model.` level."""
    if not key.startswith(CLIP_TEXT_LEVEL):
        if not key.startswith(CLIP_TEXT_CHILDREN):
            return None
        key = CLIP_TEXT_LEVEL + key
    return CLIP_PREFIX.removeprefix(COMPONENT_PREFIXES["text encoder"]) + key
