"""Metrics of one prompt set of the world v2 (ldm/data/world.py): subject, background, prompt, layout.

A set is B images generated together; image i has its own prompt (a *story* gives each image its own,
a repeated prompt gives all the same one). `ldm.data.prompts.parse_prompt`, the world's one grammar,
decides what each prompt names. An attribute is *open* for an image when its prompt does not name it
but the subject the prompt allows can have it ("a chair" leaves colour and wall open, not glasses).

Inputs, all for one set of B images:
- `predictions`: the scene classifier's labels {attribute: B labels}, None where the predicted
  subject lacks the attribute (`ldm.eval.scene_classifier.SceneClassifier.predict`);
- `masks`: bool (B, H, W), True on the subject (the segmenter's prediction);
- `pixels`: uint8 (B, H, W, 3), the 8-bit pictures the report shows.

Metrics (NaN where they do not apply):
- `agree_<a>`: share of pairs of images, both leaving `a` open and both predicted to have it, whose
  labels agree; `agreement`: their mean over the subject's appearance (IDENTITY_ATTRIBUTES);
- `subject_hist_sim`: mean over pairs of the histogram intersection (1 = same colour distribution)
  of the colours inside each image's subject mask;
- `bg_diversity`: 1 - mean `agree_<a>` over the background attributes (wall, floor, backdrop);
  `bg_hist_dist`: mean over pairs of 1 - histogram intersection of the colours outside the masks;
- `acc_<a>`: share of the images naming `a` whose predicted `a` is the named value; `acc_subject`
  is class accuracy, `acc_specified` the mean over every other named attribute;
- `spread_x`, `spread_y`, `spread_size`: population std of the mask's box centre x, bottom y (offsets
  from the image centre) and longest side, fractions of the image side, over images with a mask;
- `mask_iou`: mean pairwise IoU of the subject masks (layouts that coincide give 1).
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ldm.data.prompts import parse_prompt
from ldm.data.render import mask_bbox
from ldm.data.world import APPLIES_TO, BACKGROUND_ATTRIBUTES, SUBJECTS, VOCABULARY
from ldm.eval.metric_set import MetricSet, finite_mean, spread
from ldm.eval.segmenter import mask_iou

ATTRIBUTES: tuple[str, ...] = tuple(VOCABULARY)
# What makes a subject the same subject; size, facing and position are its layout, not its identity.
IDENTITY_ATTRIBUTES: tuple[str, ...] = ("subject", "colour", "pattern", "skin", "hair_colour", "hair_style",
                                        "glasses", "shirt")
LAYOUT_ATTRIBUTES: tuple[str, ...] = ("size", "facing", "position")
HISTOGRAM_BINS = 4  # per RGB channel: 64 colour cells, coarse enough for small generated images

_DESCRIPTIONS: dict[str, str] = {
    "agreement": "pairwise agreement within a set of the subject's appearance attributes the prompts leave "
                 f"open (mean over {', '.join(IDENTITY_ATTRIBUTES)})",
    **{f"agree_{a}": f"pairwise agreement of {a} within a set (image pairs whose prompts leave it open)"
       for a in ATTRIBUTES},
    "subject_hist_sim": "mean pairwise histogram intersection of the colours inside the subject masks "
                        "(1 = same colours)",
    "bg_diversity": "1 - mean pairwise agreement of the background attributes the prompts leave open "
                    "(wall, floor, backdrop)",
    "bg_hist_dist": "mean pairwise 1 - histogram intersection of the colours outside the subject masks",
    "feature_sim": "mean pairwise cosine similarity of the scene classifier's image embeddings",
    **{f"acc_{a}": f"share of the images whose prompt names {a} that show it" for a in ATTRIBUTES},
    "acc_specified": "accuracy of the named attributes other than the subject (mean over those named)",
    "spread_x": "std within a set of the subject mask's box centre x (fraction of the image side)",
    "spread_y": "std within a set of the subject mask's box bottom y (fraction of the image side)",
    "spread_size": "std within a set of the subject mask's box longest side (fraction of the image side)",
    "mask_iou": "mean pairwise IoU of the subject masks within a set (1 = the same layout)",
}
WORLD_V2_METRICS = MetricSet(
    descriptions=_DESCRIPTIONS,
    report_columns=("agreement", "subject_hist_sim", "bg_diversity", "bg_hist_dist", "acc_subject",
                    "acc_specified", "mask_iou", "spread_x", "spread_y", "spread_size"),
    paired_columns=("agreement", "subject_hist_sim", "bg_diversity", "bg_hist_dist", "acc_subject",
                    "acc_specified", "mask_iou"),
    detail_columns=(*(f"agree_{a}" for a in ATTRIBUTES), *(f"acc_{a}" for a in ATTRIBUTES)),
)


def allowed_subjects(named: Mapping[str, str]) -> tuple[str, ...]:
    """The subjects a prompt's named attributes allow: the named one, or those having every named attribute."""
    if "subject" in named:
        return (named["subject"],)
    return tuple(s for s in SUBJECTS if all(s in APPLIES_TO[a] for a in named))


def open_attributes(named: Mapping[str, str]) -> tuple[str, ...]:
    """The attributes a prompt leaves to chance: not named, and some allowed subject has them."""
    subjects = allowed_subjects(named)
    return tuple(a for a in ATTRIBUTES if a not in named and any(s in APPLIES_TO[a] for s in subjects))


