"""Small helpers shared across the package: reading `target:`/`params:` configs and building their objects.

A config is untrusted input, as a checkpoint is (SD v1 users download YAML files beside checkpoints),
so nothing in it may run code:
- `load_config_file` reads a YAML file that is a regular file of at most MAX_CONFIG_BYTES, with YAML's
  safe loader (no Python tags), refusing aliases (`*name`: a few lines of them can expand to billions
  of nodes) and more than MAX_BRACKETS [ and {, and resolving interpolations at once, so every problem
  is a `ConfigError` there.
- `instantiate_from_config` builds only classes this project defines (in the `ldm` package) and the
  few others the published SD v1 configs name (`ALLOWED_TARGETS`); any other target (`os.system`,
  `builtins.exec`, a function of this project) is refused, naming it, before anything is imported
  outside `ldm` or called. `check_targets` checks every target of a config at once, so that a model
  config is refused whole before any part of it is built.
"""
from __future__ import annotations

import importlib
import inspect
import os
from typing import Any, Mapping, Optional, TypeVar

from ldm.errors import ConfigError

T = TypeVar("T")
PROJECT_PACKAGE = "ldm"
# Classes outside this project that the published SD v1 configs name (CompVis' v1-inference.yaml:
# the unconditional stage placeholder).
ALLOWED_TARGETS = frozenset({"torch.nn.Identity"})
# SD v1's inference config is 2 KiB (with 3 brackets); YAML's Python parser takes seconds per 100 KiB,
# and time growing with the square of the nesting of [ ] and { }, so both are bounded before it runs
# (the nesting by the number of opening brackets, which no quoting can hide).
MAX_CONFIG_BYTES = 64 * 1024
MAX_BRACKETS = 200
CONFIG_HINT = "the model's YAML file, e.g. configs/stable-diffusion/v1-inference.yaml"


def exists(value: Any) -> bool:
    return value is not None


def default(value: Optional[T], fallback: T) -> T:
    """`value` unless it is None; `fallback` may be a zero-argument callable, evaluated lazily."""
    if value is not None:
        return value
    return fallback() if callable(fallback) else fallback


def get_obj_from_str(path: str, reload: bool = False) -> Any:
    """The class a config's `target` names, `package.module.Name`, if it is allowed (see the module
    docstring); ConfigError otherwise, before any module outside this project is imported."""
    if not isinstance(path, str):
        raise ConfigError(f"config target {path!r} is not a dotted name like 'ldm.models.autoencoder.AutoencoderKL'")
    module_name, _, attr = path.rpartition(".")
    in_project = module_name == PROJECT_PACKAGE or module_name.startswith(PROJECT_PACKAGE + ".")
    if path not in ALLOWED_TARGETS and not in_project:
        raise _refused(path, "outside this project")
    try:
        module = importlib.import_module(module_name)
        if reload:
            module = importlib.reload(module)
        obj = getattr(module, attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"config target {path!r} names nothing this project defines; use a target of the "
                          "published configs, e.g. ldm.models.diffusion.ddpm.LatentDiffusion") from None
    defined_in = getattr(obj, "__module__", "") or ""
    if path not in ALLOWED_TARGETS and not (inspect.isclass(obj) and
                                            (defined_in + ".").startswith(PROJECT_PACKAGE + ".")):
        raise _refused(path, "not a class this project defines")
    return obj


def _refused(path: str, why: str) -> ConfigError:
    return ConfigError(f"config target {path!r} is refused ({why}): a config may only build this project's "
                       f"classes (ldm.*) and {', '.join(sorted(ALLOWED_TARGETS))}; nothing was run")


def check_targets(config: Any) -> None:
    """Every `target` anywhere in `config` names an allowed class (`get_obj_from_str`): a config is
    refused whole before any part of it is built."""
    if isinstance(config, Mapping):
        if "target" in config:
            get_obj_from_str(config["target"])
        for value in config.values():
            check_targets(value)
    elif isinstance(config, (list, tuple)) or type(config).__name__ == "ListConfig":
        for value in config:
            check_targets(value)


def instantiate_from_config(config: Mapping[str, Any]) -> Any:
    """Build the object a config describes: `{"target": "a.b.C", "params": {...}}` -> `a.b.C(**params)`,
    for an allowed class only (`get_obj_from_str`).

    The two special strings CompVis configs use are honoured: `__is_first_stage__` and
    `__is_unconditional__` stand for "no module here" and give None.
    """
    if isinstance(config, str) and config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if not isinstance(config, Mapping):
        raise ConfigError(f"a config entry holds {type(config).__name__} {str(config)[:80]!r} where a mapping with "
                          "'target' and 'params' goes")
    if "target" not in config:
        raise ConfigError(f"config has no 'target' key; keys present: {sorted(map(str, config))}")
    cls = get_obj_from_str(config["target"])
    params = config.get("params", None) or {}
    if not isinstance(params, Mapping) or not all(isinstance(key, str) for key in params):
        raise ConfigError(f"config target {config['target']!r}: its params must be a mapping of names to values")
    return cls(**params)


def load_config_file(path: str | os.PathLike, what: str = "config", hint: str = CONFIG_HINT) -> Any:
    """A YAML config file as an OmegaConf mapping, read safely (see the module docstring); raises
    FileNotFoundError, IsADirectoryError, ldm.files.NotARegularFile / FileTooLarge, or ConfigError."""
    import yaml
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ldm.files import read_text
    try:
        text = read_text(path, what, hint, MAX_CONFIG_BYTES)
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} {path} is not valid YAML (not UTF-8 text: {error.reason}); give {hint}") from None
    if text.count("[") + text.count("{") > MAX_BRACKETS:
        raise ConfigError(f"{what} {path} holds more than {MAX_BRACKETS} [ and {{, far more than a model config "
                          f"needs; give {hint}")
    try:
        aliases = any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader))
        config = None if aliases else OmegaConf.create(text)
        if isinstance(config, DictConfig):
            OmegaConf.resolve(config)  # interpolations (${...}) fail here, not deep inside a constructor
    except (yaml.YAMLError, OmegaConfBaseException, RecursionError, ValueError, TypeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{what} {path} is not valid YAML ({message}); give {hint}") from None
    if aliases:
        raise ConfigError(f"{what} {path} uses YAML aliases (*name), which no model config needs and which can "
                          f"expand without bound; write the values out, or give {hint}")
    if not isinstance(config, DictConfig):
        raise ConfigError(f"{what} {path} holds a YAML {type(config).__name__.removesuffix('Config').lower()}, "
                          f"not a mapping of settings; give {hint}")
    return config
