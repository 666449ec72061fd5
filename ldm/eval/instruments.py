"""Instruments: what measures the images of a prompt set and turns them into its metrics.

Each instrument has a `description` (for the report), a `metric_set` (`ldm.eval.metric_set.MetricSet`:
the metrics it writes) and `measure(line, images) -> (metrics, labels)`, where `line` is the set's
line of the prompt file (`ldm.eval.prompt_sets`). Images are the 8-bit PIL pictures the report shows:
the classifiers and the segmenter see them as (B, 3, H, W) in [-1, 1], `transformers` processors get
the PIL images themselves. Feature models load from local files only; nothing is downloaded.

- `AttributeInstrument`: v1's attribute classifier, for models of the synthetic objects;
- `WorldInstrument`: the world v2's scene classifier and subject segmenter (`ldm.eval.metrics_v2`);
- `FeatureModelInstrument`: a DINO or CLIP model from `transformers`, for any model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.eval.metrics_v1 import (NAMED_ATTRIBUTES, SYNTHETIC_METRICS, attribute_metrics, blank_metrics,
                              mean_pairwise_cosine)
from ldm.eval.metrics_v2 import ATTRIBUTES, WORLD_V2_METRICS, world_metrics
from ldm.eval.prompt_sets import image_prompts
from ldm.errors import InvalidValue


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])  # (B, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]


class AttributeInstrument:
    """The attribute classifier of `ldm.eval.attribute_classifier` (for the synthetic-object models)."""

    description = "attribute classifier"
    metric_set = SYNTHETIC_METRICS

    def __init__(self, classifier: torch.nn.Module, device: torch.device) -> None:
        self.classifier, self.device = classifier.to(device).eval(), device

    def measure(self, prompt: str, images: Sequence[Image.Image]) -> tuple[dict[str, float], dict[str, list[str]]]:
        """(metrics, predicted labels per attribute) of one set."""
        x = images_to_tensor(images).to(self.device)
        predictions = self.classifier.predict(x)
        metrics = attribute_metrics(prompt, predictions)
        metrics["feature_sim"] = mean_pairwise_cosine(self.classifier.features(x))
        labels = {name: list(predictions[name]) for name in (*NAMED_ATTRIBUTES, "facing")}
        return metrics, labels


class WorldInstrument:
    """The world v2's scene classifier (`ldm.eval.scene_classifier`) and subject segmenter
    (`ldm.eval.segmenter`), for models of the world v2 (ldm/data/world.py)."""

    description = "world v2 scene classifier and subject segmenter"
    metric_set = WORLD_V2_METRICS

    def __init__(self, classifier: torch.nn.Module, segmenter: torch.nn.Module, device: torch.device) -> None:
        self.classifier, self.segmenter = classifier.to(device).eval(), segmenter.to(device).eval()
        self.device = device

    def segment(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The segmenter's subject masks (B, H, W) bool, on the CPU."""
        return self.segmenter.predict(images_to_tensor(images).to(self.device)).cpu()

    def measure(self, line: str, images: Sequence[Image.Image]) -> tuple[dict[str, float], dict[str, list[str]]]:
        """(metrics, predicted labels per attribute, '' where the subject lacks it) of one set."""
        x = images_to_tensor(images).to(self.device)
        predictions = self.classifier.predict(x)
        masks = self.segment(images).numpy()  # (B, H, W) bool
        pixels = np.stack([np.asarray(image.convert("RGB")) for image in images])  # (B, H, W, 3) uint8
        metrics = world_metrics(image_prompts(line, len(images)), predictions, masks, pixels)
        with torch.no_grad():
            metrics["feature_sim"] = mean_pairwise_cosine(self.classifier.features(x))
        labels = {name: ["" if v is None else v for v in predictions[name]] for name in ATTRIBUTES}
        return metrics, labels


def _load_instrument_file(field: str, path: Path, load: Callable[..., torch.nn.Module],
                          device: torch.device) -> torch.nn.Module:
    from ldm.checkpoint import CheckpointError
    if not Path(path).is_file():
        raise InvalidValue(field, path, "no such file; the world v2 instruments are written by "
                                        "scripts/train_world_instruments.py (configs/demo/v2/README.md)")
    try:
        return load(path, device=str(device))
    except (ValueError, CheckpointError, RuntimeError) as error:
        raise InvalidValue(field, path, f"is not a world v2 {field} file ({error})") from None


