"""A data set of first-stage encodings, computed once, for training the diffusion model on a CPU.

Training latent diffusion re-encodes every batch with the frozen autoencoder; at 64 px on a CPU that
costs more than the UNet step itself. `EncodedDataset` encodes the first `length` items of an image data
set once and keeps the posterior's moments (mean and log-variance, (2*z, h, w) per item), so each
training step still draws a fresh latent sample from the posterior, as the original does, but never runs
the encoder. Items are the wrapped items with "image" replaced by "posterior".
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm


class EncodedDataset(Dataset):
    def __init__(self, images: Dataset, first_stage: torch.nn.Module, length: int, image_key: str = "image",
                 batch_size: int = 64, progress: bool = True):
        if length > len(images):
            raise ValueError(f"cannot encode {length} items of a data set of {len(images)}")
        self.items: list[dict[str, Any]] = []
        moments = []
        loader = DataLoader(torch.utils.data.Subset(images, range(length)), batch_size=batch_size, shuffle=False)
        with torch.no_grad():
            for batch in tqdm(loader, desc="encoding the training set", disable=not progress):
                x = batch[image_key].permute(0, 3, 1, 2).float()  # (B, H, W, 3) -> (B, 3, H, W)
                posterior = first_stage.encode(x)
                moments.append(torch.cat([posterior.mean, posterior.logvar], dim=1))  # (B, 2*z, h, w)
                rest = {k: v for k, v in batch.items() if k != image_key}
                for i in range(x.shape[0]):
                    self.items.append({k: _index(v, i) for k, v in rest.items()})
        self.moments = torch.cat(moments)  # (length, 2*z, h, w)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"posterior": self.moments[index], **self.items[index]}


def _index(value: Any, i: int) -> Any:
    """Item i of a collated batch value (tensors, lists, and dicts of them)."""
    if isinstance(value, dict):
        return {k: _index(v, i) for k, v in value.items()}
    if isinstance(value, (torch.Tensor, list, tuple)):
        return value[i]
    return value
