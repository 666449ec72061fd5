"""A small CNN that reads the attributes of a synthetic-object image back: the evaluation's instrument.

It predicts, for one image showing one object of `ldm.data.synthetic`, the class, colour, pattern and
facing (classification heads) and the position x, y and size scale (regression heads, in the
generator's units: x, y are offsets of the object centre from the image centre as a fraction of the
image side, +y down; size is the scale factor of `SIZES`). Its penultimate activations (`features`)
serve as an appearance embedding for feature-similarity consistency scores.

Conventions
- Input images are (B, 3, H, W) in [-1, 1] (what the autoencoder decodes to); other sizes are
  resized to the training size (64) first.
- Two coordinate channels are appended to the input so that the convolutions can read absolute
  position, which plain convolutions with global pooling cannot.
- The label vocabulary travels with the weights (safetensors metadata), so predictions are named
  by what the classifier was trained on, even if the generator's constants change later.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from ldm.data.synthetic import CLASSES, COLOURS, FACINGS, PATTERNS, SIZES
from ldm.eval.instrument_files import save_instrument

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "models" / "demo" / "attribute_classifier.safetensors"
FORMAT_NAME = "ldm.eval.attribute_classifier/v1"
# Order of the outputs of the regression head.
REGRESSION_TARGETS: tuple[str, ...] = ("x", "y", "size")
T = TypeVar("T")


def default_vocab() -> dict[str, list[str]]:
    """Labels of each classification head, in output order, from the synthetic generator."""
    return {"cls": list(CLASSES), "colour": list(COLOURS), "pattern": list(PATTERNS), "facing": list(FACINGS)}


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture: conv widths per stage (stage 0 strides by `stem_stride`, each later one by 2)."""
    widths: tuple[int, ...] = (24, 32, 48, 64, 96)
    # Patterns have a period of 8 px at 64 px, so a strided first conv (which still sees every pixel)
    # loses nothing and makes the network several times cheaper on CPU.
    stem_stride: int = 2
    # Stages that get a second, same-resolution conv: it widens the receptive field where maps are
    # small enough for it to be cheap.
    extra_block_stages: tuple[int, ...] = (2, 3)
    reduced_channels: int = 32
    feature_dim: int = 128
    image_size: int = 64

    def __post_init__(self) -> None:
        # YAML and JSON give lists; keep the frozen config hashable and comparable.
        for name in ("widths", "extra_block_stages"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.image_size % (self.stem_stride * 2 ** (len(self.widths) - 1)):
            raise ValueError(f"image_size {self.image_size} must be divisible by the total stride "
                             f"{self.stem_stride * 2 ** (len(self.widths) - 1)} of widths {self.widths}")


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class AttributeClassifier(nn.Module):
    """Conv trunk, then an appearance path (features, classification heads) and a layout path (regression)."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig(),
                 vocab: Optional[Mapping[str, Sequence[str]]] = None,
                 size_scales: Optional[Mapping[str, float]] = None) -> None:
        super().__init__()
        self.config = config
        self.vocab = {k: list(v) for k, v in (vocab or default_vocab()).items()}
        self.size_scales = dict(size_scales or SIZES)
        w = config.widths
        layers = [_conv_block(3 + 2, w[0], config.stem_stride)]  # RGB + 2 coordinate channels
        for stage, (c_in, c_out) in enumerate(zip(w[:-1], w[1:]), start=1):
            layers.append(_conv_block(c_in, c_out, 2))
            if stage in config.extra_block_stages:
                layers.append(_conv_block(c_out, c_out, 1))
        self.trunk = nn.Sequential(*layers)
        final_side = config.image_size // (config.stem_stride * 2 ** (len(w) - 1))
        # Two paths from the last map: the pooled one says what the object looks like (the appearance
        # features and the classification heads), the flattened one where it is and how big (regression).
        # Kept apart, the position targets do not pull the appearance features towards layout, and the
        # features compare appearance regardless of where the object stands.
        self.embed = nn.Linear(w[-1], config.feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(config.feature_dim, len(labels))
                                    for name, labels in self.vocab.items()})
        self.reduce = nn.Conv2d(w[-1], config.reduced_channels, 1)
        self.locate = nn.Linear(config.reduced_channels * final_side ** 2, config.feature_dim)
        self.regression = nn.Linear(config.feature_dim, len(REGRESSION_TARGETS))
        with torch.no_grad():
            # Start at the centre of the image and the mean size, so early training is not spent there.
            mean_scale = sum(self.size_scales.values()) / len(self.size_scales)
            self.regression.bias.copy_(torch.tensor([0.0, 0.0, mean_scale]))

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}; "
                             "permute channels-last batches with images.permute(0, 3, 1, 2)")
        if images.min() < -1.5 or images.max() > 1.5:
            raise ValueError(f"expected pixel values in [-1, 1], got range [{images.min():.2f}, "
                             f"{images.max():.2f}]; map [0, 1] images with 2 * x - 1 and [0, 255] ones with "
                             "x / 127.5 - 1")
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False)
        b = images.shape[0]
        ramp = torch.linspace(-1.0, 1.0, size, device=images.device, dtype=images.dtype)
        coords = torch.stack(torch.meshgrid(ramp, ramp, indexing="ij"))  # (2, H, W): row, column
        return torch.cat([images, coords.expand(b, -1, -1, -1)], dim=1)  # (B, 5, H, W)

    def _trunk(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self._prepare(images))  # (B, C, S, S), S = final_side

    def _appearance(self, fmap: torch.Tensor) -> torch.Tensor:
        return F.relu(self.embed(fmap.mean(dim=(2, 3))))  # (B, feature_dim)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw outputs: logits (B, K) per classification head, and "regression" (B, 3) as x, y, size."""
        fmap = self._trunk(images)
        appearance = self._appearance(fmap)
        out = {name: head(appearance) for name, head in self.heads.items()}
        where = F.relu(self.locate(self.reduce(fmap).flatten(1)))  # (B, feature_dim)
        out["regression"] = self.regression(where)
        return out

    def _in_eval_mode(self, fn: Callable[[torch.Tensor], T], images: torch.Tensor) -> T:
        # The instrument must never use batch statistics or build graphs, whatever mode it was left in.
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return fn(images)
        finally:
            self.train(was_training)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations of the appearance path (B, feature_dim), for feature-similarity
        consistency scores; they do not see position by design (no gradients, eval mode)."""
        return self._in_eval_mode(lambda x: self._appearance(self._trunk(x)), images)

    def predict(self, images: torch.Tensor) -> dict[str, Any]:
        """Named predictions for (B, 3, H, W) images in [-1, 1] (no gradients, eval mode).

        For each classification head h ("cls", "colour", "pattern", "facing"): `h` is a list of B labels
        and `h + "_probs"` a (B, K) tensor whose columns follow `self.vocab[h]`. "x", "y" and "size"
        are (B,) tensors in the generator's units; "size_label" names the nearest size in `SIZES`.
        """
        raw = self._in_eval_mode(self.forward, images)
        result: dict[str, Any] = {}
        for name, labels in self.vocab.items():
            probs = raw[name].softmax(dim=-1)  # (B, K)
            result[name] = [labels[i] for i in probs.argmax(dim=-1).tolist()]
            result[name + "_probs"] = probs
        for i, target in enumerate(REGRESSION_TARGETS):
            result[target] = raw["regression"][:, i]
        names = list(self.size_scales)
        scales = torch.tensor([self.size_scales[n] for n in names], device=result["size"].device)
        nearest = (result["size"][:, None] - scales[None, :]).abs().argmin(dim=-1)  # (B,)
        result["size_label"] = [names[i] for i in nearest.tolist()]
        return result


def save_attribute_classifier(model: AttributeClassifier, path: str | Path,
                              extra_metadata: Optional[Mapping[str, Any]] = None) -> None:
    """Write weights as safetensors with the config, vocabulary and `extra_metadata` (JSON) in its metadata."""
    own = {"size_scales": model.size_scales, "regression_targets": list(REGRESSION_TARGETS)}
    for key in (extra_metadata or {}):
        if key in own or key in ("format", "config", "vocab"):
            raise ValueError(f"extra_metadata key {key!r} is reserved for the classifier itself; rename it")
    save_instrument(model, path, FORMAT_NAME, asdict(model.config), model.vocab, {**own, **(extra_metadata or {})})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON-decoded metadata of a saved classifier."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not an attribute classifier saved by save_attribute_classifier "
                         f"(format {raw.get('format')!r}, expected {FORMAT_NAME!r})")
    return {k: (v if k == "format" else json.loads(v)) for k, v in raw.items()}


def load_attribute_classifier(path: Optional[str | Path] = None,
                              device: str | torch.device = "cpu") -> AttributeClassifier:
    """Load a trained classifier in eval mode (default: the shipped models/demo/attribute_classifier.safetensors)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    if not path.exists():
        raise FileNotFoundError(f"no attribute classifier at {path}; train one with "
                                "`python scripts/train_classifier.py --out <path>`")
    meta = read_metadata(path)
    config = ClassifierConfig(**meta["config"])
    if meta["regression_targets"] != list(REGRESSION_TARGETS):
        raise ValueError(f"{path} has regression outputs {meta['regression_targets']}, this code expects "
                         f"{list(REGRESSION_TARGETS)}; retrain the classifier")
    model = AttributeClassifier(config, vocab=meta["vocab"], size_scales=meta["size_scales"])
    state = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
    model.load_state_dict(state)
    return model.to(device).eval()
