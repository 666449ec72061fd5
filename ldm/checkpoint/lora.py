"""LoRA files applied to a loaded model as weight deltas: W += scale * (alpha / rank) * up @ down.

A LoRA (low-rank adaptation) file stores, for each adapted layer of the UNet or the text encoder, a pair
`down` (rank, in[, kh, kw]) and `up` (out, rank[, 1, 1]) whose product is a change of the layer's weight, and
optionally `alpha`, which scales it by alpha / rank (no alpha: alpha = rank). Linear layers and convolutions
(1x1 and the 3x3 ones kohya's LoCon trains) are supported: for a convolution, `up` is 1x1 and the product is
taken over the flattened kernel, which is the weight of the two convolutions run one after the other. The
delta is merged into the weight once, at load time, so sampling costs nothing extra and the UNet's attention
(where batch sharing lives) is unchanged in its code.

Names (kohya / A1111 and diffusers formats) are read by `lora_keys`. A file is read safely (`load_checkpoint`:
safetensors memory-mapped, `.bin`/`.pt` by the weights-only unpickler) and checked against the model before
any weight changes: names the model lacks, pairs without a partner, ranks that disagree, shapes that do not
fit, non-finite numbers and files made for another base are refused in one line naming them
(`CheckpointMismatchError`, `OtherBaseModelError`). The model may still be on the meta device when a file is
read, so a front end can check LoRA files before the base model's weights load.

diffusers writes a PEFT config into a safetensors header (`lora_adapter_metadata`); its `<component>.lora_alpha`
is honoured, per-module alpha patterns are refused rather than guessed at.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ldm.checkpoint.bases import context_width, refuse_other_base
from ldm.checkpoint.errors import CheckpointMismatchError, OtherBaseModelError
from ldm.checkpoint.keys import summarize_keys
from ldm.checkpoint.lora_keys import DIFFUSERS_PREFIXES, LoraKey, file_format, parameter_mapper, parse_key
from ldm.errors import InvalidValue

PEFT_METADATA = "lora_adapter_metadata"  # diffusers' safetensors header entry holding the PEFT config


@dataclass(frozen=True)
class LoraLayer:
    """One adapted weight: `target` is its full name in the model (e.g. `model.diffusion_model.input_blocks.1.1
    .transformer_blocks.0.attn1.to_q.weight`); `alpha` None means alpha = rank."""

    target: str
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: Optional[float] = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> torch.Size:
        """The shape of the weight this layer changes: (out, in) or (out, in, kh, kw)."""
        return torch.Size((self.up.shape[0], *self.down.shape[1:]))

    def delta(self) -> torch.Tensor:
        """(alpha / rank) * up @ down in float32, shaped as the weight."""
        weight = (self.alpha if self.alpha is not None else self.rank) / self.rank
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)  # (out, in * kh * kw)
        return (weight * product).reshape(self.shape)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read and checked against a model: its layers under the model's names."""

    path: str
    format: str  # "kohya" or "diffusers"
    fingerprint: str
    layers: tuple[LoraLayer, ...]


@dataclass(frozen=True)
class LoraProvenance:
    """Which LoRA weights made an image: the file's name, its content fingerprint and the scale used."""

    file: str
    fingerprint: str
    scale: float
    format: str
    layers: int

    def as_metadata(self) -> dict[str, Any]:
        return {"file": self.file, "fingerprint": self.fingerprint, "scale": self.scale, "format": self.format,
                "layers": self.layers}


def apply_loras(model: nn.Module, files: Sequence[tuple[str | os.PathLike, float]]) -> tuple[LoraProvenance, ...]:
    """Merge each (path, scale) LoRA into `model` in order. Every file is read and checked first, so a bad
    file leaves the model untouched."""
    loras = [(read_lora(path, model), check_scale(scale)) for path, scale in files]
    return tuple(merge_lora(model, lora, scale) for lora, scale in loras)


def check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidValue("lora_scale", scale, "a LoRA's scale must be a finite number (1: as trained, 0: off)")
    return float(scale)


def read_lora(path: str | os.PathLike, model: nn.Module) -> LoraFile:
    """Read the LoRA file `path` and check it fits `model` (a LatentDiffusion model, its weights loaded or
    still on meta); nothing of the model changes."""
    from ldm.checkpoint.files import checkpoint_fingerprint, load_checkpoint

    source = os.fspath(path)
    checkpoint = load_checkpoint(path)
    tensors = checkpoint.state_dict
    kind = file_format(list(tensors))
    if kind == "sdxl":
        raise OtherBaseModelError(f"{source} is a LoRA for SDXL (kohya's names for SDXL's two text encoders or its "
                                  "UNet), so it was not loaded; use a LoRA made for SD v1")
    if kind == "unknown":
        raise CheckpointMismatchError(
            f"{source} holds no LoRA tensors this program knows ({summarize_keys(list(tensors), 3)}); expected kohya "
            "names (lora_unet_*, lora_te_* with .lora_down/.lora_up/.alpha) or diffusers names (unet.*, "
            "text_encoder.* with .lora_A/.lora_B or .lora.down/.lora.up)")
    default_alphas = _peft_alphas(checkpoint.metadata, source) if kind == "diffusers" else {}
    layers = _layers(tensors, kind, model, default_alphas, source)
    return LoraFile(source, kind, checkpoint_fingerprint(path), layers)


