"""Reading a checkpoint file into a flat {name: tensor} dict, memory-mapped, without running code from it.

Formats, told apart by the file's first bytes (`checkpoint_format`), never by its name, so a safetensors
file called `model.ckpt` loads as what it is:
- safetensors: an 8-byte little-endian header length, then the JSON header (`{`); read through safetensors'
  memory map; the header's string metadata becomes `metadata`.
- torch.save files (`.ckpt`, `.pt`, `.pth` by habit): a zip archive (`PK\x03\x04`, torch >= 1.6) or a legacy
  pickle (opcode PROTO, `\x80`), read by `torch.load(weights_only=True, mmap=True)` with the allow-list of
  `ldm.checkpoint.safe_pickle`. Only the legacy format is read without mmap, because torch cannot map it.

`checkpoint_fingerprint` names a file's content cheaply (a hash of its size and of 16 evenly spaced
64 KiB samples, 1 MiB read whatever the size), so a PNG can record which weights made it.

Memory-mapped tensors are views of a private (copy-on-write) mapping of the file: pages are read from disk
when first touched, the file's bytes are never copied up front, and writing to a tensor never changes the file.

A Lightning checkpoint is `{"state_dict": {...}, "global_step": ..., "epoch": ..., "callbacks": ...}`: its
state dict is unwrapped and the other top-level entries become `metadata`. A file holding a flat state dict
has empty metadata.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from ldm.checkpoint.errors import CheckpointError, CheckpointReadError
from ldm.files import file_kind, open_regular_file
from ldm.checkpoint.safe_pickle import (call_refusing_unsafe, describe_torch_error, find_unsafe_globals,
                                       unsafe_checkpoint_error)

TORCH_EXTENSIONS = (".ckpt", ".pt", ".pth")
SAFETENSORS_EXTENSIONS = (".safetensors",)
SUPPORTED_EXTENSIONS = TORCH_EXTENSIONS + SAFETENSORS_EXTENSIONS
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format (torch >= 1.6) is a zip archive
_PICKLE_PROTO = 0x80  # the first opcode of a pickle of protocol 2 or later, as legacy torch.save writes
FINGERPRINT_SAMPLES, FINGERPRINT_SAMPLE_BYTES = 16, 64 * 1024


@dataclass
class LoadedCheckpoint:
    """A checkpoint's tensors and its other top-level entries (Lightning's global_step, epoch, ...)."""

    path: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def global_step(self) -> Optional[int]:
        step = self.metadata.get("global_step")
        return step if isinstance(step, int) and not isinstance(step, bool) else None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Read a checkpoint file safely: its tensors (memory-mapped where possible) and top-level metadata.

    A diffusers-format SD v1 pipeline folder is read too, its weights renamed to this project's keys
    (`ldm.checkpoint.diffusers_folder`); its metadata then names the pipeline class."""
    from ldm.checkpoint.diffusers_folder import is_diffusers_folder, load_diffusers_state_dict
    if is_diffusers_folder(path):
        state_dict, folder = load_diffusers_state_dict(path, device)
        return LoadedCheckpoint(path=os.fspath(path), state_dict=state_dict, metadata={"diffusers_folder": True})
    path = _checked_path(path)
    if checkpoint_format(path) == "safetensors":
        state_dict, metadata = _read_safetensors(path, device)
    else:
        state_dict, metadata = _unwrap_state_dict(_read_torch_file(path, device), path)
    return LoadedCheckpoint(path=path, state_dict=state_dict, metadata=metadata)


def checkpoint_format(path: str | os.PathLike) -> str:
    """'safetensors', 'torch-zip' or 'torch-legacy', from the file's first bytes; anything else is refused."""
    path = _checked_path(path)
    with open_regular_file(path, "checkpoint", "the .ckpt or .safetensors file itself") as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(9)
    header_length = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if 2 <= header_length <= size - 8 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if len(head) >= 2 and head[0] == _PICKLE_PROTO and 2 <= head[1] <= 5:
        return "torch-legacy"
    what = "is empty" if size == 0 else f"starts with {head[:8]!r}"
    raise CheckpointReadError(
        f"{path} {what}, which is neither a safetensors file nor a torch.save checkpoint (zip archive or legacy "
        "pickle), the formats of .safetensors and .ckpt files; it is probably truncated or corrupt: download it again"
    )


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """A short name of the file's content, e.g. 'sample-sha256:1f0c...': the SHA-256 of the file size and of
    FINGERPRINT_SAMPLES evenly spaced blocks of FINGERPRINT_SAMPLE_BYTES (the first and the last included).

    Cheap for any size (1 MiB read) and independent of the file's name, folder and dates; it identifies which
    weights were used, it is not an integrity check (two files differing only between the samples share it).
    A diffusers pipeline folder is named by its weight files' fingerprints (`folder-sha256:...`).
    """
    from ldm.checkpoint.diffusers_folder import folder_fingerprint, is_diffusers_folder
    if is_diffusers_folder(path):
        return folder_fingerprint(path, checkpoint_fingerprint)
    path = _checked_path(path)
    size = os.path.getsize(path)
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    last = max(0, size - FINGERPRINT_SAMPLE_BYTES)
    offsets = sorted({round(i * last / (FINGERPRINT_SAMPLES - 1)) for i in range(FINGERPRINT_SAMPLES)})
    with open(path, "rb") as handle:
        for offset in offsets:
            handle.seek(offset)
            digest.update(handle.read(FINGERPRINT_SAMPLE_BYTES))
    return f"sample-sha256:{digest.hexdigest()[:16]}"


def load_state_dict_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The {name: tensor} dict of a `.ckpt`/`.pt`/`.pth`/`.safetensors` file, read safely and memory-mapped."""
    return load_checkpoint(path, device).state_dict


def _checked_path(path: str | os.PathLike) -> str:
    path = os.fspath(os.path.expanduser(path))
    if os.path.isdir(path):
        inside = sorted(name for name in os.listdir(path) if name.lower().endswith(SUPPORTED_EXTENSIONS))
        hint = f" It contains {', '.join(inside)}." if inside else ""
        raise IsADirectoryError(f"checkpoint path {path} is a directory without model_index.json, so neither a "
                                f"checkpoint file nor a diffusers pipeline folder; pass the checkpoint file itself "
                                f"or the pipeline folder.{hint}")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; check the path (SD v1 weights are e.g. "
            "models/ldm/stable-diffusion-v1/model.ckpt, downloaded by you, never by this code)"
        )
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):  # a FIFO would block the first read, a device never end
        raise CheckpointReadError(f"checkpoint {path} is {file_kind(mode)}, not a file; give the .ckpt or "
                                  ".safetensors file itself")
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
    is_zip = checkpoint_format(path) == "torch-zip"
    if is_zip:
        unsafe = find_unsafe_globals(path)
        if unsafe:
            raise unsafe_checkpoint_error(path, unsafe)
    # torch.load hands a *path* ending in .safetensors to safetensors, whatever the file holds; such a
    # misnamed torch file is read through a file object instead, which torch cannot memory-map.
    by_name = not path.lower().endswith(SAFETENSORS_EXTENSIONS)

    def load() -> Any:
        if by_name:
            return torch.load(path, map_location=device, weights_only=True, mmap=is_zip)
        with open(path, "rb") as handle:
            return torch.load(handle, map_location=device, weights_only=True)

    try:
        return call_refusing_unsafe(path, load)
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
