"""What `torch.load(weights_only=True)` may rebuild from an SD v1 `.ckpt`, and how refusals are reported.

A `.ckpt` is a pickle, and unpickling can call any importable function (`os.system`, `builtins.eval`, ...).
torch's weights-only unpickler rebuilds only tensors and plain containers and refuses every other global;
this module widens that by exactly the records SD v1 / Lightning checkpoints carry, all inert:
- `callbacks` is keyed by a callback *class* (`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`,
  a pickled global reference). A local stand-in class answers to that name, so reading the file neither
  imports nor runs Lightning.
- numpy scalars and dtypes in the metadata (`numpy.core.multiarray.scalar`, `numpy.dtype`, `numpy.dtypes.*`):
  they build plain numbers and dtype descriptors. numpy arrays (`_reconstruct`) are not needed and not allowed.

Every other global is refused, and named, before any of the pickle runs (a static scan), with torch's own
unpickler as the second line of defence for what the scan cannot read.
"""
from __future__ import annotations

import os
import pickle
import re
from contextlib import AbstractContextManager
from typing import Any, Callable, Optional

import torch

from ldm.checkpoint.errors import CheckpointError, CheckpointReadError, UnsafeCheckpointError

LIGHTNING_CALLBACK_NAMES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",  # Lightning >= 2.0 namespace
)


class LightningCallbackStandIn:
    """Answers to the Lightning callback class names a checkpoint uses as `callbacks` keys.

    It has no behaviour: the unpickler only ever needs the name to resolve to *some* class. Nothing of
    Lightning is imported, so no Lightning code can run while reading a file.
    """

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


def _numpy_globals() -> list[tuple[Any, str]]:
    import numpy as np

    # numpy 2 moved `numpy.core` to `numpy._core`; files written under either name must resolve.
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    entries: list[tuple[Any, str]] = [
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        (multiarray.scalar, "numpy._core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
    ]
    # A pickled dtype is rebuilt through `numpy.dtype` but its state is then set on an instance of a
    # `numpy.dtypes.*DType` class, which the unpickler checks against the allow-list as well.
    dtype_classes = {cls for cls in vars(np.dtypes).values() if isinstance(cls, type) and issubclass(cls, np.dtype)}
    entries += [(cls, f"numpy.dtypes.{cls.__name__}") for cls in sorted(dtype_classes, key=lambda c: c.__name__)]
    return entries


def allowed_globals() -> list[tuple[Any, str]]:
    """(object, qualified name) pairs allowed on top of torch's weights-only defaults."""
    stand_ins = [(LightningCallbackStandIn, name) for name in LIGHTNING_CALLBACK_NAMES]
    return stand_ins + _numpy_globals()


def allow_checkpoint_globals() -> AbstractContextManager:
    """Context in which `torch.load(weights_only=True)` also accepts `allowed_globals()`."""
    return torch.serialization.safe_globals(allowed_globals())


def find_unsafe_globals(path: str | os.PathLike) -> Optional[list[str]]:
    """Globals of a zip-format checkpoint's pickle outside the allow-list, found without unpickling.

    Returns None when the static scan cannot read the pickle (e.g. pickle protocol 4 opcodes); the
    weights-only unpickler then decides on its own.
    """
    with allow_checkpoint_globals():
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except (pickle.UnpicklingError, EOFError, ValueError, RuntimeError):
            return None


def unsafe_checkpoint_error(path: str | os.PathLike, global_names: list[str]) -> UnsafeCheckpointError:
    names = ", ".join(f"`{name}`" for name in global_names)
    return UnsafeCheckpointError(
        f"Refusing to load {os.fspath(path)}: its pickle references {names}, i.e. Python code or objects other "
        "than tensors, plain containers and the known Lightning/numpy records. A checkpoint is untrusted input and "
        "unpickling it could run that code, so the file was NOT loaded: only weights are accepted. If you trust it, "
        "convert it to .safetensors in a throwaway environment (torch.load it there, then "
        "safetensors.torch.save_file(state_dict, 'model.safetensors')) and load the .safetensors file instead."
    )


# Messages of torch's weights-only unpickler that name the refused global (torch 2.x wording).
_REFUSAL_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"GLOBAL (\S+) whose module \S+ is blocked"),
    re.compile(r"reduce for unrecognized function (.+?)(?: which belongs to|$)", re.MULTILINE),
    re.compile(r"Can only (?:create new object|build) .* but got (.+)$", re.MULTILINE),
)


# Lines of torch's load errors that give advice (some of it unsafe: "re-run with weights_only=False"), not a reason.
_TORCH_ADVICE_PREFIXES = (
    "Weights only load failed", "In PyTorch 2.6", "Please file an issue", "Check the documentation",
)


def describe_torch_error(error: BaseException) -> str:
    """The line of a torch.load error that says what was wrong, without torch's advice around it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(_TORCH_ADVICE_PREFIXES)]
    reason = (reasons or lines or [""])[-1].removeprefix("WeightsUnpickler error:").strip()
    # torch's own errors read well alone; a bare KeyError or EOFError needs its type to mean anything.
    if not isinstance(error, (RuntimeError, pickle.UnpicklingError)) or not reason:
        reason = f"{type(error).__name__}: {reason}".rstrip(": ")
    return reason


def error_from_unpickling(path: str | os.PathLike, error: BaseException) -> CheckpointError:
    """Turn torch's weights-only refusal into our error; anything unnamed is reported as unreadable."""
    message = str(error)
    for pattern in _REFUSAL_PATTERNS:
        match = pattern.search(message)
        if match:
            return unsafe_checkpoint_error(path, [match.group(1).strip()])
    return CheckpointReadError(
        f"Could not read {os.fspath(path)} as a weights-only torch checkpoint ({describe_torch_error(error)}); the "
        "file was NOT loaded. It may be truncated or corrupt (download it again), or hold Python objects other "
        "than tensors and plain containers (only weights are accepted: convert it to .safetensors)."
    )


def call_refusing_unsafe(path: str | os.PathLike, load: Callable[[], Any]) -> Any:
    """Run `load` (a torch.load call) with the allow-list active, translating refusals into our errors."""
    with allow_checkpoint_globals():
        try:
            return load()
        except pickle.UnpicklingError as error:
            raise error_from_unpickling(path, error) from None