def merge_lora(model: nn.Module, lora: LoraFile, scale: float) -> LoraProvenance:
    """W += scale * delta for every layer of `lora` (read for this model), in the weights' own dtype."""
    scale = check_scale(scale)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for layer in lora.layers:
            weight = parameters[layer.target]
            if weight.is_meta:
                raise CheckpointMismatchError(f"{layer.target} has no value yet: load the model's weights before "
                                              f"merging {lora.path}")
            # In float32 whatever the weights' dtype, then rounded once.
            weight.copy_((weight.float() + scale * layer.delta().to(weight.device)).to(weight.dtype))
    return LoraProvenance(Path(lora.path).name, lora.fingerprint, scale, lora.format, len(lora.layers))


def _peft_alphas(metadata: Mapping[str, Any], source: str) -> dict[str, float]:
    """{component: lora_alpha} from diffusers' PEFT metadata, if the file has it."""
    text = metadata.get(PEFT_METADATA)
    if text is None:
        return {}
    try:
        config = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        raise CheckpointMismatchError(f"{source}: its {PEFT_METADATA} header is not JSON; save the LoRA again") from None
    alphas = {}
    for prefix, component in DIFFUSERS_PREFIXES.items():
        if config.get(f"{prefix}alpha_pattern"):
            raise CheckpointMismatchError(f"{source}: its PEFT config gives per-module alphas ({prefix}alpha_pattern), "
                                          "which this program does not apply; merge them into the weights first")
        alpha = config.get(f"{prefix}lora_alpha")
        if alpha is not None:
            alphas[component] = float(alpha)
    return alphas


def _layers(tensors: Mapping[str, torch.Tensor], kind: str, model: nn.Module, default_alphas: Mapping[str, float],
            source: str) -> tuple[LoraLayer, ...]:
    """The file's layers under the model's names; every name, pair, shape and number checked."""
    unet = model.model.diffusion_model
    levels = len(unet.channel_mult)
    up_with_attention = {i for i in range(levels) if 2 ** (levels - 1 - i) in unet.attention_resolutions}
    to_parameter = parameter_mapper(unet.num_res_blocks, up_with_attention)
    parts: dict[LoraKey, dict[str, torch.Tensor]] = {}
    unknown = []
    for name, tensor in tensors.items():
        key = parse_key(name, kind)
        if key is None:
            unknown.append(name)
            continue
        parts.setdefault(LoraKey(key.module, key.component, ""), {})[key.role] = tensor
    targets = {name: p.shape for name, p in model.named_parameters()}
    layers, incomplete, mismatched = [], [], []
    for key, pair in parts.items():
        target = to_parameter(key)
        label = f"{key.component} {key.module}"
        if target is None or target not in targets:
            unknown.append(label)
        elif "down" not in pair or "up" not in pair:
            incomplete.append(f"{label} (no {'down' if 'down' not in pair else 'up'})")
        else:
            alpha = pair.get("alpha")
            layer = LoraLayer(target, pair["down"], pair["up"],
                              float(alpha) if alpha is not None else default_alphas.get(key.component))
            problem = _pair_problem(layer, targets[target])
            if problem:
                mismatched.append(f"{label} ({problem})")
            layers.append(layer)
    # Checked first: a file for another base model names that, rather than a list of odd shapes.
    refuse_other_base(source, "LoRA", context_width({layer.target: layer.shape for layer in layers}),
                      int(context_width(targets)))
    problems = [f"{len(names)} {what} ({summarize_keys(names, 3)})" for what, names in
                (("names this model has no layer for", unknown), ("layers without their pair", incomplete),
                 ("layers that do not fit", mismatched)) if names]
    if problems:
        raise CheckpointMismatchError(f"{source} does not fit this model: {'; '.join(problems)}; it was not applied. "
                                      "Is it a LoRA for SD v1 (kohya/A1111 or diffusers format)?")
    if not layers:
        raise CheckpointMismatchError(f"{source} holds no LoRA layers; it was not applied")
    return tuple(layers)


def _pair_problem(layer: LoraLayer, target: torch.Size) -> Optional[str]:
    down, up = layer.down, layer.up
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        return f"down {tuple(down.shape)} and up {tuple(up.shape)} are not a LoRA pair"
    if up.shape[1] != down.shape[0]:
        return f"ranks differ: down {down.shape[0]}, up {up.shape[1]}"
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        return f"up {tuple(up.shape)} is not a 1x1 convolution"
    if layer.shape != target:
        return f"changes {tuple(layer.shape)}, the weight is {tuple(target)}"
    alpha = layer.alpha if layer.alpha is not None else 1.0
    if not (math.isfinite(alpha) and torch.isfinite(down).all() and torch.isfinite(up).all()):
        return "non-finite numbers"
    return None
