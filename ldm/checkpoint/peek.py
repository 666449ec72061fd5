"""Looking at one fact of a checkpoint without loading it: how many input channels its UNet reads.

That number tells a text-to-image checkpoint (4: the latents) from an inpainting one (9: latents, mask,
masked-image latents), so a front end can refuse the wrong pairing of config and checkpoint before the
slow load. safetensors files answer from their header, torch files from their (memory-mapped) pickle,
diffusers folders from `unet/config.json`.
"""
from __future__ import annotations

import os
from typing import Optional

from ldm.checkpoint.errors import CheckpointReadError
from ldm.checkpoint.keys import COMPONENT_PREFIXES

UNET_INPUT_KEY = COMPONENT_PREFIXES["UNet"] + "input_blocks.0.0.weight"  # (model_channels, in_channels, 3, 3)


def unet_input_channels(path: str | os.PathLike) -> Optional[int]:
    """The UNet's input channels in checkpoint `path` (file or diffusers folder), or None if it has no UNet."""
    from ldm.checkpoint.diffusers_folder import config_number, inspect_diffusers_folder, is_diffusers_folder
    from ldm.checkpoint.files import checkpoint_format, load_checkpoint
    from ldm.checkpoint.keys import remap_checkpoint_keys

    if is_diffusers_folder(path):
        folder = inspect_diffusers_folder(path)
        return config_number(folder.configs, "UNet", "in_channels", None, folder.path, whole=True) \
            if "in_channels" in folder.configs["UNet"] else None
    if checkpoint_format(path) == "safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(os.fspath(path), framework="pt") as handle:
                if UNET_INPUT_KEY not in handle.keys():
                    return None
                shape = handle.get_slice(UNET_INPUT_KEY).get_shape()
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointReadError(f"could not read {path} as safetensors ({error}); it is probably truncated or "
                                      "corrupt: download it again") from None
        if len(shape) != 4:
            raise CheckpointReadError(f"{path}: {UNET_INPUT_KEY} has shape {tuple(shape)}, not that of a UNet's "
                                      "first convolution; it is not an SD v1 checkpoint")
        return int(shape[1])
    # torch files are memory-mapped: only the pickle is read, no tensor data.
    weight = remap_checkpoint_keys(load_checkpoint(path).state_dict).get(UNET_INPUT_KEY)
    if weight is not None and weight.dim() != 4:
        raise CheckpointReadError(f"{path}: {UNET_INPUT_KEY} has shape {tuple(weight.shape)}, not that of a UNet's "
                                  "first convolution; it is not an SD v1 checkpoint")
    return None if weight is None else int(weight.shape[1])
