"""Reading a diffusers-format SD v1 pipeline folder as one CompVis-named state dict, without diffusers.

A folder written by `StableDiffusionPipeline.save_pretrained` (or downloaded as such) holds
`model_index.json` and one subfolder per component; the weights used here are

    unet/diffusion_pytorch_model[.fp16].safetensors   (or .bin)
    vae/diffusion_pytorch_model[.fp16].safetensors    (or .bin)
    text_encoder/model[.fp16].safetensors             (or pytorch_model.bin)

plus each component's `config.json` (the UNet's layers_per_block, the VAE's scaling_factor). The
tokenizer, scheduler and safety checker are not read: this project builds its own from the model config.

safetensors files are preferred over `.bin` when both exist; every file goes through `load_checkpoint`,
so safetensors are memory-mapped and `.bin` pickles are read by the weights-only loader with its
allow-list, like a `.ckpt`. A sharded component (`*.index.json` naming its shard files) is read shard by
shard. Everything that can be checked without reading tensors is checked by `inspect_diffusers_folder`,
which the CLI runs before the slow load.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch

from ldm.checkpoint.diffusers_keys import convert_component, text_encoder_key, unet_key, vae_key
from ldm.checkpoint.errors import CheckpointMismatchError, CheckpointReadError

MODEL_INDEX = "model_index.json"
# component -> (subfolder, weight file stem)
COMPONENT_FILES = {"UNet": ("unet", "diffusion_pytorch_model"), "VAE": ("vae", "diffusion_pytorch_model"),
                   "text encoder": ("text_encoder", "model")}
BIN_STEMS = {"diffusion_pytorch_model": "diffusion_pytorch_model", "model": "pytorch_model"}
SD_V1_SCALE_FACTOR = 0.18215
MAX_JSON_BYTES = 16 * 2 ** 20  # a pipeline's config.json files are a few KiB, a shard index a few hundred


@dataclass(frozen=True)
class DiffusersFolder:
    """A checked pipeline folder: the weight files chosen for each component, and their configs."""

    path: Path
    files: dict[str, tuple[Path, ...]]  # component -> weight files (several when sharded)
    configs: dict[str, dict[str, Any]]  # component -> its config.json (empty if absent)

    @property
    def weight_files(self) -> list[Path]:
        return [file for files in self.files.values() for file in files]


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MODEL_INDEX))


def inspect_diffusers_folder(path: str | os.PathLike) -> DiffusersFolder:
    """Check that `path` is an SD v1 pipeline folder and choose its weight files; reads no tensors."""
    root = Path(path)
    index = _read_json(root / MODEL_INDEX, root)
    pipeline = str(index.get("_class_name", "?"))
    missing = [folder for folder, _ in COMPONENT_FILES.values() if folder not in index]
    if missing or "XL" in pipeline:
        raise CheckpointMismatchError(
            f"{root} is a {pipeline} folder without the SD v1 components ({', '.join(missing) or 'an SDXL pipeline'}"
            "); give an SD v1 pipeline folder (model_index.json with unet, vae and text_encoder) or a .ckpt file")
    files, configs = {}, {}
    for component, (folder, stem) in COMPONENT_FILES.items():
        files[component] = _weight_files(root / folder, stem, component)
        config_file = root / folder / "config.json"
        configs[component] = _read_json(config_file, root) if config_file.is_file() else {}
    for key in ("layers_per_block", "in_channels"):  # what loading and peek read of the UNet's config
        config_number(configs, "UNet", key, 0, root, whole=True)
    scale = config_number(configs, "VAE", "scaling_factor", SD_V1_SCALE_FACTOR, root)
    if abs(scale - SD_V1_SCALE_FACTOR) > 1e-6:
        raise CheckpointMismatchError(
            f"{root}: its VAE has scaling_factor {scale}, SD v1's is {SD_V1_SCALE_FACTOR}; the folder is not an "
            "SD v1 pipeline (SDXL's VAE, say), so it was not loaded")
    return DiffusersFolder(root, files, configs)


def _read_json(file: Path, root: Path) -> dict[str, Any]:
    """A JSON object from a regular file of at most MAX_JSON_BYTES."""
    from ldm.files import read_text
    try:
        value = json.loads(read_text(file, "JSON file", "a diffusers pipeline folder", MAX_JSON_BYTES))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = str(error).replace(str(file), file.name)[:200] or type(error).__name__
        raise CheckpointReadError(f"{root}: cannot read {file.name} ({type(error).__name__}: {reason}); the folder "
                                  "is incomplete or damaged: download or save it again") from None
    if not isinstance(value, dict):
        raise CheckpointReadError(f"{root}: {file.name} holds no JSON object; save the pipeline again")
    return value


def config_number(configs: dict[str, dict[str, Any]], component: str, key: str, default: Any, root: Path,
                  whole: bool = False) -> Any:
    """A component config's number (`whole`: a whole number), or `default` when absent; a value of
    another type (a string, null, a list) is refused naming the file and the key."""
    value = configs[component].get(key, default)
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (not whole and not math.isfinite(value)):
        raise CheckpointReadError(f"{root}: {COMPONENT_FILES[component][0]}/config.json has {key} = "
                                  f"{json.dumps(value)[:80]}, where a {'whole ' if whole else ''}number goes; the "
                                  "folder is damaged: download or save it again")
    return value if whole else float(value)


def _weight_files(folder: Path, stem: str, component: str) -> tuple[Path, ...]:
    """The component's weights: safetensors before .bin, the full-precision file before the fp16 variant."""
    names = [f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{BIN_STEMS[stem]}.bin", f"{BIN_STEMS[stem]}.fp16.bin"]
    for name in names:
        if (folder / name).is_file():
            return (folder / name,)
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = _read_json(index, folder.parent).get("weight_map", {})
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointReadError(f"{folder}: {index.name} has no weight_map of tensor names to shard "
                                          "files; download the folder again")
            shards = sorted(set(weight_map.values()))
            # a shard is a file of this folder, named without any path (no '../', no '/')
            absent = [shard for shard in shards if Path(shard).name != shard or not (folder / shard).is_file()]
            if not shards or absent:
                raise CheckpointReadError(f"{folder}: {index.name} names shards that are missing "
                                          f"({', '.join(absent) or 'none listed'}); download the folder again")
            return tuple(folder / shard for shard in shards)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointReadError(
        f"{folder.parent}: no {component} weights in {folder.name}/ (looked for {', '.join(names[:3])}; found "
        f"{', '.join(present) or 'nothing'}); the folder is incomplete: download or save it again")


def load_diffusers_state_dict(path: str | os.PathLike,
                              device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], DiffusersFolder]:
    """The folder's UNet, VAE and text encoder weights under this project's names (memory-mapped)."""
    from ldm.checkpoint.files import load_state_dict_file

    folder = inspect_diffusers_folder(path)
    layers = config_number(folder.configs, "UNet", "layers_per_block", 2, folder.path, whole=True)
    mappers = {"text encoder": text_encoder_key}
    state_dict: dict[str, torch.Tensor] = {}
    raw: dict[str, dict[str, torch.Tensor]] = {}
    for component, files in folder.files.items():
        raw[component] = {}
        for file in files:
            raw[component].update(load_state_dict_file(file, device))
    # Which up levels hold attention decides where their upsampler sits (see diffusers_keys).
    up_levels = {int(key.split(".")[1]) for key in raw["UNet"]
                 if key.startswith("up_blocks.") and ".attentions." in key}
    vae_levels = 1 + max((int(key.split(".")[2]) for key in raw["VAE"] if key.startswith("decoder.up_blocks.")),
                         default=-1)
    mappers["UNet"] = partial(unet_key, layers_per_block=layers, up_blocks_with_attention=up_levels)
    mappers["VAE"] = partial(vae_key, levels=vae_levels)
    for component, weights in raw.items():
        state_dict.update(convert_component(component, weights, str(folder.path), mappers[component]))
    return state_dict, folder


def folder_fingerprint(path: str | os.PathLike, file_fingerprint: Any) -> str:
    """A short name of the folder's weights: the hash of its weight files' own fingerprints, in order."""
    return files_fingerprint(inspect_diffusers_folder(path).weight_files, file_fingerprint)


def files_fingerprint(files: Sequence[Path], file_fingerprint: Any) -> str:
    """'folder-sha256:...': the hash of the files' own fingerprints, in order."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file_fingerprint(file).encode())
    return f"folder-sha256:{digest.hexdigest()[:16]}"

