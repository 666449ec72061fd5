"""Loading a ControlNet: a published ControlNet v1.1 file, or a diffusers-format ControlNetModel folder.

Files (`.pth`, `.safetensors`, ...) are read by `load_checkpoint`: safetensors memory-mapped, pickles by the
weights-only unpickler. They hold the published cldm names under `control_model.` (control_v11*_sd15_*.pth,
listed in tests/data/controlnet-v11-sd15-keys.tsv); some are distributed without the prefix, and ControlNet
v1.0 files hold the whole ControlLDM, whose other parts (the SD v1 model) are not used here.

A diffusers folder (`config.json` with "_class_name": "ControlNetModel", weights in
`diffusion_pytorch_model[.fp16].safetensors` or `.bin`) is renamed by `diffusers_keys.controlnet_key`, without
diffusers. Its config's `global_pool_conditions` is honoured, and a `bgr` conditioning channel order is turned
into RGB by reversing the input channels of the hint encoder's first convolution (the same function of an
RGB hint as the file's of a BGR one).

The ControlNet is built from a config (configs/controlnet/cldm-v15.yaml by default) with its parameters on
meta, and the file's tensors are assigned to it (no copy). Before that, the file is refused in one line when it
was made for another base (`bases`), or has names or shapes the ControlNet does not have, or lacks weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.checkpoint.bases import context_width, refuse_other_base
from ldm.checkpoint.errors import CheckpointMismatchError, CheckpointReadError
from ldm.checkpoint.keys import component_of, summarize_keys

CONTROL_PREFIX = "control_model."
DEFAULT_CONTROLNET_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "controlnet" / "cldm-v15.yaml"
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_CLASS = "ControlNetModel"


def is_controlnet_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding a diffusers model config (a ControlNetModel folder, if anything)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, DIFFUSERS_CONFIG))


def controlnet_fingerprint(path: str | os.PathLike) -> str:
    """The content fingerprint of a ControlNet file or folder (see `checkpoint_fingerprint`)."""
    from ldm.checkpoint.diffusers_folder import files_fingerprint
    from ldm.checkpoint.files import checkpoint_fingerprint

    if is_controlnet_folder(path):
        return files_fingerprint(_folder_weight_files(Path(path)), checkpoint_fingerprint)
    return checkpoint_fingerprint(path)


def load_controlnet(path: str | os.PathLike, config: Any = DEFAULT_CONTROLNET_CONFIG,
                    device: str | torch.device = "cpu") -> torch.nn.Module:
    """The ControlNet in `path` (file or diffusers folder), built from `config` (a YAML path, or a mapping with
    `model: {target, params}`), in eval mode on `device`. Raises `CheckpointError`s naming what is wrong."""
    from ldm.checkpoint.loading import _as_config, load_state_dict_into, parameters_on_meta
    from ldm.util import instantiate_from_config

    source = os.fspath(path)
    config = _as_config(config)
    with parameters_on_meta():
        model = instantiate_from_config(config["model"])
    expected_width = int(context_width(model.state_dict(keep_vars=True)))
    if is_controlnet_folder(path):
        state_dict, options = read_controlnet_folder(path, expected_width)
        model.global_average_pooling = bool(options.get("global_pool_conditions", model.global_average_pooling))
    else:
        state_dict = controlnet_weights(_load_file(path), source)
        refuse_other_base(source, "ControlNet", context_width(state_dict), expected_width)
    refuse_mismatched_weights(state_dict, model.state_dict(keep_vars=True), source)
    load_state_dict_into(model, state_dict, source=source, verbose=False)
    if torch.device(device).type != "cpu":
        model.to(device)
    return model.eval()


def _load_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from ldm.checkpoint.files import load_checkpoint

    if os.path.isdir(path):  # load_checkpoint would take an SD pipeline folder for a ControlNet
        raise CheckpointReadError(f"{os.fspath(path)} is a folder without {DIFFUSERS_CONFIG}, so neither a ControlNet "
                                  "file nor a diffusers ControlNetModel folder; pass the .pth/.safetensors file itself")
    return load_checkpoint(path).state_dict


def controlnet_weights(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors in the published names without `control_model.`: the prefixed ones when the
    file has any (the rest of a v1.0 ControlLDM file is the SD model, unused here), else all of them."""
    prefixed = {key[len(CONTROL_PREFIX):]: tensor for key, tensor in state_dict.items()
                if key.startswith(CONTROL_PREFIX)}
    if prefixed:
        return prefixed
    if any(component_of(key) for key in state_dict):
        raise CheckpointMismatchError(f"{source} holds a Stable Diffusion model (model.diffusion_model.*, ...) and no "
                                      "ControlNet (control_model.*), so it was not loaded; pass a ControlNet file")
    return dict(state_dict)


