"""Subject masks for batch sharing, read from cross-attention: which tokens of an image show which subject.

Batch sharing ("all") lets every token of an image copy from every token of the other images, so the
backgrounds and layouts are pulled together along with the subject. With subjects
(`SharedAttentionSettings.subjects`, e.g. (("chair",),)) each query still sees all of its own image's
tokens, but of the other images only the tokens that show a subject (ldm/sharing/__init__.py): any
subject ("pooled"), or with "isolated" subjects only the query's own subject.

Where a subject is, is read from the cross-attention of its word: a pixel token whose queries put much
of their text attention on the subject's tokens belongs to the subject. Cross-attention is only read
(`ldm.modules.cross_attention_read`, by a reader on the `attn2` layers), never changed.

How a mask is made, per image and subject (the subject's token positions: ldm/sharing/subject_words.py):
1. At every model call, every cross-attention layer of the levels `MASK_LEVELS` (16 and 32: coarse
   enough to be about objects, fine enough to place them) gives a map (N,): the probability the query
   gives to the subject's tokens, averaged over heads. Each map is resized (bilinear) from its layer's
   token grid to the latent grid, and the maps of one call are averaged over layers.
2. The mask of a step is made from the maps of the last `MASK_HISTORY` calls *before* it (not its own:
   the shared layers of a call may run before its cross-attention layers have all been read), averaged.
   Before the first call there is no mask, so sharing with subject masks starts at the second step.
   Calls are told apart by their step context (one object per model call, ldm/modules/step_context.py):
   whichever layer first meets a new one (`enter_call`) closes the previous call's maps.
3. The averaged map is thresholded by Otsu's method: the threshold that maximises the between-class
   variance of the map's values; tokens at or above it are the subject. A constant map has no
   threshold and gives an empty mask (no evidence where the subject is: nothing is shared).
4. With several subjects, a latent cell inside several masks goes to the subject whose words it
   attends to most (the larger averaged map): every cell has one label, 0 (no subject) or 1..S.
5. For a shared layer the masks are resized to the layer's token grid by area averaging: for pooled
   sharing a token is subject when at least half of the latent cells it covers are in some mask; for
   isolated sharing a token takes the label that covers the largest share of its cells, if that share
   is at least half (else 0). With one subject the two agree.

Classifier-free guidance: only the conditional half's prompts name the subject, so the maps come from
the conditional half (the last `halves`-th of the batch); image i of the unconditional half uses the mask
of image i of the conditional half. The two halves' tokens still never mix.
"""
from __future__ import annotations

from collections import deque
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from ldm.modules.cross_attention_read import layer_queries_and_keys, token_probability_map
from ldm.modules.step_context import LayerCall, StepContext

MASK_LEVELS = ("16", "32")
MASK_HISTORY = 3


