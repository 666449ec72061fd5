"""Loading a checkpoint into a model without a second copy of the weights in memory.

The naive way (build the model with random weights, torch.load the file, load_state_dict) holds the random
weights and the file's tensors at once, plus the copies made while loading: ~2-3x the file size. Instead:
1. `parameters_on_meta` builds the model with every parameter on the meta device: no memory, no random init.
   Buffers are still computed for real at construction: they are small, and some are computed with numpy
   (the noise schedule: `make_beta_schedule` goes through `.numpy()`), which a `torch.device("meta")` context
   cannot run. A buffer the file lacks (the schedule, CLIP's position_ids in converted files) therefore keeps
   the value the model's own code derived.
2. The file is memory-mapped and its tensors are *assigned* to the model (`load_state_dict(assign=True)`):
   the parameters are views of the mapped file, read from disk when first used. Peak RSS ~ file size.
3. Anything still on meta afterwards is in neither the file nor derivable: an error names it. Missing UNet,
   VAE or text-encoder weights are refused before loading, never left as random values.

Dtypes are the file's (an fp16 file gives an fp16 model; casting is the caller's job), except integer
buffers such as position_ids, which keep the model's integer dtype because they are used as indices, and
the noise schedule, which the model always computes from its config in float32 and only compares with
the file's copy (`DDPM._load_from_state_dict`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from ldm.checkpoint.errors import CheckpointMismatchError
from ldm.checkpoint.files import load_checkpoint
from ldm.checkpoint.keys import (COMPONENT_PREFIXES, DIFFUSION_WRAPPER_PREFIX, EMA_BOOKKEEPING, EMA_PREFIX,
                                 component_of, ema_weights_for, remap_checkpoint_keys, summarize_keys)
from ldm.errors import ConfigError
from ldm.util import instantiate_from_config, load_config_file


@dataclass
class LoadReport:
    """What `load_state_dict_into` did; `missing` keys kept the model's own (derived) values."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    unused_ema_weights: int = 0
    used_ema: bool = False


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within this context every plain `nn.Parameter` registered on a module is put on the meta device.

    Patches `nn.Module.register_parameter` for the duration (process-wide, so build one model at a time).
    A layer allocates its weight with `torch.empty` before registering it; that memory is never touched
    and is freed at once, so it does not add to the resident set.
    """
    register, init_normal = nn.Module.register_parameter, nn.init.normal_

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if type(param) is nn.Parameter and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    def normal_unless_meta(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Random values on meta are pointless, and torch's meta normal_ imports torch._dynamo (~4 s) on first use.
        return tensor if tensor.is_meta else init_normal(tensor, *args, **kwargs)

    nn.Module.register_parameter, nn.init.normal_ = register_on_meta, normal_unless_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.init.normal_ = register, init_normal


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, use_ema: bool = False,
                         source: str = "the checkpoint", verbose: bool = True) -> LoadReport:
    """Load `state_dict` into `model`, refusing files that lack UNet/VAE/text-encoder weights.

    A model whose parameters are on meta (see `parameters_on_meta`) receives the tensors themselves
    (no copy); a materialised model gets them copied into its own tensors, keeping its dtype and device.
    `use_ema=True` puts the file's EMA weights into `model.diffusion_model.*`.
    """
    state_dict = remap_checkpoint_keys(state_dict)
    targets = model.state_dict(keep_vars=True)
    parameter_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    report = LoadReport()
    _select_ema(state_dict, targets, parameter_names, use_ema, source, report)

    report.unexpected = [key for key in state_dict if key not in targets]
    report.missing = [key for key in targets if key not in state_dict]
    report.loaded = [key for key in targets if key in state_dict]
    _refuse_wrong_shapes(state_dict, targets, source)
    _refuse_missing_weights(report.missing, targets, parameter_names, source)

    assign = any(tensor.is_meta for tensor in targets.values())
    loadable = {key: _keep_integer_dtype(state_dict[key], targets[key]) for key in report.loaded}
    model.load_state_dict(loadable, strict=False, assign=assign)
    _refuse_meta_leftovers(model, source)
    if verbose:
        _print_summary(report, source, model)
    return report


def load_model_from_config(config: Any, ckpt: str | os.PathLike, *, use_ema: bool = False,
                           device: str | torch.device = "cpu", verbose: bool = True) -> nn.Module:
    """Build `config.model` and load the checkpoint `ckpt` into it, memory-mapped; returns it in eval mode.

    `config` is an OmegaConf config, a dict with `model: {target, params}`, or the path of a YAML file.
    """
    config = _as_config(config)
    # Read on the CPU (memory-mapped) whatever `device` is: only the tensors the model keeps are moved
    # below, so a full-EMA file's unused EMA copies (~half of it) never reach the GPU.
    checkpoint = load_checkpoint(ckpt, "cpu")
    if verbose and checkpoint.global_step is not None:
        print(f"Global step: {checkpoint.global_step}")
    with parameters_on_meta():
        model = build_from_config(config["model"])
    load_state_dict_into(model, checkpoint.state_dict, use_ema=use_ema, source=checkpoint.path, verbose=verbose)
    if torch.device(device).type != "cpu":
        model.to(device)  # the buffers the model computed itself were made on the CPU
    return model.eval()


def build_from_config(config: Mapping[str, Any]) -> nn.Module:
    """The config's model (`instantiate_from_config`); a constructor refusing its params is a ConfigError."""
    try:
        return instantiate_from_config(config)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError, OverflowError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"the config cannot build its model ({type(error).__name__}: {first_line}); give the "
                          "config that belongs to the checkpoint") from None


