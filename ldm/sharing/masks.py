"""Subject masks for batch sharing, read from cross-attention: which tokens of an image show the subject.

Batch sharing ("all") lets every token of an image copy from every token of the other images, so the
backgrounds and layouts are pulled together along with the subject. With subject words
(`SharedAttentionSettings.subject`, e.g. ("chair",)) each query still sees all of its own image's tokens,
but of the other images only the tokens that show the subject (ldm/sharing/__init__.py).

Where a subject is, is read from the cross-attention of its word: a pixel token whose queries put much
of their text attention on the subject's tokens belongs to the subject. Cross-attention is only read
(`ldm.modules.cross_attention_read`, by a reader on the `attn2` layers), never changed.

How a mask is made, per image:
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
4. For a shared layer the latent-grid mask is resized to the layer's token grid by area averaging, and
   a token is subject when at least half of the latent cells it covers are.

Classifier-free guidance: only the conditional half's prompts name the subject, so the maps come from
the conditional half (the last `halves`-th of the batch); image i of the unconditional half uses the mask
of image i of the conditional half. The two halves' tokens still never mix.
"""
from __future__ import annotations

import re
from collections import deque
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from ldm.errors import InvalidValue
from ldm.modules.cross_attention_read import layer_queries_and_keys, token_probability_map
from ldm.modules.step_context import LayerCall, StepContext

MASK_LEVELS = ("16", "32")
MASK_HISTORY = 3


# ---------------------------------------------------------------------------------------------------
# Subject words in the prompts
# ---------------------------------------------------------------------------------------------------
def prompt_words(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", prompt.lower())


def check_prompts_name_subject(prompts: Sequence[str], words: Sequence[str]) -> None:
    """Every prompt contains one of the subject words (whole words, any case); otherwise an
    InvalidValue naming the first image that does not."""
    wanted = {w.lower() for w in words}
    for index, prompt in enumerate(prompts):
        if not wanted & set(prompt_words(prompt)):
            raise InvalidValue("sharing.subject", ",".join(words),
                               f"the prompt of image {index} ({prompt!r}) contains none of the subject words; "
                               "name the subject in every prompt or change the subject words")


def subject_token_positions(tokenizer, prompts: Sequence[str], words: Sequence[str],
                            max_length: int = 77) -> list[tuple[int, ...]]:
    """For each prompt, the positions (in the text encoder's sequence, 0 = start token) of the tokens of
    every occurrence of a subject word. The CLIP tokenizer encodes a lower-case word the same alone as
    inside a sentence, so a word's tokens are found as a run of its own ids."""
    check_prompts_name_subject(prompts, words)
    word_ids = [tokenizer.encode(w.lower()) for w in words]
    out = []
    for index, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        found: set[int] = set()
        for run in word_ids:
            for start in range(len(ids) - len(run) + 1):
                if ids[start:start + len(run)] == run:
                    found.update(range(1 + start, 1 + start + len(run)))  # +1: the start token
        found = {p for p in found if p < max_length - 1}
        if not found:
            raise InvalidValue("sharing.subject", ",".join(words),
                               f"the subject words of the prompt of image {index} ({prompt!r}) are not within "
                               f"its first {max_length - 2} tokens; shorten the prompt")
        out.append(tuple(sorted(found)))
    return out


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


# ---------------------------------------------------------------------------------------------------
# Accumulation over calls
# ---------------------------------------------------------------------------------------------------
class SubjectMasks:
    """The maps of the subject tokens' cross-attention, and the masks made from them (see the module
    docstring). `positions[i]`: the subject's token positions in conditional image i's prompt."""

    def __init__(self, positions: Sequence[Sequence[int]]):
        self.positions = [tuple(p) for p in positions]
        self.history: deque[torch.Tensor] = deque(maxlen=MASK_HISTORY)  # (Bc, H, W) per call
        self._current: list[torch.Tensor] = []  # the maps of the running call's layers
        self._mask: Optional[torch.Tensor] = None  # (Bc, H, W) bool for the running call
        self._resized: dict[tuple[int, int], torch.Tensor] = {}
        self._call: Optional[StepContext] = None  # the running call

    @staticmethod
    def reads(tag: Optional[str]) -> bool:
        """Whether the cross-attention layer of level `tag` (e.g. "up.32") feeds the masks."""
        return tag is not None and tag.split(".")[1] in MASK_LEVELS

    def enter_call(self, step: StepContext) -> None:
        """The layers of model call `step` need the masks: when `step` is a new call, the previous call's
        maps join the history and the mask is remade. Called again within one call, it does nothing."""
        if step is self._call:
            return
        self._call = step
        if self._current:
            self.history.append(torch.stack(self._current).mean(dim=0))
        self._current, self._resized = [], {}
        if self.history:
            averaged = torch.stack(list(self.history)).mean(dim=0)  # (Bc, H, W)
            self._mask = torch.stack([otsu_mask(m) for m in averaged])
        else:
            self._mask = None

    def record(self, layer: torch.nn.Module, x: torch.Tensor, context: torch.Tensor, call: LayerCall,
               rows: Optional[Sequence[int]] = None) -> None:
        """Read one cross-attention call: x (B, N, C) on `call.grid`, context (B, T, D), of the conditional
        half only (all of it, or its images `rows`)."""
        self.enter_call(call.step)
        halves = call.step.halves
        conditional = x.shape[0] // halves
        read = conditional if rows is None else len(rows)
        if read != len(self.positions):
            raise ValueError(f"subject token positions were given for {len(self.positions)} prompts but "
                             f"{read} images of each guidance half are read")
        if rows is None:
            x, context = x[-conditional:], context[-conditional:]  # the conditional half
        else:
            picked = [(halves - 1) * conditional + row for row in rows]  # its images `rows`
            x, context = x[picked], context[picked]
        q, k = layer_queries_and_keys(layer, x, context)  # (Bc, heads, N, d), (Bc, heads, T, d)
        probability = token_probability_map(q, k, layer.scale, self.positions)  # (Bc, N)
        grid, latent_grid = call.grid, call.step.latent_size
        image = rearrange(probability, "b (h w) -> b 1 h w", h=grid[0], w=grid[1])
        self._current.append(F.interpolate(image, size=latent_grid, mode="bilinear", align_corners=False)[:, 0])

    @property
    def ready(self) -> bool:
        return self._mask is not None

    def latent_mask(self) -> Optional[torch.Tensor]:
        """(Bc, H, W) bool: the mask of the running call on the latent grid, or None before the first."""
        return self._mask

    def on_grid(self, grid: tuple[int, int]) -> torch.Tensor:
        """(Bc, h*w) bool: the running call's mask on a layer's token grid (cached per grid)."""
        if self._mask is None:
            raise RuntimeError("no subject mask exists before the first model call has been read")
        if grid not in self._resized:
            self._resized[grid] = resize_mask(self._mask, grid)
        return self._resized[grid]
