"""Key conventions of SD v1 checkpoints: the three weight groups, CLIP's `text_model.` level, EMA names.

- `model.diffusion_model.*` is the UNet, `first_stage_model.*` the VAE, `cond_stage_model.*` the CLIP text
  encoder. A file missing weights of any of them cannot make pictures, so loading refuses it instead of
  leaving random weights in place.
- SD v1 files name the CLIP text weights `cond_stage_model.transformer.text_model.<...>` (transformers 4.x);
  files converted with recent transformers lack the `text_model.` level. `remap_checkpoint_keys` restores it.
- EMA: CompVis' LitEma keeps a copy of every trainable parameter of `self.model` (the DiffusionWrapper)
  under `model_ema.<parameter name without dots>`, plus the bookkeeping `model_ema.decay` and
  `model_ema.num_updates`; `*-full-ema.ckpt` files hold them.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch

from ldm.checkpoint.errors import CheckpointMismatchError
from ldm.modules.ema import ema_buffer_name

COMPONENT_PREFIXES = {
    "UNet": "model.diffusion_model.",
    "VAE": "first_stage_model.",
    "text encoder": "cond_stage_model.",
}
DIFFUSION_WRAPPER_PREFIX = "model."
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
CLIP_PREFIX = "cond_stage_model.transformer."
CLIP_TEXT_LEVEL = "text_model."
# The children of CLIPTextTransformer; only keys under these gain the `text_model.` level.
CLIP_TEXT_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm.")


def summarize_keys(keys: Iterable[str], limit: int = 5) -> str:
    """'a, b, c, ... (+N more)': enough to recognise the keys without flooding the terminal."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... (+{len(keys) - limit} more)" if len(keys) > limit else shown


def component_of(key: str) -> Optional[str]:
    """'UNet', 'VAE' or 'text encoder' for a key of those weights, else None (schedule buffers, EMA, ...)."""
    return next((name for name, prefix in COMPONENT_PREFIXES.items() if key.startswith(prefix)), None)


def remap_checkpoint_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with CLIP text keys given their `text_model.` level; other keys (and tensors) unchanged."""
    remapped: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = key
        rest = key[len(CLIP_PREFIX):]
        if key.startswith(CLIP_PREFIX) and rest.startswith(CLIP_TEXT_CHILDREN):
            new_key = CLIP_PREFIX + CLIP_TEXT_LEVEL + rest
            if new_key in state_dict:
                raise CheckpointMismatchError(
                    f"the checkpoint holds both {key} and {new_key}; it is inconsistent, so it was not loaded. "
                    "Re-export it with one CLIP naming."
                )
        remapped[new_key] = tensor
    return remapped


def ema_key(model_key: str) -> str:
    """`model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`."""
    if not model_key.startswith(DIFFUSION_WRAPPER_PREFIX):
        raise ValueError(f"only parameters of the diffusion wrapper ('model.*') have EMA copies, not {model_key}")
    return EMA_PREFIX + ema_buffer_name(model_key[len(DIFFUSION_WRAPPER_PREFIX):])


def has_ema_weights(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith(EMA_PREFIX) and key not in EMA_BOOKKEEPING for key in state_dict)


def ema_weights_for(model_keys: Iterable[str], state_dict: Mapping[str, torch.Tensor],
                    source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """{model key: its EMA tensor in `state_dict`} for the diffusion wrapper's parameters `model_keys`."""
    if not has_ema_weights(state_dict):
        raise CheckpointMismatchError(
            f"{source} has no EMA weights (no 'model_ema.*' tensors besides decay/num_updates), so use_ema=True "
            "cannot be honoured. Load it without use_ema (--use-ema), or use a '*-full-ema.ckpt' file."
        )
    by_ema_key: dict[str, str] = {}
    for key in model_keys:
        name = ema_key(key)
        if name in by_ema_key:
            # Dropping the dots can in principle merge two names; loading either would then be a guess.
            raise CheckpointMismatchError(f"{by_ema_key[name]} and {key} share the EMA name {name}; cannot map EMA")
        by_ema_key[name] = key
    missing = [name for name in by_ema_key if name not in state_dict]
    if missing:
        raise CheckpointMismatchError(
            f"{source} lacks {len(missing)} of the {len(by_ema_key)} EMA weights the UNet needs "
            f"({summarize_keys(missing)}); it was not loaded. Load it without use_ema, or check the config matches."
        )
    return {key: state_dict[name] for name, key in by_ema_key.items()}
