"""Metrics of one prompt set of the first demo world (ldm/data/synthetic.py): the images of one prompt
generated together in one batch.

Within a set: pairwise agreement of the predicted labels of each attribute (class, colour, pattern)
the prompt leaves open (`ldm.data.synthetic.parse_prompt`), accuracy of those it names, mean pairwise
cosine similarity of image features, and the spread (population std) of predicted x, y and size.
A value that does not apply is NaN. Also the descriptions of every metric (METRICS) that the report
writes next to the numbers, and which of them it reports (`SYNTHETIC_METRICS`, a `MetricSet` of
ldm/eval/metric_set.py; the world v2's are in `ldm.eval.metrics_v2`).
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ldm.data.synthetic import parse_prompt
from ldm.errors import InvalidValue
from ldm.eval.metric_set import MetricSet, finite_mean, spread

NAMED_ATTRIBUTES = ("cls", "colour", "pattern")  # what a prompt may name (`parse_prompt` keys)
LAYOUT_TARGETS = ("x", "y", "size")

METRICS: dict[str, str] = {
    "agreement": "pairwise agreement within a set of the attributes the prompt leaves open "
                 "(mean over class, colour, pattern not named)",
    "agree_cls": "pairwise class agreement within a set (prompts naming no class)",
    "agree_colour": "pairwise colour agreement within a set (prompts naming no colour)",
    "agree_pattern": "pairwise pattern agreement within a set (prompts naming no pattern)",
    "feature_sim": "mean pairwise cosine similarity of image features within a set",
    "acc_cls": "share of images of the class the prompt names",
    "acc_colour": "share of images of the colour the prompt names",
    "acc_pattern": "share of images of the pattern the prompt names",
    "acc_specified": "accuracy of the colour / pattern the prompt names (mean over those named)",
    "text_image": "cosine similarity of CLIP image and prompt embeddings (raw, not x100)",
    "spread_x": "std within a set of the predicted horizontal position (fraction of the image side)",
    "spread_y": "std within a set of the predicted vertical position (fraction of the image side)",
    "spread_size": "std within a set of the predicted size scale",
}


SYNTHETIC_METRICS = MetricSet(
    descriptions=METRICS,
    report_columns=("agreement", "agree_colour", "agree_pattern", "feature_sim", "acc_cls", "acc_specified",
                    "text_image", "spread_x", "spread_y", "spread_size"),
    paired_columns=("agreement", "feature_sim", "acc_cls", "acc_specified", "text_image"),
)

def pairwise_agreement(labels: Sequence[str]) -> float:
    """Share of the unordered pairs of images with equal labels; NaN for fewer than two images."""
    pairs = list(combinations(labels, 2))
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else math.nan


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity over the distinct pairs of rows of `features` (B, D); NaN for B < 2."""
    b = features.shape[0]
    if b < 2:
        return math.nan
    unit = F.normalize(features.double().flatten(1), dim=-1)  # (B, D)
    similarity = unit @ unit.T  # (B, B)
    return float((similarity.sum() - similarity.diagonal().sum()) / (b * (b - 1)))


def named_attributes(prompt: str) -> dict[str, str]:
    """The class / colour / pattern a prompt names, e.g. 'a red chair' -> {cls: chair, colour: red}."""
    try:
        return {k: v for k, v in parse_prompt(prompt).items() if v is not None}
    except ValueError as error:
        raise InvalidValue("prompt", prompt, f"{error}; change or drop the prompt") from None


def unspecified_attributes(prompt: str) -> tuple[str, ...]:
    """The attributes a prompt leaves open, which sharing should make agree within a set."""
    named = named_attributes(prompt)
    return tuple(a for a in NAMED_ATTRIBUTES if a not in named)


def blank_metrics() -> dict[str, float]:
    return {name: math.nan for name in METRICS}


def attribute_metrics(prompt: str, predictions: Mapping[str, Any]) -> dict[str, float]:
    """Agreement, accuracy and layout spread of one set from the classifier's `predict` output
    (labels under "cls", "colour", "pattern"; (B,) values under "x", "y", "size")."""
    named = named_attributes(prompt)
    metrics = blank_metrics()
    for attribute in NAMED_ATTRIBUTES:
        labels = list(predictions[attribute])
        if attribute in named:
            metrics[f"acc_{attribute}"] = sum(label == named[attribute] for label in labels) / len(labels)
        else:
            metrics[f"agree_{attribute}"] = pairwise_agreement(labels)
    metrics["agreement"] = finite_mean([metrics[f"agree_{a}"] for a in NAMED_ATTRIBUTES])
    metrics["acc_specified"] = finite_mean([metrics["acc_colour"], metrics["acc_pattern"]])
    for target in LAYOUT_TARGETS:
        metrics[f"spread_{target}"] = spread([float(v) for v in predictions[target]])
    return metrics
