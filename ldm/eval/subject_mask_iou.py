"""How well batch sharing's subject masks find the subject: their IoU, step by step, against a reference mask.

With subject words (a configuration with `mask` or `subject=`), the sharing controller makes, at every
model call after the first, a mask of each image's subject from the cross-attention of the subject's
words (ldm/sharing/masks.py); of the other images only the masked tokens are shared. Whether
those masks lie on the subject decides whether backgrounds stay free, so the harness measures them:

- `MaskRecorder` keeps the mask each model call used, on the latent grid (the reference resolution:
  the masks are made there before they are resized to each shared layer's grid). DDIM runs one model
  call per step, so call i is step i (0 = the first, noisiest); step 0 has no mask yet.
- `step_ious` compares the mask of every step with the subject segmenter's mask of the *final* image,
  brought to the latent grid the way the masks reach a layer's grid (`resize_mask`: a latent cell is
  subject when at least half of the pixels it covers are). Generated images have no renderer ground
  truth; the segmenter was trained on the renderer's masks and has its own IoU against them on
  held-out renders (`segmenter_iou` in the instruments' instruments.json), which bounds how exactly
  this can be read. An image whose segmenter mask is empty is left out (nothing to compare with);
  an empty sharing mask against a non-empty one gives 0.
- `per_seed_rows` / `markdown_section`: a set's value per step is the mean over its images; a seed's
  the mean over its sets; the report gives mean ± std (ddof 1) over seeds per bucket of steps.

Layouts: sharing masks (B, h, w) bool on the latent grid; segmenter masks (B, H, W) bool in pixels.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from einops import rearrange

from ldm.eval.metric_set import finite_mean
from ldm.eval.segmenter import mask_iou
from ldm.modules.attention import readers_added
from ldm.modules.cross_attention_read import cross_attention_layers
from ldm.sharing import active_run, find_unet
from ldm.sharing.masks import resize_mask

STEP_BUCKETS = 5  # the markdown table's columns: the steps split into this many consecutive runs


class MaskRecorder:
    """While active, records the subject mask of every call of the model's UNet that shares with subject
    masks: `steps[i]` is call i's mask (B, h, w) bool on the latent grid, or None before one exists.
    A reader on the UNet's last attention layer reads the active sharing run's masks as each call ends;
    it changes nothing."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.unet = find_unet(model)
        self.steps: list[Optional[torch.Tensor]] = []
        self._reading = ExitStack()

    def __enter__(self) -> "MaskRecorder":
        self.steps = []
        last = cross_attention_layers(self.unet)[-1][2]  # the last attention layer a call runs
        self._reading.enter_context(readers_added([(last, self._after_call)]))
        return self

    def __exit__(self, *exc) -> None:
        self._reading.close()

    def _after_call(self, layer: torch.nn.Module, x: torch.Tensor, context: Optional[torch.Tensor], call: object,
                    out: torch.Tensor) -> None:
        run = active_run(self.unet)
        if run is None or run.masks is None:
            return
        mask = run.masks.latent_mask()  # the mask this call shared with (made when it began)
        self.steps.append(None if mask is None else mask.detach().cpu().clone())


def step_ious(step_masks: Sequence[Optional[torch.Tensor]], segmented: torch.Tensor) -> list[float]:
    """Per step, the mean over images of IoU(sharing mask, segmenter mask on the latent grid); NaN for a
    step without a mask or when no image has a non-empty segmenter mask. `segmented` (B, H, W) bool."""
    out = []
    for mask in step_masks:
        if mask is None:
            out.append(math.nan)
            continue
        if mask.shape[0] != segmented.shape[0]:
            raise ValueError(f"{mask.shape[0]} sharing masks but {segmented.shape[0]} segmented images")
        truth = resize_mask(segmented.bool().cpu(), tuple(mask.shape[-2:]))  # (B, h*w)
        found = rearrange(mask, "b h w -> b (h w)")
        judged = truth.any(dim=1)
        out.append(float(mask_iou(found[judged], truth[judged]).double().mean()) if judged.any() else math.nan)
    return out


def step_buckets(steps: int, buckets: int = STEP_BUCKETS) -> list[list[int]]:
    """The step indices 0..steps-1 split into at most `buckets` consecutive, near-equal runs."""
    return [list(map(int, run)) for run in np.array_split(np.arange(steps), min(buckets, steps))]


def per_seed_rows(results: Sequence[Any], configurations: Sequence[Any], seeds: Sequence[int]) -> list[dict]:
    """One row per (configuration with masks, seed, step): the IoU averaged over the seed's prompt sets.
    `results`: SetResults (`mask_iou_by_step` empty where nothing was recorded)."""
    rows = []
    for configuration in configurations:
        for seed in seeds:
            sets = [r.mask_iou_by_step for r in results
                    if r.job.configuration == configuration.name and r.job.seed == seed and r.mask_iou_by_step]
            if not sets:
                continue
            for step in range(len(sets[0])):
                rows.append({"configuration": configuration.name, "seed": seed, "step": step,
                             "mask_iou": finite_mean([values[step] for values in sets])})
    return rows


def markdown_section(rows: Sequence[Mapping[str, Any]], segmenter_iou: Optional[Mapping[str, float]]) -> list[str]:
    """The results.md lines of the table: configurations x buckets of steps, mean ± std over seeds.
    `segmenter_iou`: the segmenter's own {"clean", "degraded"} IoU on held-out renders, if known."""
    if not rows:
        return []
    steps = 1 + max(r["step"] for r in rows)
    buckets = step_buckets(steps)
    names = list(dict.fromkeys(r["configuration"] for r in rows))
    heads = [f"steps {b[0]}-{b[-1]}" if len(b) > 1 else f"step {b[0]}" for b in buckets]
    calibration = ("not known to this run (no instruments.json beside the segmenter)" if segmenter_iou is None else
                   f"{segmenter_iou['clean']:.3f} on clean renders and {segmenter_iou['degraded']:.3f} on degraded "
                   "ones (ldm/eval/degrade.py), from instruments.json")
    lines = ["", "Subject masks of sharing against the subject segmenter (mask_iou.csv): IoU, on the latent grid, "
             "of the mask each step shared with (from the subject words' cross-attention) and the segmenter's "
             "mask of the final image; mean over images, then sets, then mean ± std over seeds. Step 0 has no "
             "mask. The generated images have no renderer ground truth: the segmenter, trained on the renderer's "
             f"masks, has its own IoU against them on held-out renders: {calibration}.", "",
             "| " + " | ".join(["configuration", *heads]) + " |", "|" + "---|" * (len(heads) + 1)]
    for name in names:
        cells = [f"`{name}`"]
        for bucket in buckets:
            by_seed: dict[int, list[float]] = {}
            for r in rows:
                if r["configuration"] == name and r["step"] in bucket:
                    by_seed.setdefault(r["seed"], []).append(r["mask_iou"])
            values = np.array([finite_mean(v) for v in by_seed.values()], dtype=np.float64)
            values = values[~np.isnan(values)]
            if not len(values):
                cells.append("–")
            else:
                cells.append(f"{values.mean():.3f}" + (f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines
