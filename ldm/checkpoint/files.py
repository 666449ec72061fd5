"""Reading a checkpoint file into a flat {name: tensor} dict, memory-mapped, without running code from it.

Formats, chosen by the file's extension:
- `.safetensors`: read through safetensors' memory map; the header's string metadata becomes `metadata`.
- `.ckpt`, `.pt`, `.pth`: `torch.save` files, read by `torch.load(weights_only=True, mmap=True)` with the
  allow-list of `ldm.checkpoint.safe_pickle`. Only the legacy (pre-1.6, non-zip) format is read without mmap,
  because torch cannot map it.

Memory-mapped tensors are views of a private (copy-on-write) mapping of the file: pages are read from disk
when first touched, the file's bytes are never copied up front, and writing to a tensor never changes the file.

A Lightning checkpoint is `{"state_dict": {...}, "global_step": ..., "epoch": ..., "callbacks": ...}`: its
state dict is unwrapped and the other top-level entries become `metadata`. A file holding a flat state dict
has empty metadata.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from ldm.checkpoint.errors import CheckpointError, CheckpointReadError
from ldm.checkpoint.safe_pickle import (call_refusing_unsafe, describe_torch_error, find_unsafe_globals,
                                       unsafe_checkpoint_error)

TORCH_EXTENSIONS = (".ckpt", ".pt", ".pth")
SAFETENSORS_EXTENSIONS = (".safetensors",)
SUPPORTED_EXTENSIONS = TORCH_EXTENSIONS + SAFETENSORS_EXTENSIONS
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format (torch >= 1.6) is a zip archive


@dataclass
class LoadedCheckpoint:
    """A checkpoint's tensors and its other top-level entries (Lightning's global_step, epoch, ...)."""

    path: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def global_step(self) -> Optional[int]:
        step = self.metadata.get("global_step")
        return None if step is None else int(step)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Read a checkpoint file safely: its tensors (memory-mapped where possible) and top-level metadata."""
    path = _checked_path(path)
    if path.lower().endswith(SAFETENSORS_EXTENSIONS):
        state_dict, metadata = _read_safetensors(path, device)
    else:
        state_dict, metadata = _unwrap_state_dict(_read_torch_file(path, device), path)
    return LoadedCheckpoint(path=path, state_dict=state_dict, metadata=metadata)


def load_state_dict_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The {name: tensor} dict of a `.ckpt`/`.pt`/`.pth`/`.safetensors` file, read safely and memory-mapped."""
    return load_checkpoint(path, device).state_dict


def _checked_path(path: str | os.PathLike) -> str:
    path = os.fspath(os.path.expanduser(path))
    if os.path.isdir(path):
        inside = sorted(name for name in os.listdir(path) if name.lower().endswith(SUPPORTED_EXTENSIONS))
        hint = f" It contains {', '.join(inside)}." if inside else ""
        raise IsADirectoryError(f"checkpoint path {path} is a directory; pass the checkpoint file itself.{hint}")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; check the path (SD v1 weights are e.g. "
            "models/ldm/stable-diffusion-v1/model.ckpt, downloaded by you, never by this code)"
        )
    if not path.lower().endswith(SUPPORTED_EXTENSIONS):
        raise CheckpointReadError(
            f"cannot tell the format of {path} from its extension; supported: {', '.join(SUPPORTED_EXTENSIONS)}. "
            "Rename the file if it is one of these."
        )
    return path


def _read_safetensors(path: str, device: str | torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device=str(device)) as handle:
            metadata = dict(handle.metadata() or {})
            # get_tensor returns views of safetensors' private mapping of the file: no copy is made here.
            state_dict = {name: handle.get_tensor(name) for name in handle.keys()}
    except SafetensorError as error:
        raise CheckpointReadError(
            f"could not read {path} as safetensors ({error}); it is probably truncated or corrupt: download it again"
        ) from None
    return state_dict, metadata


def _read_torch_file(path: str, device: str | torch.device) -> Any:
    with open(path, "rb") as handle:
        is_zip = handle.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    if is_zip:
        unsafe = find_unsafe_globals(path)
        if unsafe:
            raise unsafe_checkpoint_error(path, unsafe)
    try:
        return call_refusing_unsafe(
            path, lambda: torch.load(path, map_location=device, weights_only=True, mmap=is_zip)
        )
    except CheckpointError:
        raise
    except Exception as error:  # whatever torch's parsers raise on a damaged file: zip, legacy or pickle errors
        raise CheckpointReadError(
            f"could not read {path} as a torch checkpoint ({describe_torch_error(error)}); it is probably "
            "truncated or corrupt: download it again"
        ) from None


def _unwrap_state_dict(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state_dict = obj["state_dict"]
        metadata = {key: value for key, value in obj.items() if key != "state_dict"}
    elif isinstance(obj, Mapping):
        state_dict, metadata = obj, {}
    else:
        raise CheckpointReadError(
            f"{path} holds a {type(obj).__name__}, not a state dict; expected a mapping of parameter names to "
            "tensors, or a Lightning checkpoint with a 'state_dict' entry"
        )
    bad = [repr(key) for key, value in state_dict.items() if not (isinstance(key, str) and torch.is_tensor(value))]
    if bad:
        raise CheckpointReadError(
            f"{path}: {len(bad)} state dict entries are not name -> tensor pairs (e.g. {', '.join(bad[:5])}); "
            f"top-level keys are {sorted(map(str, obj))[:10]}. Expected a mapping of parameter names to tensors, "
            "or a Lightning checkpoint with a 'state_dict' entry."
        )
    return dict(state_dict), metadata
