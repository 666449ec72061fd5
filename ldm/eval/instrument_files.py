"""Save and load the world v2 instruments (scene classifier, subject segmenter) as safetensors.

A file holds the weights and, in its metadata, `format` (which instrument), `config` (the
architecture, JSON), `vocab` (labels per head, JSON, so predictions keep the names the instrument was
trained on) and any extra JSON entries (the training command, held-out numbers). Reading goes through
the project's safe checkpoint reader (`ldm.checkpoint`): nothing in the file can run code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch.nn as nn
from safetensors.torch import save_file

from ldm.checkpoint.files import load_checkpoint

RESERVED = ("format", "config", "vocab")


def save_instrument(model: nn.Module, path: str | Path, format_name: str, config: Mapping[str, Any],
                    vocab: Optional[Mapping[str, Any]] = None, extra: Optional[Mapping[str, Any]] = None) -> None:
    """Write `model`'s weights with its format name, config, vocabulary and `extra` metadata (JSON each)."""
    metadata = {"format": format_name, "config": json.dumps(dict(config)), "vocab": json.dumps(vocab or {})}
    for key, value in (extra or {}).items():
        if key in RESERVED:
            raise ValueError(f"extra metadata key {key!r} is reserved for the instrument itself; rename it")
        metadata[key] = json.dumps(value)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)


def read_instrument(path: str | Path, format_name: str, device: str = "cpu") -> tuple[dict, dict[str, Any]]:
    """(state dict, JSON-decoded metadata) of an instrument file; refuses a file of another format."""
    loaded = load_checkpoint(path, device)
    found = loaded.metadata.get("format")
    if found != format_name:
        raise ValueError(f"{path} is not a {format_name} file (its format is {found!r}); "
                         "pass the file the instrument's training script wrote")
    meta = {k: (v if k == "format" else json.loads(v)) for k, v in loaded.metadata.items()}
    return dict(loaded.state_dict), meta