def load_world_classifier(path: Path, device: torch.device) -> torch.nn.Module:
    """The world v2 scene classifier from its file; an InvalidValue (field `classifier`) for a missing
    file, a file of another kind, or a classifier of another vocabulary than ldm/data/world.py's."""
    from ldm.data.world import VOCABULARY
    from ldm.eval.scene_classifier import load_scene_classifier

    classifier = _load_instrument_file("classifier", path, load_scene_classifier, device)
    if classifier.vocab != {name: list(values) for name, values in VOCABULARY.items()}:
        raise InvalidValue("classifier", path, "was trained on another vocabulary than ldm/data/world.py's; "
                                               "retrain it with scripts/train_world_instruments.py")
    return classifier


def load_world_instruments(classifier_path: Path, segmenter_path: Path, device: torch.device) -> WorldInstrument:
    """The world v2 instrument pair from its two files; an InvalidValue (field `classifier` or
    `segmenter`) for a missing file, a file of another kind, or a classifier of another vocabulary."""
    from ldm.eval.segmenter import load_segmenter

    classifier = load_world_classifier(classifier_path, device)
    return WorldInstrument(classifier, _load_instrument_file("segmenter", segmenter_path, load_segmenter, device),
                           device)


class FeatureModelInstrument:
    """A `transformers` image model: DINO-style (`AutoModel`, CLS token) or CLIP (`CLIPModel`, projected
    embeddings, plus the prompt for a text-image score). Loaded from local files only."""

    def __init__(self, kind: str, model: torch.nn.Module, processor: Any, device: torch.device) -> None:
        self.kind, self.model, self.processor, self.device = kind, model.to(device).eval(), processor, device
        self.metric_set = SYNTHETIC_METRICS
        self.description = f"{kind} image features of `{getattr(model, 'name_or_path', '') or type(model).__name__}`"

    @classmethod
    def load(cls, kind: str, name_or_path: str, device: torch.device) -> "FeatureModelInstrument":
        import transformers
        if kind not in ("dino", "clip"):
            raise InvalidValue("features", kind, "is not known; use dino or clip")
        model_class, processor_class = ((transformers.CLIPModel, transformers.CLIPProcessor) if kind == "clip"
                                        else (transformers.AutoModel, transformers.AutoImageProcessor))
        try:
            processor = processor_class.from_pretrained(name_or_path, local_files_only=True)
            model = model_class.from_pretrained(name_or_path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise InvalidValue("feature_model", name_or_path, f"cannot load a {kind} model from local files "
                               f"({error}). Nothing is downloaded: give a folder written by save_pretrained or "
                               "a hub id already in the Hugging Face cache") from None
        return cls(kind, model, processor, device)

    @staticmethod
    def _embedding(output: Any) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output holds the projection; older
        # versions return the tensor itself.
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, D) features of PIL images."""
        image_processor = self.processor.image_processor if self.kind == "clip" else self.processor
        pixels = image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        if self.kind == "clip":
            return self._embedding(self.model.get_image_features(pixel_values=pixels)).float()
        return self.model(pixel_values=pixels).last_hidden_state[:, 0].float()  # (B, D): the CLS token

    @torch.no_grad()
    def text_features(self, prompt: str) -> torch.Tensor:
        """(1, D) CLIP embedding of the prompt."""
        tokens = self.processor.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        return self._embedding(self.model.get_text_features(**tokens)).float()

    def measure(self, prompt: str, images: Sequence[Image.Image]) -> tuple[dict[str, float], dict[str, list[str]]]:
        metrics = blank_metrics()
        features = self.image_features(images)
        metrics["feature_sim"] = mean_pairwise_cosine(features)
        if self.kind == "clip":
            cosines = F.cosine_similarity(features.double(), self.text_features(prompt).double(), dim=-1)  # (B,)
            metrics["text_image"] = float(cosines.mean())
        return metrics, {}