def _as_config(config: Any) -> Mapping[str, Any]:
    if isinstance(config, (str, os.PathLike)):
        config = load_config_file(config)
    if not isinstance(config, Mapping) or "model" not in config:
        raise ValueError("config must have a 'model' entry with 'target' and 'params' (see configs/stable-diffusion)")
    return config


def _select_ema(state_dict: dict[str, torch.Tensor], targets: Mapping[str, torch.Tensor], parameter_names: set[str],
                use_ema: bool, source: str, report: LoadReport) -> None:
    """Put EMA weights under the UNet's names when asked, and drop EMA entries the model has no place for."""
    unet_keys = [key for key in targets if key in parameter_names and key.startswith(DIFFUSION_WRAPPER_PREFIX)]
    ema_weights = ema_weights_for(unet_keys, state_dict, source) if use_ema else {}
    if any(key.startswith(EMA_PREFIX) for key in targets):
        # The model keeps EMA copies of its own (config `use_ema: true`): those load under their own names,
        # and the UNet gets clones so that EMA updates during training cannot move the live weights.
        ema_weights = {key: tensor.clone() for key, tensor in ema_weights.items()}
    else:
        file_ema = [key for key in state_dict if key.startswith(EMA_PREFIX)]
        report.unused_ema_weights = 0 if use_ema else len([k for k in file_ema if k not in EMA_BOOKKEEPING])
        for key in file_ema:
            del state_dict[key]
    state_dict.update(ema_weights)
    report.used_ema = use_ema


def _refuse_wrong_shapes(state_dict: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                         source: str) -> None:
    wrong = [f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(target.shape)}"
             for key, target in targets.items() if key in state_dict and state_dict[key].shape != target.shape]
    if wrong:
        raise CheckpointMismatchError(
            f"{source}: {len(wrong)} tensors have other shapes than in the model built from the config "
            f"({summarize_keys(wrong, 3)}); it was not loaded. Is the checkpoint for another model (e.g. SD 2.x) "
            "or the config the wrong one?"
        )


def _refuse_missing_weights(missing: list[str], targets: Mapping[str, torch.Tensor], parameter_names: set[str],
                            source: str) -> None:
    # A missing buffer with a real value was derived by the model itself; a missing parameter has no value
    # (meta) or a random one, so for the three networks that is an error.
    lacking: dict[str, list[str]] = {}
    for key in missing:
        component = component_of(key)
        if component and (key in parameter_names or targets[key].is_meta):
            lacking.setdefault(component, []).append(key)
    if lacking:
        parts = []
        for component, keys in lacking.items():
            total = sum(key.startswith(COMPONENT_PREFIXES[component]) for key in targets)
            parts.append(f"{component}: {len(keys)} of {total} weights missing ({summarize_keys(keys)})")
        raise CheckpointMismatchError(
            f"{source} lacks weights the model needs, so it was not loaded; {'; '.join(parts)}. Use a complete "
            "SD v1 checkpoint (UNet, VAE and CLIP text encoder), or a config that matches this file."
        )


def _keep_integer_dtype(tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Some files hold index buffers (position_ids) as floats after a blanket fp16 cast; assigning those
    # would break embedding lookups, so integer buffers are converted back (rounding fp16 noise away).
    if target.is_floating_point() or target.is_complex() or tensor.dtype == target.dtype:
        return tensor
    return (tensor.round() if tensor.is_floating_point() else tensor).to(target.dtype)


def _refuse_meta_leftovers(model: nn.Module, source: str) -> None:
    leftovers = [name for name, tensor in chain(model.named_parameters(), model.named_buffers()) if tensor.is_meta]
    for module_name, module in model.named_modules():
        # Plain tensor attributes are in no state dict, so only the model's constructor could have set them.
        leftovers += [f"{module_name}.{attr}".lstrip(".") for attr, value in vars(module).items()
                      if isinstance(value, torch.Tensor) and value.is_meta]
    if not leftovers:
        return
    if all(name.startswith(EMA_PREFIX) for name in leftovers):
        advice = ("The config keeps EMA copies (model.params.use_ema: true) but the file has none: set "
                  "use_ema: false in the config for inference, or use a '*-full-ema.ckpt' file.")
    else:
        advice = ("Use a checkpoint that holds them; if they are derivable, the model should compute them in "
                  "__init__ as buffers.")
    raise CheckpointMismatchError(
        f"after loading {source}, {len(leftovers)} tensors have no value: they are neither in the file nor "
        f"computed by the model at construction ({summarize_keys(leftovers)}). {advice}"
    )


def _print_summary(report: LoadReport, source: str, model: nn.Module) -> None:
    lines = [f"Loaded {len(report.loaded)} tensors from {source} into {type(model).__name__}"
             + (" (UNet from the EMA weights)" if report.used_ema else "")]
    if report.missing:
        lines.append(f"  {len(report.missing)} missing, kept as the model computed them: "
                     f"{summarize_keys(report.missing)}")
    if report.unexpected:
        lines.append(f"  {len(report.unexpected)} unexpected, ignored: {summarize_keys(report.unexpected)}")
    if report.unused_ema_weights:
        lines.append(f"  {report.unused_ema_weights} EMA weights not used (pass use_ema=True to use them)")
    print("\n".join(lines))