def _pairs(n: int) -> list[tuple[int, int]]:
    return list(combinations(range(n), 2))


def open_agreement(labels: Sequence[Optional[str]], is_open: Sequence[bool]) -> float:
    """Share of pairs (both open, both labelled) with equal labels; NaN without such a pair."""
    pairs = [(i, j) for i, j in _pairs(len(labels))
             if is_open[i] and is_open[j] and labels[i] is not None and labels[j] is not None]
    return sum(labels[i] == labels[j] for i, j in pairs) / len(pairs) if pairs else math.nan


def named_accuracy(labels: Sequence[Optional[str]], wanted: Sequence[Optional[str]]) -> float:
    """Share of the images with a wanted value (not None) whose label is that value; NaN if none wants one."""
    judged = [label == value for label, value in zip(labels, wanted) if value is not None]
    return sum(judged) / len(judged) if judged else math.nan


def colour_histogram(pixels: np.ndarray, region: np.ndarray) -> Optional[np.ndarray]:
    """Normalised joint RGB histogram (HISTOGRAM_BINS ** 3,) of uint8 pixels (H, W, 3) where `region`
    (H, W) is True; None for an empty region."""
    chosen = pixels[region].astype(np.int64) * HISTOGRAM_BINS // 256  # (N, 3) bin per channel
    if not len(chosen):
        return None
    cells = (chosen[:, 0] * HISTOGRAM_BINS + chosen[:, 1]) * HISTOGRAM_BINS + chosen[:, 2]  # (N,)
    counts = np.bincount(cells, minlength=HISTOGRAM_BINS ** 3).astype(np.float64)
    return counts / counts.sum()


def mean_histogram_intersection(histograms: Sequence[Optional[np.ndarray]]) -> float:
    """Mean over pairs of non-empty histograms of sum(min(p, q)) (1 = identical, 0 = disjoint); NaN if none."""
    pairs = [(p, q) for p, q in combinations(histograms, 2) if p is not None and q is not None]
    return float(np.mean([np.minimum(p, q).sum() for p, q in pairs])) if pairs else math.nan


def mask_layout(mask: np.ndarray) -> Optional[tuple[float, float, float]]:
    """(box centre x, box bottom y, longest side) of a (H, W) mask as fractions of the side, x and y
    offsets from the image centre (+x right, +y down, as ldm/data/world.py); None for an empty mask."""
    if not mask.any():
        return None
    height, width = mask.shape
    x0, y0, x1, y1 = mask_bbox(mask)
    return (x0 + x1) / 2 / width - 0.5, y1 / height - 0.5, max(x1 - x0, y1 - y0) / max(height, width)


def mean_pairwise_iou(masks: np.ndarray) -> float:
    """Mean IoU over the pairs of (B, H, W) bool masks; NaN for B < 2."""
    pairs = _pairs(len(masks))
    if not pairs:
        return math.nan
    tensor = torch.from_numpy(np.asarray(masks, dtype=bool))
    first, second = zip(*pairs)
    return float(mask_iou(tensor[list(first)], tensor[list(second)]).double().mean())


def world_metrics(prompts: Sequence[str], predictions: Mapping[str, Sequence[Optional[str]]],
                  masks: np.ndarray, pixels: np.ndarray) -> dict[str, float]:
    """Every metric of WORLD_V2_METRICS but `feature_sim` (NaN here) for one set; see the module docstring."""
    count = len(prompts)
    if not (len(masks) == len(pixels) == count and all(len(predictions[a]) == count for a in ATTRIBUTES)):
        raise ValueError(f"{count} prompts need as many predictions, masks and images")
    named = [parse_prompt(p) for p in prompts]
    opened = [open_attributes(n) for n in named]
    metrics = {name: math.nan for name in WORLD_V2_METRICS.descriptions}
    for a in ATTRIBUTES:
        labels = list(predictions[a])
        metrics[f"agree_{a}"] = open_agreement(labels, [a in o for o in opened])
        metrics[f"acc_{a}"] = named_accuracy(labels, [n.get(a) for n in named])
    metrics["agreement"] = finite_mean([metrics[f"agree_{a}"] for a in IDENTITY_ATTRIBUTES])
    background = finite_mean([metrics[f"agree_{a}"] for a in BACKGROUND_ATTRIBUTES])
    metrics["bg_diversity"] = 1.0 - background
    metrics["acc_specified"] = finite_mean([metrics[f"acc_{a}"] for a in ATTRIBUTES if a != "subject"])
    masks = np.asarray(masks, dtype=bool)
    inside = [colour_histogram(p, m) for p, m in zip(pixels, masks)]
    outside = [colour_histogram(p, ~m) for p, m in zip(pixels, masks)]
    metrics["subject_hist_sim"] = mean_histogram_intersection(inside)
    metrics["bg_hist_dist"] = 1.0 - mean_histogram_intersection(outside)
    layouts = [layout for layout in map(mask_layout, masks) if layout is not None]
    for position, name in enumerate(("spread_x", "spread_y", "spread_size")):
        metrics[name] = spread([layout[position] for layout in layouts])
    metrics["mask_iou"] = mean_pairwise_iou(masks)
    return metrics
