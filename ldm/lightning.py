"""Training through PyTorch Lightning, imported only when training.

Our models (`LatentDiffusion`, `AutoencoderKL`) are plain `nn.Module`s that carry the Lightning hooks
(`training_step`, `validation_step`, `configure_optimizers`, `on_train_batch_end`), so inference never
needs Lightning. `LightningAdapter` hands those hooks to a `pytorch_lightning.Trainer`.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn


def lightning_adapter(model: nn.Module) -> Any:
    """Wrap `model` in a LightningModule that delegates to the model's own training hooks."""
    try:
        import pytorch_lightning as pl
    except ImportError as error:
        raise ImportError("training needs PyTorch Lightning: pip install -e '.[train]'") from error

    class LightningAdapter(pl.LightningModule):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

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
