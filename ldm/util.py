"""Small helpers shared across the package: building objects from `target:`/`params:` configs."""
from __future__ import annotations

import importlib
from typing import Any, Mapping, Optional, TypeVar

T = TypeVar("T")


def exists(value: Any) -> bool:
    return value is not None


def default(value: Optional[T], fallback: T) -> T:
    """`value` unless it is None; `fallback` may be a zero-argument callable, evaluated lazily."""
    if value is not None:
        return value
    return fallback() if callable(fallback) else fallback


def get_obj_from_str(path: str, reload: bool = False) -> Any:
    """Import `package.module.Name` and return `Name`."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"expected a dotted path like 'package.module.Name', got {path!r}")
    module = importlib.import_module(module_name)
    if reload:
        module = importlib.reload(module)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r} (from config target {path!r})") from None


def instantiate_from_config(config: Mapping[str, Any]) -> Any:
    """Build the object a config describes: `{"target": "a.b.C", "params": {...}}` -> `a.b.C(**params)`.

    The two special strings CompVis configs use are honoured: `__is_first_stage__` and
    `__is_unconditional__` stand for "no module here" and give None.
    """
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError(f"config has no 'target' key; keys present: {sorted(config)}")
    params = config.get("params", None) or {}
    return get_obj_from_str(config["target"])(**params)
