"""The model a generation runs on: read from its config before any weight loads, then loaded.

- `read_model_spec(config)` -> `ModelSpec`: the YAML checked, its latent geometry (C, f, the UNet's
  halvings and native size, all read from the config) and its self-attention layout (the UNet built
  on the meta device: no weights, no memory), so that a request can be checked against the model
  before the slow checkpoint load.
- `load_model(config, ckpt)` -> `LoadedModel`: the LatentDiffusion module in float32 on a device, with
  its geometry and a record of where it came from (config, checkpoint file name, content fingerprint,
  EMA), which every generated image's metadata repeats.
- `load_demo_model()`: the tiny model shipped in models/demo/v2/ (v1, which came before it, stays in
  models/demo/).

Config layout assumed (CompVis): model.params.{image_size, unet_config, first_stage_config, timesteps};
the latent side the model was trained at is model.params.image_size (the UNet's own image_size is
unused, 32 in SD v1's config), the autoencoder's latent channels are first_stage_config.params.embed_dim
and its factor f is 2 ** (len(ddconfig.ch_mult) - 1); the UNet halves its input len(channel_mult) - 1
times.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ldm.errors import ConfigError, InvalidValue  # ConfigError: imported from here too

REPO_ROOT = Path(__file__).resolve().parents[2]
# The demo model is v2 (scenes of ldm/data/world.py: furniture and faces in rooms, configs/demo/v2/);
# v1 (the plain synthetic objects of ldm/data/synthetic.py) stays in configs/demo/ and models/demo/.
DEMO_CONFIG = REPO_ROOT / "configs" / "demo" / "v2" / "demo-inference.yaml"
DEMO_CKPT = REPO_ROOT / "models" / "demo" / "v2" / "demo.safetensors"
DEMO_V1_CONFIG = REPO_ROOT / "configs" / "demo" / "demo-inference.yaml"
DEMO_V1_CKPT = REPO_ROOT / "models" / "demo" / "demo.safetensors"
# The demo model's classifier-free guidance scale, the one place it is written: the default of --demo
# (txt2img, img2img, the web page, the measuring scripts), of the world v2 measurements and of the
# README's example. It is the scale the rule of configs/demo/v2/README.md picks for the shipped weights
# (3 or 5, "How the demo model v2 is judged"); v1's was 3.
DEMO_SCALE = 5.0
UNET_DEFAULT_CHANNEL_MULT = (1, 2, 4, 8)  # UNetModel's default, for configs that leave it out
# Bounds on a config's sizes, far above any SD v1 model's (timesteps 1000, image_size 64, embed_dim 4,
# 4 levels), so that an absurd config is refused before anything is allocated from it.
MAX_TIMESTEPS = 100_000
MAX_LATENT_SIDE = 4096
MAX_LATENT_CHANNELS = 256
MAX_LEVELS = 12


@dataclass(frozen=True)
class LatentGeometry:
    """How image pixels map to the UNet's latents."""

    channels: int  # C: latent channels of the autoencoder
    factor: int  # f: image pixels per latent pixel along a side
    unet_halvings: int  # how many times the UNet halves its input (and doubles it back)
    native_latent_size: int  # the latent side the model was trained at (model.params.image_size)

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this, so that every UNet level divides evenly."""
        return self.factor * 2 ** self.unet_halvings

    @property
    def native_size(self) -> int:
        """The image side the model was made for (512 for SD v1, 64 for the demo model)."""
        return self.native_latent_size * self.factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H/f, W/f) of the latents of an H x W image."""
        return (self.channels, height // self.factor, width // self.factor)

    def check_size(self, height: int, width: int) -> None:
        step = self.pixel_multiple
        for name, pixels in (("height", height), ("width", width)):
            if pixels % step:
                suggestion = step * max(1, round(pixels / step))
                raise InvalidValue(name, pixels, f"image sides must be multiples of {step} for this model (its "
                                                 f"autoencoder factor {self.factor} times 2 ** {self.unet_halvings} "
                                                 f"for the UNet's halvings); use e.g. {suggestion}")

    @classmethod
    def of_module(cls, module: nn.Module) -> "LatentGeometry":
        """The geometry of a built LatentDiffusion module."""
        from ldm.sharing import find_unet
        unet, first_stage = find_unet(module), module.first_stage_model
        return cls(channels=int(first_stage.embed_dim), factor=2 ** (first_stage.decoder.num_resolutions - 1),
                   unet_halvings=len(unet.channel_mult) - 1, native_latent_size=int(module.image_size))


@dataclass(frozen=True)
class ModelSpec:
    """What a config says about its model, checked, without weights."""

    config_path: Path
    config: Any = field(repr=False)  # the loaded OmegaConf config
    geometry: LatentGeometry
    unet: nn.Module = field(repr=False)  # the UNet on the meta device: levels and attention tags only
    num_timesteps: int = 1000


def read_model_spec(config_path: str | os.PathLike) -> ModelSpec:
    """Load and check a model config (read safely: `ldm.util.load_config_file`); raises FileNotFoundError,
    IsADirectoryError, ldm.files.NotARegularFile / FileTooLarge or ConfigError."""
    from omegaconf.errors import OmegaConfBaseException

    from ldm.util import CONFIG_HINT, check_targets, load_config_file
    path = Path(config_path)
    config = load_config_file(path)
    try:
        check_targets(config)  # every target of the file allowed, before any is built
    except ConfigError as error:
        raise ConfigError(f"config {path}: {error}") from None
    try:
        params = config.model.params
        first_stage = params.first_stage_config.params
        unet_params = params.unet_config.params
        geometry = LatentGeometry(
            channels=_bounded(first_stage.embed_dim, "first_stage_config embed_dim", MAX_LATENT_CHANNELS),
            factor=2 ** (_bounded(len(first_stage.ddconfig.ch_mult), "first_stage_config ch_mult's length",
                                  MAX_LEVELS) - 1),
            unet_halvings=_bounded(len(unet_params.get("channel_mult", UNET_DEFAULT_CHANNEL_MULT)),
                                   "unet_config channel_mult's length", MAX_LEVELS) - 1,
            native_latent_size=_bounded(params.image_size, "image_size", MAX_LATENT_SIDE))
        num_timesteps = _bounded(params.get("timesteps", 1000), "timesteps", MAX_TIMESTEPS)
    except (AttributeError, KeyError, TypeError, ValueError, OmegaConfBaseException) as error:
        raise ConfigError(f"config {path} does not describe a latent diffusion model ({type(error).__name__}: "
                          f"{str(error).splitlines()[0]}); it needs model.params with unet_config and "
                          f"first_stage_config as in configs/stable-diffusion/v1-inference.yaml") from None
    except _OutOfBounds as error:
        raise ConfigError(f"config {path}: {error}; give {CONFIG_HINT}") from None
    return ModelSpec(path, config, geometry, _unet_without_weights(path, params.unet_config), num_timesteps)


class _OutOfBounds(Exception):
    pass


def _bounded(value: Any, where: str, maximum: int) -> int:
    """`value` as a whole number from 1 to `maximum` (a config's size entry); _OutOfBounds otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise _OutOfBounds(f"{where} is {str(value)[:40]}, where a whole number from 1 to {maximum} goes")
    return value


def _unet_without_weights(path: Path, unet_config: Mapping[str, Any]) -> nn.Module:
    """The config's UNet built on the meta device: its layout (levels, attention tags) without weights."""
    from ldm.util import instantiate_from_config
    try:
        with torch.device("meta"):
            return instantiate_from_config(unet_config)
    except ConfigError as error:
        raise ConfigError(f"config {path}: {error}") from None
    except (ImportError, AttributeError, KeyError, TypeError, ValueError, RuntimeError, OverflowError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"config {path}: cannot build its UNet from model.params.unet_config "
                          f"({type(error).__name__}: {first_line})") from None


@dataclass(frozen=True)
class LoadedModel:
    """A LatentDiffusion module ready to generate, its geometry and where it came from (`source`, JSON-ready)."""

    module: nn.Module = field(repr=False)
    geometry: LatentGeometry
    source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def wrap(cls, module: nn.Module, **source: Any) -> "LoadedModel":
        """A module built or loaded elsewhere (a test's random model, say); `source` is free-form metadata."""
        return cls(module, LatentGeometry.of_module(module), dict(source))

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (of the first parameter: the UNet's in LatentDiffusion): float32 as loaded,
        float16 or bfloat16 after `module.half()` or `.to(torch.bfloat16)`."""
        return next((p.dtype for p in self.module.parameters()), torch.float32)

    @property
    def unet(self) -> nn.Module:
        from ldm.sharing import find_unet
        return find_unet(self.module)

    @property
    def num_timesteps(self) -> int:
        return int(self.module.num_timesteps)


def display_path(path: str | os.PathLike) -> str:
    """A path as metadata shows it: relative to the repository when inside it, else as given."""
    path = Path(path)
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def load_model(config: str | os.PathLike | ModelSpec, ckpt: str | os.PathLike, *,
               device: str | torch.device = "auto", use_ema: bool = False, verbose: bool = True) -> LoadedModel:
    """Build the config's model and load `ckpt` into it (safely, memory-mapped), in float32 on `device`.

    `config` is a YAML path or a `ModelSpec` already read; `device` "auto" picks cuda, then mps, then cpu.
    """
    import ldm.checkpoint  # looked up at call time: heavy, and tests may stand in their own loader
    spec = config if isinstance(config, ModelSpec) else read_model_spec(config)
    device = choose_device(device) if isinstance(device, str) else device
    try:
        module = ldm.checkpoint.load_model_from_config(spec.config, ckpt, use_ema=use_ema, device=device,
                                                       verbose=verbose)
    except ConfigError as error:
        raise ConfigError(f"config {spec.config_path}: {error}") from None
    # Weights run in float32 (a no-op for fp32 files); precision "autocast" gives float16 on CUDA
    # (and bfloat16 on CPUs that compute it natively), see `autocast_dtype`.
    module = module.float()
    source = {"config": display_path(spec.config_path), "ckpt": Path(ckpt).name,
              "ckpt_fingerprint": ldm.checkpoint.checkpoint_fingerprint(ckpt), "use_ema": use_ema}
    return LoadedModel(module, spec.geometry, source)


def load_demo_model(device: str | torch.device = "cpu", verbose: bool = False) -> LoadedModel:
    """The tiny text-to-image model shipped in models/demo/v2/ (64 px scenes: a chair, table, lamp, vase or
    face in front of a wall and floor, or a backdrop)."""
    if not DEMO_CKPT.exists():
        raise FileNotFoundError(f"the demo model is missing at {DEMO_CKPT}; it ships with the repository, so "
                                "restore it with git (git checkout -- models/demo/v2)")
    return load_model(DEMO_CONFIG, DEMO_CKPT, device=device, verbose=verbose)


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def choose_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must be available or it is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidValue("device", name, "is not a device name; use auto, cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidValue("device", name, "CUDA is not available on this machine; use cpu or auto")
    if device.type == "mps" and not _mps_available():
        raise InvalidValue("device", name, "MPS is not available on this machine; use cpu or auto")
    return device


def precision_scope(precision: str, device: torch.device):
    """The autocast context a run computes in (see `autocast_dtype`); GroupNorm and the attention softmax
    still compute in float32 inside it."""
    dtype = autocast_dtype(precision, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def cpu_has_native_bfloat16() -> bool:
    """Whether the CPU computes bfloat16 in hardware (AVX512-BF16 or AMX). Without it torch runs bfloat16
    convolutions through generic kernels, several times slower than float32 (benchmarks/RESULTS.md)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None (plain float32) or the autocast dtype of `precision` on `device`:
    - "autocast": float16 on CUDA (as CompVis); bfloat16 on a CPU that computes it in hardware, where it
      is faster and changes the v1 demo model's images by under a level on average; float32 elsewhere (on
      other CPUs bfloat16 is slower, and MPS gains nothing measured here).
    - "bfloat16": bfloat16 on the CPU (any) and CUDA; "full": float32 everywhere."""
    if precision == "autocast" and device.type == "cuda":
        return torch.float16
    if precision == "autocast" and device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    if precision == "bfloat16" and device.type in ("cpu", "cuda"):
        return torch.bfloat16
    return None


def precision_used(precision: str, device: torch.device, weights_dtype: torch.dtype = torch.float32) -> str:
    """What a run actually computes in: 'float16 autocast' or 'bfloat16 autocast' (see `autocast_dtype`),
    else the weights' dtype: 'float32', or 'float16' / 'bfloat16' for a model cast without autocast."""
    dtype = autocast_dtype(precision, device)
    if dtype is not None:
        return f"{str(dtype).removeprefix('torch.')} autocast"
    return str(weights_dtype).removeprefix("torch.")
