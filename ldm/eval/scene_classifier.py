"""The world v2's attribute classifier: one head per `VOCABULARY` attribute, masked where it does not apply.

It reads a rendered or generated scene (ldm/data/world.py) back: the subject, every furniture
attribute (colour, pattern, size, facing, position), every face attribute (skin, hair colour and
style, glasses, shirt) and the background (wall, floor, or a face's backdrop). A head whose
attribute the subject lacks (pattern on a face) is trained on nothing for that image (its target
is `IGNORE`) and predicts None for it, judged by the predicted subject.

Conventions
- Input images are (B, 3, H, W) in [-1, 1]; other sizes are resized to `image_size` first.
- Two coordinate channels are appended, and the last feature map (2x2 at 64 px) is flattened rather
  than averaged, so `position` and `facing` stay readable.
- Targets are label indices (B,) per head with `IGNORE` (-100, cross-entropy's ignore index) where
  the attribute does not apply.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.data.scenes import NOT_APPLICABLE
from ldm.data.world import APPLIES_TO, VOCABULARY
from ldm.eval.instrument_files import read_instrument, save_instrument

FORMAT_NAME = "ldm.eval.scene_classifier/v1"
IGNORE = -100


@dataclass(frozen=True)
class SceneClassifierConfig:
    """Conv widths per stage (each stage halves the side), the embedding width and the input side."""
    widths: tuple[int, ...] = (24, 48, 64, 96, 128)
    feature_dim: int = 192
    image_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))  # YAML gives lists; keep it hashable
        if self.image_size % 2 ** len(self.widths):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2 ** {len(self.widths)} "
                             f"(one halving per stage of widths {self.widths})")

    @property
    def final_side(self) -> int:
        return self.image_size // 2 ** len(self.widths)


def label_targets(labels: Mapping[str, Sequence[str]], vocab: Mapping[str, Sequence[str]]) -> dict[str, torch.Tensor]:
    """Batched string labels {attribute: B values, NOT_APPLICABLE where absent} -> {attribute: (B,) indices}."""
    return {name: torch.tensor([IGNORE if v == NOT_APPLICABLE else list(values).index(v) for v in labels[name]])
            for name, values in vocab.items()}


class SceneClassifier(nn.Module):
    """Conv trunk -> a shared embedding -> one linear head per attribute."""

    def __init__(self, config: SceneClassifierConfig = SceneClassifierConfig(),
                 vocab: Optional[Mapping[str, Sequence[str]]] = None) -> None:
        super().__init__()
        self.config = config
        self.vocab = {k: list(v) for k, v in (vocab or VOCABULARY).items()}
        if "subject" not in self.vocab:
            raise ValueError("the vocabulary needs a 'subject' head: it decides which other heads apply")
        layers, c_in = [], 5  # RGB + 2 coordinate channels
        for width in config.widths:
            layers += [nn.Conv2d(c_in, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            c_in = width
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Linear(c_in * config.final_side ** 2, config.feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(config.feature_dim, len(values))
                                    for name, values in self.vocab.items()})

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False)
        ramp = torch.linspace(-1.0, 1.0, size, device=images.device, dtype=images.dtype)
        coords = torch.stack(torch.meshgrid(ramp, ramp, indexing="ij"))  # (2, H, W): row, column
        return torch.cat([images, coords.expand(images.shape[0], -1, -1, -1)], dim=1)  # (B, 5, H, W)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The shared embedding (B, feature_dim)."""
        fmap = self.trunk(self._prepare(images))  # (B, C, S, S)
        return F.relu(self.embed(fmap.flatten(1)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits (B, K) per attribute, columns in `self.vocab[attribute]` order."""
        embedding = self.features(images)
        return {name: head(embedding) for name, head in self.heads.items()}

    def loss(self, logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum over heads of the cross-entropy on the images the attribute applies to."""
        parts = {}
        for name, target in targets.items():
            if (target != IGNORE).any():  # a batch of faces alone has no pattern to learn from
                parts[name] = F.cross_entropy(logits[name], target, ignore_index=IGNORE)
        total = torch.stack(list(parts.values())).sum()
        return total, {k: float(v.detach()) for k, v in parts.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[Optional[str]]]:
        """{attribute: B labels}, None where the predicted subject lacks the attribute (eval mode, no grad)."""
        was_training = self.training
        self.eval()
        try:
            logits = self(images)
        finally:
            self.train(was_training)
        out = {name: [self.vocab[name][i] for i in logits[name].argmax(-1).tolist()] for name in self.vocab}
        subjects = out["subject"]
        for name in self.vocab:
            applies = APPLIES_TO.get(name, tuple(self.vocab["subject"]))
            out[name] = [value if subject in applies else None for value, subject in zip(out[name], subjects)]
        return out


def save_scene_classifier(model: SceneClassifier, path: str | Path, extra: Optional[Mapping[str, Any]] = None) -> None:
    save_instrument(model, path, FORMAT_NAME, asdict(model.config), model.vocab, extra)


def load_scene_classifier(path: str | Path, device: str = "cpu") -> SceneClassifier:
    """A trained classifier in eval mode, with the vocabulary it was trained on."""
    state, meta = read_instrument(path, FORMAT_NAME, device)
    model = SceneClassifier(SceneClassifierConfig(**meta["config"]), vocab=meta["vocab"])
    model.load_state_dict(state)
    return model.to(device).eval()
