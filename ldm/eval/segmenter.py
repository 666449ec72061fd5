"""The world v2's subject segmenter: a small conv net that marks the subject's pixels, and mask IoU.

Trained on the renderer's masks (ldm/data/render.py), it finds the subject in generated images, so
that consistency can be measured inside the subject and diversity outside it.

Conventions
- Input images are (B, 3, H, W) in [-1, 1] with H, W divisible by 8; the output is logits
  (B, H, W) at the input's resolution (positive = subject).
- Architecture: a strided stem, a three-level encoder-decoder with skip connections (a U-Net in
  miniature) at half resolution, and a full-resolution refinement that also sees the image.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.eval.instrument_files import read_instrument, save_instrument

FORMAT_NAME = "ldm.eval.segmenter/v1"


@dataclass(frozen=True)
class SegmenterConfig:
    width: int = 16  # channels at full resolution; doubled at each of the two lower levels


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SubjectSegmenter(nn.Module):
    def __init__(self, config: SegmenterConfig = SegmenterConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        # A strided stem: the three levels work at 1/2, 1/4 and 1/8 of the input side, which made a
        # training step several times cheaper on CPU than full-resolution levels.
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU(inplace=True))
        self.enc1, self.enc2, self.enc3 = _block(w, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.dec2, self.dec1 = _block(4 * w + 2 * w, 2 * w), _block(2 * w + w, w)
        # Back at full resolution, the image itself sharpens the upsampled edges.
        self.refine = nn.Sequential(nn.Conv2d(w + 3, w, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(w, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> subject logits (B, H, W)."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] % 8 or images.shape[-2] % 8:
            raise ValueError(f"expected images (B, 3, H, W) with H, W divisible by 8, got {tuple(images.shape)}")
        e1 = self.enc1(self.stem(images))  # (B, w, H/2, W/2)
        e2 = self.enc2(F.max_pool2d(e1, 2))  # (B, 2w, H/4, W/4)
        e3 = self.enc3(F.max_pool2d(e2, 2))  # (B, 4w, H/8, W/8)
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0, mode="nearest"), e2], dim=1))  # (B, 2w, H/4, W/4)
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], dim=1))  # (B, w, H/2, W/2)
        full = F.interpolate(d1, size=images.shape[-2:], mode="bilinear", align_corners=False)  # (B, w, H, W)
        return self.refine(torch.cat([full, images], dim=1))[:, 0]  # (B, H, W)

    @staticmethod
    def loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Per-pixel binary cross-entropy against (B, H, W) masks in {0, 1}."""
        return F.binary_cross_entropy_with_logits(logits, masks.float())

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Bool subject masks (B, H, W) (eval mode, no gradients)."""
        was_training = self.training
        self.eval()
        try:
            return self(images) > 0
        finally:
            self.train(was_training)


def mask_iou(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Intersection over union of bool masks (B, H, W) per image (B,); two empty masks agree fully (1)."""
    predicted, truth = predicted.bool(), truth.bool()
    inter = (predicted & truth).flatten(1).sum(1).float()
    union = (predicted | truth).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def save_segmenter(model: SubjectSegmenter, path: str | Path, extra: Optional[Mapping[str, Any]] = None) -> None:
    save_instrument(model, path, FORMAT_NAME, asdict(model.config), None, extra)


def load_segmenter(path: str | Path, device: str = "cpu") -> SubjectSegmenter:
    state, meta = read_instrument(path, FORMAT_NAME, device)
    model = SubjectSegmenter(SegmenterConfig(**meta["config"]))
    model.load_state_dict(state)
    return model.to(device).eval()