# ---------------------------------------------------------------------------------------------------
# Thresholding and resizing
# ---------------------------------------------------------------------------------------------------
def otsu_mask(values: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold of one map, exactly over its sorted values: bool mask of `values` (any shape)
    at or above the threshold maximising n0 * n1 * (mean0 - mean1)^2. Constant maps give an empty mask."""
    flat = values.flatten().double()
    ordered, _ = flat.sort()
    n = ordered.numel()
    cumulative = ordered.cumsum(0)  # cumulative[k-1]: sum of the k smallest
    k = torch.arange(1, n, device=flat.device)  # split: the k smallest below, the rest at or above
    below = cumulative[:-1] / k
    above = (cumulative[-1] - cumulative[:-1]) / (n - k)
    between = k * (n - k) * (below - above) ** 2
    between[ordered[1:] == ordered[:-1]] = -1.0  # a split inside a run of equal values is no threshold
    if n < 2 or between.max() < 0:
        return torch.zeros_like(values, dtype=torch.bool)
    threshold = ordered[1:][between.argmax()]
    return values.double() >= threshold


def resize_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Masks (B, H, W) bool -> (B, h*w) bool on the token grid `grid`: the share of covered cells, >= 1/2."""
    share = F.interpolate(mask[:, None].float(), size=grid, mode="area")  # (B, 1, h, w)
    return rearrange(share >= 0.5, "b 1 h w -> b (h w)")


def resize_labels(labels: torch.Tensor, subjects: int, grid: tuple[int, int]) -> torch.Tensor:
    """Labels (B, H, W) in 0..subjects -> (B, h*w) on the token grid: each token the subject covering the
    largest share of its cells if that share is >= 1/2 (the lower label on a tie), else 0."""
    shares = torch.stack([F.interpolate((labels == s)[:, None].float(), size=grid, mode="area")[:, 0]
                          for s in range(1, subjects + 1)])  # (S, B, h, w)
    best, index = shares.max(dim=0)  # (B, h, w): the first maximum on a tie
    return rearrange(torch.where(best >= 0.5, index + 1, 0), "b h w -> b (h w)")


def label_masks(masks: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Per-subject masks (S, B, H, W) bool and their maps (S, B, H, W) -> labels (B, H, W): 0 outside
    every mask, else 1 + the masked subject with the largest map (the first on a tie)."""
    scores = torch.where(masks, maps.double(), -torch.inf)  # (S, B, H, W)
    best, index = scores.max(dim=0)
    return torch.where(masks.any(dim=0), index + 1, 0)


# ---------------------------------------------------------------------------------------------------
# Accumulation over calls
# ---------------------------------------------------------------------------------------------------
class SubjectMasks:
    """The maps of the subjects' tokens' cross-attention, and the masks made from them (see the module
    docstring). `positions[s][i]`: subject s's token positions in conditional image i's prompt."""

    def __init__(self, positions: Sequence[Sequence[Sequence[int]]]):
        self.positions = [[tuple(p) for p in per_image] for per_image in positions]
        if not self.positions or len({len(per_image) for per_image in self.positions}) != 1:
            raise ValueError("give every subject's token positions for the same images")
        self.history: deque[torch.Tensor] = deque(maxlen=MASK_HISTORY)  # (S, Bc, H, W) per call
        self._current: list[torch.Tensor] = []  # the maps of the running call's layers
        self._masks: Optional[torch.Tensor] = None  # (S, Bc, H, W) bool for the running call
        self._labels: Optional[torch.Tensor] = None  # (Bc, H, W) in 0..S
        self._resized: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}
        self._call: Optional[StepContext] = None  # the running call

    @property
    def subjects(self) -> int:
        return len(self.positions)

    @staticmethod
    def reads(tag: Optional[str]) -> bool:
        """Whether the cross-attention layer of level `tag` (e.g. "up.32") feeds the masks."""
        return tag is not None and tag.split(".")[1] in MASK_LEVELS

    def enter_call(self, step: StepContext) -> None:
        """The layers of model call `step` need the masks: when `step` is a new call, the previous call's
        maps join the history and the masks are remade. Called again within one call, it does nothing."""
        if step is self._call:
            return
        self._call = step
        if self._current:
            self.history.append(torch.stack(self._current).mean(dim=0))
        self._current, self._resized = [], {}
        if self.history:
            averaged = torch.stack(list(self.history)).mean(dim=0)  # (S, Bc, H, W)
            self._masks = torch.stack([torch.stack([otsu_mask(m) for m in per_subject]) for per_subject in averaged])
            self._labels = label_masks(self._masks, averaged)
        else:
            self._masks, self._labels = None, None

    def record(self, layer: torch.nn.Module, x: torch.Tensor, context: torch.Tensor, call: LayerCall,
               rows: Optional[Sequence[int]] = None) -> None:
        """Read one cross-attention call: x (B, N, C) on `call.grid`, context (B, T, D), of the conditional
        half only (all of it, or its images `rows`)."""
        self.enter_call(call.step)
        halves = call.step.halves
        conditional = x.shape[0] // halves
        read = conditional if rows is None else len(rows)
        if read != len(self.positions[0]):
            raise ValueError(f"subject token positions were given for {len(self.positions[0])} prompts but "
                             f"{read} images of each guidance half are read")
        if rows is None:
            x, context = x[-conditional:], context[-conditional:]  # the conditional half
        else:
            picked = [(halves - 1) * conditional + row for row in rows]  # its images `rows`
            x, context = x[picked], context[picked]
        q, k = layer_queries_and_keys(layer, x, context)  # (Bc, heads, N, d), (Bc, heads, T, d)
        grid, latent_grid = call.grid, call.step.latent_size
        maps = []
        for positions in self.positions:
            probability = token_probability_map(q, k, layer.scale, positions)  # (Bc, N)
            image = rearrange(probability, "b (h w) -> b 1 h w", h=grid[0], w=grid[1])
            maps.append(F.interpolate(image, size=latent_grid, mode="bilinear", align_corners=False)[:, 0])
        self._current.append(torch.stack(maps))  # (S, Bc, H, W)

    @property
    def ready(self) -> bool:
        return self._masks is not None

    def latent_mask(self) -> Optional[torch.Tensor]:
        """(Bc, H, W) bool: the running call's mask of every subject together on the latent grid, or None
        before the first call."""
        return None if self._masks is None else self._masks.any(dim=0)

    def latent_labels(self) -> Optional[torch.Tensor]:
        """(Bc, H, W) in 0..S: the running call's subject of each latent cell, or None before the first."""
        return self._labels

    def on_grid(self, grid: tuple[int, int]) -> torch.Tensor:
        """(Bc, h*w) bool: the running call's tokens of any subject on a layer's token grid (cached per grid)."""
        if self._masks is None:
            raise RuntimeError("no subject mask exists before the first model call has been read")
        key = ("mask", grid)
        if key not in self._resized:
            self._resized[key] = resize_mask(self._masks.any(dim=0), grid)
        return self._resized[key]

    def labels_on_grid(self, grid: tuple[int, int]) -> torch.Tensor:
        """(Bc, h*w) in 0..S: the running call's subject of each token on a layer's token grid (cached)."""
        if self._labels is None:
            raise RuntimeError("no subject mask exists before the first model call has been read")
        key = ("labels", grid)
        if key not in self._resized:
            self._resized[key] = resize_labels(self._labels, self.subjects, grid)
        return self._resized[key]
