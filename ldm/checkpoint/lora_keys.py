"""The names of LoRA files, turned into this project's parameter names.

A LoRA file holds, per adapted layer, a low-rank pair and sometimes an alpha:
- kohya / A1111 (`.safetensors` from kohya's sd-scripts, the A1111 ecosystem): `lora_unet_<module>` for the
  UNet and `lora_te_<module>` for the text encoder, with `.lora_down.weight` (rank, in[, kh, kw]),
  `.lora_up.weight` (out, rank[, 1, 1]) and `.alpha`. <module> is the diffusers UNet module path (SD v1 is
  trained on diffusers' UNet) or the transformers CLIP path, its dots written as underscores.
- diffusers: `unet.<module>` / `text_encoder.<module>` with `.lora_A.weight` / `.lora_B.weight` (PEFT, what
  diffusers writes today) or `.lora.down.weight` / `.lora.up.weight` (its earlier layers), `.alpha` optional.

Module paths become parameter names through the diffusers key mapping (`diffusers_keys.unet_key`,
`text_encoder_key`), so the UNet's names have one source. kohya's underscores also occur inside part names
(`down_blocks`, `to_q`, `time_emb_proj`), so a kohya name is read part by part, taking the longest known
part name first. SDXL files (kohya's `lora_te1_`/`lora_te2_` for its two text encoders, or its UNet under
CompVis names `input_blocks`, `middle_block`, `output_blocks`) are recognised and named as such.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

from ldm.checkpoint.diffusers_keys import text_encoder_key, unet_key
from ldm.checkpoint.keys import COMPONENT_PREFIXES

# Parts of diffusers UNet and transformers CLIP module paths that contain underscores.
MULTI_WORD_PARTS = frozenset({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v",
    "to_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "time_embedding", "linear_1", "linear_2",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
})
KOHYA_PREFIXES = {"lora_unet_": "UNet", "lora_te_": "text encoder"}
KOHYA_SDXL_PREFIXES = ("lora_te1_", "lora_te2_")
KOHYA_SDXL_UNET = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks|label_emb)_")
DIFFUSERS_PREFIXES = {"unet.": "UNet", "text_encoder.": "text encoder"}
# Suffix -> role of the tensor ("down", "up", "alpha"), by format.
KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
DIFFUSERS_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                      ".lora.up.weight": "up", ".alpha": "alpha"}


@dataclass(frozen=True)
class LoraKey:
    """One tensor of a LoRA file: the adapted layer's module path (its own naming), component and role."""

    module: str
    component: str  # "UNet" or "text encoder"
    role: str  # "down", "up" or "alpha"


def file_format(keys: list[str]) -> str:
    """'kohya' or 'diffusers', from the names; 'sdxl' for kohya's SDXL names; 'unknown' otherwise."""
    if any(key.startswith(KOHYA_SDXL_PREFIXES) or KOHYA_SDXL_UNET.match(key) for key in keys):
        return "sdxl"
    if any(key.startswith(tuple(KOHYA_PREFIXES)) for key in keys):
        return "kohya"
    if any(key.startswith(tuple(DIFFUSERS_PREFIXES)) for key in keys):
        return "diffusers"
    return "unknown"


def parse_key(key: str, kind: str) -> Optional[LoraKey]:
    """The module, component and role of a file's tensor name in format `kind`, or None if it is not one."""
    prefixes, suffixes = (KOHYA_PREFIXES, KOHYA_SUFFIXES) if kind == "kohya" else (DIFFUSERS_PREFIXES, DIFFUSERS_SUFFIXES)
    prefix = next((p for p in prefixes if key.startswith(p)), None)
    suffix = next((s for s in suffixes if key.endswith(s)), None)
    if prefix is None or suffix is None or len(key) <= len(prefix) + len(suffix):
        return None
    module = key[len(prefix):-len(suffix)]
    if kind == "kohya":
        module = dotted_path(module)
    return LoraKey(module, prefixes[prefix], suffixes[suffix])


def dotted_path(name: str) -> str:
    """A kohya module name as a dotted path: 'down_blocks_0_attentions_0_proj_in' -> 'down_blocks.0.attentions.0.proj_in'."""
    words, parts, index = name.split("_"), [], 0
    while index < len(words):
        size = next(size for size in (3, 2, 1)
                    if size == 1 or "_".join(words[index:index + size]) in MULTI_WORD_PARTS)
        parts.append("_".join(words[index:index + size]))
        index += size
    return ".".join(parts)


def parameter_mapper(layers_per_block: int, up_blocks_with_attention: set[int]) -> Callable[[LoraKey], Optional[str]]:
    """module path -> the full name of its weight in this project's model (`model.diffusion_model.` ...,
    `cond_stage_model.` ...), or None when the model has no such layer."""
    unet_name = partial(unet_key, layers_per_block=layers_per_block, up_blocks_with_attention=up_blocks_with_attention)

    def parameter(key: LoraKey) -> Optional[str]:
        if key.component == "UNet":
            name = unet_name(f"{key.module}.weight")
        else:
            name = text_encoder_key(f"{key.module}.weight")
        return None if name is None else COMPONENT_PREFIXES[key.component] + name

    return parameter