def refuse_mismatched_weights(state_dict: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                              source: str) -> None:
    """One-line refusal of names the ControlNet lacks, weights the file lacks, or shapes that differ."""
    unknown = [key for key in state_dict if key not in targets]
    missing = [key for key in targets if key not in state_dict]
    wrong = [f"{key} {tuple(state_dict[key].shape)} vs {tuple(tensor.shape)}" for key, tensor in targets.items()
             if key in state_dict and state_dict[key].shape != tensor.shape]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} tensors a ControlNet of this config does not have ({summarize_keys(unknown, 3)})")
    if missing:
        problems.append(f"{len(missing)} of its {len(targets)} weights missing ({summarize_keys(missing, 3)})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of other shapes, file vs model ({summarize_keys(wrong, 3)})")
    if problems:
        raise CheckpointMismatchError(f"{source} does not fit the ControlNet config: {'; '.join(problems)}; it was not "
                                      "loaded. Is it a ControlNet for SD v1 (control_v11*_sd15_*), and the config its own?")


def read_controlnet_folder(path: str | os.PathLike,
                           expected_width: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A diffusers ControlNetModel folder's weights in the published names, and its config.json."""
    from ldm.checkpoint.diffusers_keys import controlnet_key
    from ldm.checkpoint.files import load_state_dict_file

    root = Path(path)
    config = _folder_config(root)
    refuse_other_base(str(root), "ControlNet", int(config.get("cross_attention_dim", expected_width)), expected_width)
    layers = int(config.get("layers_per_block", 2))
    raw: dict[str, torch.Tensor] = {}
    for file in _folder_weight_files(root):
        raw.update(load_state_dict_file(file))
    state_dict, unknown = {}, []
    for key, tensor in raw.items():
        name = controlnet_key(key, layers)
        if name is None:
            unknown.append(key)
        else:
            state_dict[name] = tensor
    if unknown:
        raise CheckpointMismatchError(f"{root}: {len(unknown)} tensors have names an SD v1 ControlNetModel does not have "
                                      f"({summarize_keys(unknown, 3)}); it was not loaded")
    if config.get("controlnet_conditioning_channel_order", "rgb") == "bgr":
        first = "input_hint_block.0.weight"
        state_dict[first] = state_dict[first].flip(1)  # (C_out, C_hint, 3, 3): reads the hint's channels reversed
    return state_dict, config


def _folder_config(root: Path) -> dict[str, Any]:
    try:
        config = json.loads((root / DIFFUSERS_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointReadError(f"{root}: cannot read {DIFFUSERS_CONFIG} ({type(error).__name__}: {error}); the folder "
                                  "is damaged: download or save it again") from None
    if not isinstance(config, dict) or config.get("_class_name") != DIFFUSERS_CLASS:
        kind = config.get("_class_name", "?") if isinstance(config, dict) else "?"
        raise CheckpointMismatchError(f"{root} holds a {kind}, not a {DIFFUSERS_CLASS}; give a ControlNet folder or file")
    if config.get("addition_embed_type") is not None:  # SDXL's added text and size embeddings
        raise CheckpointMismatchError(f"{root} is a ControlNet for SDXL (addition_embed_type "
                                      f"{config['addition_embed_type']!r}), so it was not loaded; use one made for SD v1")
    return config


def _folder_weight_files(root: Path) -> tuple[Path, ...]:
    from ldm.checkpoint.diffusers_folder import _weight_files

    return _weight_files(root, "diffusion_pytorch_model", "ControlNet")
