"""Training through PyTorch Lightning, imported only when training.

Our models (`LatentDiffusion`, `AutoencoderKL`) are plain `nn.Module`s that carry the Lightning hooks
(`training_step`, `validation_step`, `configure_optimizers`, `on_train_batch_end`), so inference never
needs Lightning. `LightningAdapter` hands those hooks to a `pytorch_lightning.Trainer`.

Several processes (`Processes`, Lightning's DDP): every process builds the same model from the same
seed (DDP also copies rank 0's weights to the others), reads its own share of the batches (Lightning's
distributed sampler: process r takes items r, r + N, ...) and averages the gradients with the others,
so one optimiser step sees N x batch_size items. Each process then draws its noise and timesteps from
its own stream, seeded from (seed, rank), so that the processes do not add the same noise to different
images; a one-process run keeps the plain seed's stream, as before.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from ldm.errors import InvalidValue

ACCELERATORS = ("cpu", "gpu", "auto")
# "ddp" starts the other processes by running the same command again (Lightning's subprocess launcher);
# "auto" is Lightning's choice, which is "ddp" for several devices outside a notebook.
STRATEGIES = ("auto", "ddp")


@dataclass(frozen=True)
class Processes:
    """Where training runs: Lightning's `accelerator`, how many `devices` (one process each), and the
    `strategy` that joins them. Checked when made, before any model is built."""

    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise InvalidValue("accelerator", self.accelerator, f"choose one of {', '.join(ACCELERATORS)}")
        if self.strategy not in STRATEGIES:
            raise InvalidValue("strategy", self.strategy, f"choose one of {', '.join(STRATEGIES)} (several "
                                                          "processes use Lightning's DDP)")
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise InvalidValue("devices", self.devices, "give the number of processes (devices), 1 or more")
        if self.accelerator == "gpu":
            available = torch.cuda.device_count()
            if available == 0:
                raise InvalidValue("accelerator", self.accelerator, "no CUDA GPU is available here; use cpu")
            if self.devices > available:
                raise InvalidValue("devices", self.devices, f"only {available} CUDA GPU(s) are available; "
                                                            f"give at most {available}")


def seed_process(seed: int, rank: int) -> None:
    """Seed Python, NumPy and torch with a stream of its own for process `rank` of a run seeded `seed`."""
    state = np.random.SeedSequence([seed, rank]).generate_state(2)
    stream_seed = int(state[0]) << 32 | int(state[1])
    random.seed(stream_seed)
    np.random.seed(int(state[0]))
    torch.manual_seed(stream_seed)


def lightning_adapter(model: nn.Module, seed: Optional[int] = None) -> Any:
    """Wrap `model` in a LightningModule that delegates to the model's own training hooks. With `seed`,
    each process of a several-process run reseeds itself with `seed_process` when training starts."""
    try:
        import pytorch_lightning as pl
    except ImportError as error:
        raise ImportError("training needs PyTorch Lightning: pip install -e '.[train]'") from error

    class LightningAdapter(pl.LightningModule):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def on_train_start(self) -> None:
            if seed is not None and self.trainer.world_size > 1:
                seed_process(seed, self.global_rank)

        def training_step(self, batch: Any, batch_idx: int):
            loss = self.inner.training_step(batch, batch_idx)
            if isinstance(loss, tuple):  # (loss, logs) from models that report components
                loss, logs = loss
                self.log_dict(logs, prog_bar=False)
            self.log("train/loss", loss, prog_bar=True, batch_size=_batch_size(batch))
            return loss

        def validation_step(self, batch: Any, batch_idx: int):
            loss = self.inner.validation_step(batch, batch_idx)
            if isinstance(loss, dict):
                self.log_dict(loss, batch_size=_batch_size(batch))
            else:
                self.log("val/loss", loss, prog_bar=True, batch_size=_batch_size(batch))
            return loss

        def configure_optimizers(self):
            return self.inner.configure_optimizers()

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            hook = getattr(self.inner, "on_train_batch_end", None)
            if hook is not None:
                hook()

    return LightningAdapter(model)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for value in batch.values():
            if hasattr(value, "__len__"):
                return len(value)
    return 1
