"""Errors raised while reading a checkpoint or loading it into a model.

All derive from `CheckpointError`, so a caller (the CLI, a notebook) can catch one type and show the
message, which always says what was wrong and what to do.
"""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """Base class: the checkpoint could not be used."""


class UnsafeCheckpointError(CheckpointError):
    """The file's pickle asks for a Python object outside the weights-only allow-list; nothing was run."""


class CheckpointReadError(CheckpointError):
    """The file is truncated, corrupt or not in a supported format."""


class CheckpointMismatchError(CheckpointError):
    """The file's tensors do not fit the model: weights missing, wrong shapes, no EMA weights, ..."""


class OtherBaseModelError(CheckpointMismatchError):
    """An add-on (ControlNet, LoRA) was made for another base model (SD 2.x, SDXL) than the one in use."""
