"""Writing files shaped like real SD v1 Lightning checkpoints, for tests and benchmarks (not for inference).

A Lightning `.ckpt` keys its `callbacks` dict by the callback *class*, which pickle stores as a global
reference (`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`). To write one without Lightning,
a look-alike class is registered under that module name for the duration of `torch.save`.
"""
from __future__ import annotations

import os
import sys
import types
from typing import Any, Mapping

import numpy as np
import torch

LIGHTNING_CALLBACK_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


def save_lightning_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                              global_step: int = 470000, **torch_save_kwargs: Any) -> None:
    """torch.save {state_dict, global_step, epoch, callbacks: {ModelCheckpoint class: {...}}} like SD v1 files.

    The metadata carries numpy scalars and a numpy dtype, as some Lightning versions write them.
    """
    callback = type("ModelCheckpoint", (), {})
    callback.__module__, callback.__qualname__ = LIGHTNING_CALLBACK_MODULE, "ModelCheckpoint"
    packages = ["pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING_CALLBACK_MODULE]
    modules = {name: types.ModuleType(name) for name in packages}
    modules[LIGHTNING_CALLBACK_MODULE].ModelCheckpoint = callback
    saved = {name: sys.modules.get(name) for name in packages}
    # pickle looks the class up through sys.modules to check it is importable under its name.
    sys.modules.update(modules)
    try:
        torch.save({
            "state_dict": dict(state_dict), "global_step": global_step, "epoch": np.int64(6),
            "pytorch-lightning_version": "1.4.2",
            "callbacks": {callback: {"monitor": None, "best_model_score": np.float64(0.25),
                                     "dtype": np.dtype("float32")}},
        }, path, **torch_save_kwargs)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
