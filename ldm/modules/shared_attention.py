"""Batch-shared self-attention: images generated in one batch depict one consistent subject.

The whole mechanism lives in this file: why it works, which keys and values each image sees, which
layers it applies to, and the controller that switches it on and off.

Why it works
------------
In a UNet self-attention layer (`attn1`), every pixel token of an image asks "which other places of this
image look like me?" (query . key) and copies their content (values). That is how the model keeps one
object coherent across the picture: the texture of a chair's left leg is copied to the right leg, the
colour of the seat to the back. Nothing ties two images of a batch together, so two samples of
"a wooden chair" come out as two different chairs.

Batch sharing lets each image's queries also see the keys and values of the other images in its batch.
A token of image 1 that belongs to the chair finds matching chair tokens in images 2, 3, ... and copies
appearance from them too, exactly the way it already copies within its own image. Repeated at every
denoising step, the images settle on shared appearance (colour, material, pattern, identity) while
each keeps its own queries, noise and therefore its own layout and pose. Cross-attention (`attn2`, the
text) is never touched: the prompt still decides what is drawn; sharing only decides that it is drawn
the same way in every image.

What each query sees (B images in a sharing group, N tokens each, keys/values K_j, V_j of image j)
- mode "all":    image i attends to [K_1 ... K_B] (its own tokens included); outputs stay per image.
- mode "anchor": the first A images (the anchors) attend to [K_1 ... K_A] only, so they come out
  exactly as if generated alone (as a batch of A with "all"); every other image i attends to
  [K_i, K_1 ... K_A]. More images can then be made consistent with a fixed set.
- mode "others": image i attends to the other images' tokens only, not its own. Intuition: an image
  can then only copy appearance from its mates, the strongest pull towards one subject (and the
  biggest risk of losing its own structure). Identical images stay unchanged.
- mode "pooled": image i attends to its own N tokens and to the other images' tokens average-pooled
  2x2 over the token grid. Intuition: appearance (colour, material) is smooth at that scale, layout
  detail is not needed from the others, and the extra keys cost a quarter.
- mode "mean": no concatenation at all; image i attends to its own N tokens, but its keys and values
  come from (mean over the group + 2 x own) / 3 of the layer input. Intuition: a cheap nudge of every
  image towards the group's average content, at the cost of plain attention. Identical images stay
  unchanged.
- strength s: an additive bias on the logits of the other images' keys (own keys get 0). s = 0 is
  plain concatenation; s < 0 weakens the pull of the other images (-inf switches it off); s > 0
  strengthens it.

Subject-aware options (the best training-free methods' knobs; see ldm/modules/shared_variants.py for
the gathered kernel they use, ldm/modules/subject_masks.py for the masks):
- subject words: of the other images, a query sees only the tokens that show the subject, read from
  the cross-attention of the subject's words (an Otsu-thresholded map); its own image stays fully
  visible. Backgrounds are then not pulled together. No mask exists at the first model call, so
  sharing starts at the second. Not with "others" (a query could see nothing) or "mean".
- dropout p: each offered token of the other images is dropped with probability p, drawn anew at
  every model call from a generator seeded with the run's seed (the first image's seed of the batch),
  so runs reproduce. Dropped tokens are left out, not masked, so they cost nothing; layouts stay
  more varied. p = 0 is plain sharing. Not with "others" or "mean".
- AdaIN: before attending, every image's queries and keys get the per-channel mean and std (over its
  tokens) of the first image of its sharing group (the first anchor in anchor mode), so the
  images' attention statistics, and with them style, line up. Identical images stay unchanged.

Anchors recorded in another run (a reference, ldm/modules/shared_reference.py): in anchor mode the
anchors' keys and values never depend on the other images, so they can be recorded in an earlier
pass and offered to later batches, whose images are then all non-anchors. Every option keeps its
batch meaning there, which is what makes an extended set equal the images made beside the anchors:
- subject words: a recorded anchor offers only its subject tokens; its mask is made from its own
  cross-attention while it is recorded (the mask of an image depends on that image alone), stored per
  layer and step, and sharing starts at the second step as in a batch.
- dropout: the anchors' offered tokens are dropped by the draw a batch [anchors; new images] would
  make: generator seeded with the first anchor's seed (the first image of that batch), one draw of
  (halves x (anchors + new images), tokens) per shared layer call, the anchors' rows used. With as
  many new images as the anchors' batch had non-anchors, these are the very tokens dropped there.
- AdaIN: the group's first image is the first anchor, so every new image's queries and keys (and the
  other anchors' recorded keys) get the first anchor's per-channel statistics, recorded with it.

A sharing group never crosses the classifier-free-guidance halves: with guidance a batch is
[unconditional images; conditional images] and each half is its own group, so the unconditional
prediction of one image is never mixed with conditional content of another. The guidance helper
(`ldm/models/diffusion/guidance.py`) states the number of halves with `batch_layout`; nothing here
infers it from the batch size.

Cost: in a shared layer with "all", each query attends to B*N keys instead of N, so attention FLOPs
grow with the group size B (B times the plain layer, per image). Memory stays linear in B because the
concatenation is done by regrouping tensors, never by building a (B*N) x (B*N) mask or logits tensor:
`scaled_dot_product_attention` does the rest. Masks, dropout, "others" and "pooled" gather the tokens
each image offers instead, so a query attends to N + (what it is offered) keys.

Which layers
------------
`UNetModel` tags every `attn1` with its resolution group when it is built: `down.64`, `down.32`,
`down.16`, `mid.8`, `up.16`, `up.32`, `up.64` (the level is the SD v1 latent side at 512 px). A
selection is a comma-separated list of `all`, a path (`down`, `mid`, `up`), a path and level
(`up.32`) or a bare level (`32` = every path at that level).

Use
---
    with shared_attention(model, groups="up", mode="all", steps=(0.0, 0.6)):
        samples, _ = sampler.sample(...)

    with shared_attention(model, groups="up", subject="chair", dropout=0.5, prompts=prompts, seed=42):
        ...  # `prompts`: the batch's prompts, to find the subject's tokens (or `subject_positions=`)

On exit every layer (and every hook) is restored. A step window needs the sampler to report the step, which our
samplers do through the guidance helper; outside a sampler no step is known and the window is ignored.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ldm.errors import InvalidValue
from ldm.modules.attention import CrossAttention, SpatialTransformer
from ldm.modules.cross_attention_read import context_of, cross_attention_layers
from ldm.modules.shared_variants import (adain_to_group_reference, attend_own_and_offered, blend_with_group_mean,
                                         offers, others_seen, pool_tokens)
from ldm.modules.subject_masks import SubjectMasks, subject_token_positions
from ldm.modules.attention_kernel import memory_linear_attention

if TYPE_CHECKING:
    from ldm.modules.shared_reference import RecordedAnchors
    from ldm.modules.token_grids import LayerGrid

MODES = ("all", "anchor", "others", "pooled", "mean")
MODE_INTUITIONS = {
    "all": "every image sees every image of its group (own tokens included)",
    "anchor": "the first K images share among themselves; every other image sees itself and them",
    "others": "an image sees only the other images' tokens, not its own",
    "pooled": "an image sees its own tokens and the others' average-pooled 2x2 (a quarter of the extra cost)",
    "mean": "keys and values from (group mean + 2 x own) / 3 of the layer input; no extra keys",
}
# Offset between an image's noise seed and the dropout generator's, so the two streams differ.
DROPOUT_SEED_OFFSET = 0x5EED_D0
PATHS = ("down", "mid", "up")
# Strengths beyond this magnitude make no difference to a float32 softmax (e^-1000 == 0), and keeping
# the bias finite keeps the key padding below representable in float16.
MAX_ABS_STRENGTH = 1000.0


# ---------------------------------------------------------------------------------------------------
# Which keys and values each query sees
# ---------------------------------------------------------------------------------------------------
def attend_across_images(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                         strength: float = 0.0) -> torch.Tensor:
    """Attention of several query images over the concatenated tokens of several key images.

    q: (G, Iq, heads, N, d) queries of Iq images in each of G independent groups;
    k, v: (G, Ik, heads, M, d) keys and values of Ik images. Query image t's own tokens are key image
    t (t < Iq); the rest are "other" images and get `strength` added to their logits.
    Returns (G, Iq, heads, N, d).

    The concatenation is a regrouping: all Iq*N queries of a group attend to all Ik*M keys of the
    group in one `scaled_dot_product_attention` call, which computes the same softmax each query
    would get alone (a query's softmax only involves its own row). No mask is needed for s = 0.

    For s != 0 the bias depends on which image a query and a key come from. Rather than a
    (Iq*N) x (Ik*M) mask, the bias is written as a dot product of Ik extra channels appended to the
    queries and keys: query image t carries the indicator "key image j is not me" (1 - [j == t]) and
    key image j carries s / scale at channel j, so scale * (extra q . extra k) = s exactly for
    other images and 0 for its own. The extra channels cost Ik values per token, linear memory.
    """
    G, Iq, heads, N, d = q.shape
    Ik = k.shape[1]
    q = rearrange(q, "g i h n d -> g h (i n) d")  # (G, heads, Iq*N, d)
    k = rearrange(k, "g j h m d -> g h (j m) d")  # (G, heads, Ik*M, d)
    v = rearrange(v, "g j h m d -> g h (j m) d")  # (G, heads, Ik*M, d)
    M = k.shape[2] // Ik
    if strength != 0.0:
        own = torch.eye(Iq, Ik, dtype=q.dtype, device=q.device)  # (Iq, Ik): 1 where key image j is query image t
        q_extra = (1.0 - own).repeat_interleave(N, dim=0)  # (Iq*N, Ik)
        k_extra = (torch.eye(Ik, dtype=q.dtype, device=q.device) * (strength / scale)).repeat_interleave(M, dim=0)
        # Pad every head dimension (values included) to one multiple of 8 so fused kernels still apply.
        width = 8 * math.ceil((d + Ik) / 8)
        q = torch.cat([q, q_extra.expand(G, heads, -1, -1)], dim=-1)  # (G, heads, Iq*N, d+Ik)
        k = torch.cat([k, k_extra.expand(G, heads, -1, -1)], dim=-1)  # (G, heads, Ik*M, d+Ik)
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))  # (..., width)
    out = memory_linear_attention(q, k, v, scale=scale)[..., :d]  # (G, heads, Iq*N, d)
    return rearrange(out, "g h (i n) d -> g i h n d", i=Iq)


def shared_batch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, halves: int, mode: str,
                           anchors: int, strength: float, scale: float) -> torch.Tensor:
    """Self-attention with each image also seeing its group's images. q, k, v: (B, heads, N, d).

    The batch is `halves` equal halves (2 with classifier-free guidance), each one sharing group.
    """
    B = q.shape[0]
    if B % halves:
        raise ValueError(f"a batch of {B} cannot be split into {halves} guidance halves")
    group = B // halves
    q, k, v = (rearrange(t, "(k b) h n d -> k b h n d", k=halves) for t in (q, k, v))  # (halves, group, heads, N, d)
    if mode == "all" or anchors >= group:
        out = attend_across_images(q, k, v, scale=scale, strength=strength)  # (halves, group, heads, N, d)
        return rearrange(out, "k b h n d -> (k b) h n d")
    # Anchor mode: the anchors share only among themselves, so their result does not depend on the
    # other images at all; each other image sees its own tokens first, then the anchors'.
    anchor_out = attend_across_images(q[:, :anchors], k[:, :anchors], v[:, :anchors], scale=scale,
                                      strength=strength)  # (halves, A, heads, N, d)
    rest = group - anchors

    def own_then_anchors(t: torch.Tensor) -> torch.Tensor:
        shared = t[:, None, :anchors].expand(-1, rest, -1, -1, -1, -1)  # (halves, R, A, heads, N, d)
        own = t[:, anchors:, None]  # (halves, R, 1, heads, N, d)
        return rearrange(torch.cat([own, shared], dim=2), "k r j h n d -> (k r) j h n d")  # (halves*R, 1+A, ...)

    rest_out = attend_across_images(rearrange(q[:, anchors:], "k r h n d -> (k r) 1 h n d"),
                                    own_then_anchors(k), own_then_anchors(v), scale=scale,
                                    strength=strength)  # (halves*R, 1, heads, N, d)
    rest_out = rearrange(rest_out, "(k r) 1 h n d -> k r h n d", k=halves)
    return rearrange(torch.cat([anchor_out, rest_out], dim=1), "k b h n d -> (k b) h n d")


# ---------------------------------------------------------------------------------------------------
# Settings, layer selection and the controller
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SharedAttentionSettings:
    """What to share. `groups`: layer selection (see the module docstring); `mode`: "all" or "anchor";
    `anchors`: how many leading images anchor the rest in "anchor" mode; `steps`: the (start, end)
    fraction of the denoising steps during which sharing is on; `strength`: logit bias on other images;
    `subject`: the prompt words naming the subject (masks from cross-attention; () = no masks);
    `dropout`: probability of dropping each of the other images' tokens; `adain`: AdaIN of queries and
    keys towards the first image of each group."""

    groups: tuple[str, ...] = ("all",)
    mode: str = "all"
    anchors: int = 1
    steps: tuple[float, float] = (0.0, 1.0)
    strength: float = 0.0
    subject: tuple[str, ...] = ()
    dropout: float = 0.0
    adain: bool = False

    def __post_init__(self) -> None:
        if not self.groups:
            raise InvalidValue("groups", "", "no layer groups given; use e.g. 'all', 'up' or 'mid,up.32'")
        if self.mode not in MODES:
            raise InvalidValue("mode", self.mode, f"unknown shared-attention mode {self.mode!r}; choose one of "
                                                  f"{', '.join(MODES)}")
        if self.anchors < 1:
            raise InvalidValue("anchors", self.anchors, f"anchors must be at least 1, got {self.anchors}")
        start, end = self.steps
        if not 0.0 <= start < end <= 1.0:
            raise InvalidValue("steps", self.steps, f"the step window {start}:{end} must satisfy 0 <= start < end "
                                                    "<= 1 (fractions of the steps)")
        if math.isnan(self.strength) or self.strength == math.inf:
            raise InvalidValue("strength", self.strength, "strength must be a number or -inf (off)")
        if isinstance(self.subject, str):
            object.__setattr__(self, "subject", parse_groups(self.subject))
        bad = [w for w in self.subject if not re.fullmatch(r"[A-Za-z0-9']+", w)]
        if bad:
            raise InvalidValue("subject", ",".join(self.subject), f"subject words are single words (letters, digits), "
                                                                  f"got {bad[0]!r}; separate several with commas")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) \
                or not 0.0 <= self.dropout < 1.0:
            raise InvalidValue("dropout", self.dropout, "the dropout probability must satisfy 0 <= p < 1")
        if self.mode in ("others", "mean"):
            why = ("leaves a query only the other images' tokens, so masking or dropping them could leave it "
                   "nothing to attend to" if self.mode == "others" else "adds no other images' tokens to select from")
            for name, used in (("subject", bool(self.subject)), ("dropout", self.dropout > 0)):
                if used:
                    value = ",".join(self.subject) if name == "subject" else self.dropout
                    raise InvalidValue(name, value, f"mode {self.mode!r} {why}; use mode 'all', "
                                                                  "'anchor' or 'pooled' with it")
        if self.mode == "mean" and self.strength != 0.0:
            raise InvalidValue("strength", self.strength, "mode 'mean' has no other images' keys to bias; use "
                                                          "strength 0 with it")

    @property
    def gathers(self) -> bool:
        """Whether each image offers a selection of its tokens (the gathered kernel) rather than all."""
        return bool(self.subject) or self.dropout > 0 or self.mode in ("others", "pooled")

    def in_window(self, progress: float) -> bool:
        """Whether the step at `progress` (step index / number of steps) lies in the step window."""
        start, end = self.steps
        return start <= progress < end

    def steps_in_window(self, total_steps: int, first: int = 0) -> list[int]:
        """The indices (0 = first, noisiest) of the steps of a `total_steps`-step grid that share, among
        those from `first` on (img2img samples the grid's last steps only)."""
        return [index for index in range(first, total_steps) if self.in_window(index / total_steps)]

    def as_metadata(self) -> dict:
        return {**asdict(self), "groups": ",".join(self.groups), "steps": f"{self.steps[0]}:{self.steps[1]}",
                "subject": ",".join(self.subject)}


def parse_groups(spec: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """'mid, up.32' -> ('mid', 'up.32'). Names are checked against a model by `select_layers`."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return tuple(item.strip() for item in items if item.strip())


def tagged_layers(model: nn.Module) -> list[tuple[str, CrossAttention]]:
    """(module path, layer) of every tagged self-attention layer of `model`, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, CrossAttention) and m.tag is not None]


def valid_group_names(model: nn.Module) -> list[str]:
    return group_names_of_tags([m.tag for _, m in tagged_layers(model)])


def group_names_of_tags(tags: Sequence[str]) -> list[str]:
    """Every group name that selects some of these layer tags: all, the paths, the tags, the levels."""
    tags = list(dict.fromkeys(tags))
    paths = [p for p in PATHS if any(t.startswith(p + ".") for t in tags)]
    levels = sorted({t.split(".")[1] for t in tags}, key=int, reverse=True)
    return ["all", *paths, *tags, *levels]


def selected_tags(tags: Sequence[str], groups: Sequence[str]) -> list[bool]:
    """For each tag, whether the group names select it; an unknown name is an error."""
    if not tags:
        raise ValueError("this model has no tagged self-attention layers; build it with UNetModel")
    valid = group_names_of_tags(tags)
    unknown = [g for g in groups if g not in valid]
    if unknown:
        raise ValueError(f"unknown shared-attention group(s) {', '.join(map(repr, unknown))}; "
                         f"valid names: {', '.join(valid)}")

    def selected(tag: str) -> bool:
        path, level = tag.split(".")
        return any(g in ("all", path, tag, level) for g in groups)

    return [selected(tag) for tag in tags]


def select_layers(model: nn.Module, groups: Sequence[str]) -> list[tuple[str, CrossAttention]]:
    """The tagged self-attention layers the group names select; an unknown name is an error."""
    layers = tagged_layers(model)
    chosen = selected_tags([layer.tag for _, layer in layers], groups)
    return [(name, layer) for (name, layer), keep in zip(layers, chosen) if keep]


def describe_layers(model: nn.Module, grids: Optional[Sequence["LayerGrid"]] = None) -> str:
    """A listing of the groups and layers, for `--shared-attn help`; with `grids` (measured by
    `ldm.modules.token_grids.self_attention_grids`) each layer also shows its token grid and count, and
    each level the grid its layers share."""
    lines = ["Self-attention layers by group (tag = path.level; level = SD v1 latent side at 512 px):"]
    measured = {grid.name: grid for grid in grids or ()}
    for name, layer in tagged_layers(model):
        grid = measured.get(name)
        shown = f" {grid.shape:>7} {grid.tokens:>6} tokens " if grid is not None else ""
        lines.append(f"  {layer.tag:<8}{shown} {name}")
    if measured:
        by_level: dict[str, set[str]] = {}
        for grid in measured.values():
            by_level.setdefault(grid.tag.split(".")[1], set()).add(grid.shape)
        lines.append("Token grid by level: " + ", ".join(f"{level} = {' or '.join(sorted(shapes))}"
                                                         for level, shapes in by_level.items()))
    lines.append("Group names: " + ", ".join(valid_group_names(model)))
    lines.append("Combine with commas, e.g. 'mid,up' or 'up.32,up.16'; a bare level such as '32' means every path at it.")
    lines.append("Modes:")
    lines += [f"  {mode:<8} {text}" for mode, text in MODE_INTUITIONS.items()]
    return "\n".join(lines)


@dataclass
class BatchLayout:
    """What the sampler tells the layers about the current batch: guidance halves and step progress
    (index of the step / number of steps, 0 at the first, noisiest step; None outside a sampler)."""

    halves: int = 1
    progress: Optional[float] = None


class SharedAttention:
    """The controller: holds the settings, marks the selected layers while active, restores on exit.

    `subject_positions[i]`: the subject's token positions in the prompt of (conditional) image i, needed
    with subject words (`subject_token_positions` finds them from the prompts); `seed`: the run's seed,
    which seeds the dropout generator."""

    def __init__(self, model: nn.Module, settings: SharedAttentionSettings,
                 subject_positions: Optional[Sequence[Sequence[int]]] = None, seed: int = 0):
        self.settings = settings
        self.unet = find_unet(model)
        self.layers = select_layers(self.unet, settings.groups)
        if settings.subject and subject_positions is None:
            raise ValueError("subject masks need the subject's token positions in each prompt; pass the prompts "
                             "(or subject_positions)")
        self.subject_positions = subject_positions
        self.seed = int(seed)
        self.layout = BatchLayout()
        # Anchors recorded in another run (ldm/modules/shared_reference.py), set while attached: every
        # image then attends to its own tokens and theirs.
        self.reference: Optional["RecordedAnchors"] = None
        self.masks: Optional[SubjectMasks] = None
        self.grid: Optional[tuple[int, int]] = None  # token grid of the running transformer
        self.latent_grid: Optional[tuple[int, int]] = None  # of the running UNet call
        self._generator: Optional[torch.Generator] = None
        self._previous: list[tuple[CrossAttention, Optional[SharedAttention]]] = []
        self._hooks: list = []

    def __enter__(self) -> "SharedAttention":
        if self.unet.shared_attention is not None:
            raise RuntimeError("batch-shared attention is already active on this model; leave it before entering again")
        self._previous = [(layer, layer.batch_sharing) for _, layer in self.layers]
        for _, layer in self.layers:
            layer.batch_sharing = self
        self.unet.shared_attention = self
        s = self.settings
        self._begin_run()
        if s.subject or s.mode == "pooled":
            self._hooks.append(self.unet.register_forward_pre_hook(self._new_call))
            for module in self.unet.modules():
                if isinstance(module, SpatialTransformer):
                    self._hooks.append(module.register_forward_pre_hook(self._enter_transformer))
        if s.subject:
            for _, tag, layer in cross_attention_layers(self.unet):
                if self.masks.reads(tag):  # read-only: the hook returns nothing, the output stays the layer's
                    self._hooks.append(layer.register_forward_hook(self._read_cross_attention, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for layer, previous in self._previous:
            layer.batch_sharing = previous
        while self._hooks:
            self._hooks.pop().remove()
        self._previous = []
        self.unet.shared_attention = None
        self.layout = BatchLayout()
        self.masks, self._generator = None, None

    def _begin_run(self) -> None:
        """The state one run starts from: a fresh dropout generator and empty subject masks."""
        if self.settings.dropout > 0:
            self._generator = torch.Generator().manual_seed((self.seed + DROPOUT_SEED_OFFSET) % 2 ** 63)
        if self.settings.subject:
            self.masks = SubjectMasks(self.subject_positions)

    # ---- hooks: where the running call is ----------------------------------------------------------
    def _new_call(self, unet: nn.Module, args: tuple) -> None:
        self.start_call(tuple(args[0].shape[-2:]))

    def start_call(self, latent_grid: tuple[int, int]) -> None:
        """A model call on latents of (h, w) `latent_grid` begins: the subject masks are remade from the calls before."""
        self.latent_grid = latent_grid
        if self.masks is not None:
            self.masks.new_call()

    def _enter_transformer(self, transformer: nn.Module, args: tuple) -> None:
        self.grid = tuple(args[0].shape[-2:])  # (h, w) of the feature map its blocks run on

    def _read_cross_attention(self, layer: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        self.masks.record(layer, args[0], context_of(args, kwargs), self.grid, self.latent_grid, self.layout.halves)

    # ---- the attention -----------------------------------------------------------------------------
    def applies_now(self) -> bool:
        """Inside the step window (always, when no step is known), not switched off by strength, and with
        subject masks only once a mask exists."""
        if self.settings.strength == -math.inf:
            return False
        if self.masks is not None and not self.masks.ready:
            return False
        progress = self.layout.progress
        return progress is None or self.settings.in_window(progress)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
        """q, k, v (B, heads, N, d) of a selected self-attention layer -> its attention output, same shape."""
        s = self.settings
        halves = self.layout.halves
        if q.shape[0] % halves:
            raise ValueError(f"a batch of {q.shape[0]} cannot be split into {halves} guidance halves")
        strength = max(-MAX_ABS_STRENGTH, min(MAX_ABS_STRENGTH, s.strength))
        if self.reference is not None:  # the anchors are recorded: every image of the batch is a non-anchor
            return self.reference.attend(q, k, v, controller=self, strength=strength, scale=scale)
        if s.adain:
            q, k = adain_to_group_reference(q, halves), adain_to_group_reference(k, halves)
        if s.mode == "mean":
            return memory_linear_attention(q, blend_with_group_mean(k, halves), blend_with_group_mean(v, halves),
                                           scale=scale)
        if not s.gathers:
            return shared_batch_attention(q, k, v, halves=halves, mode=s.mode, anchors=s.anchors,
                                          strength=strength, scale=scale)
        return self._gathered(q, k, v, strength=strength, scale=scale)

    def dropout_draw(self, rows: int, tokens: int) -> torch.Tensor:
        """The next (rows, tokens) uniform draw of the run's dropout generator: one per shared layer call,
        a row per image of the batch (both halves), kept where >= the dropout probability."""
        return torch.rand(rows, tokens, generator=self._generator)

    def _gathered(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strength: float,
                  scale: float) -> torch.Tensor:
        """Each image offers its pooled / subject / kept tokens; each query sees its own and the offers."""
        s, halves, batch = self.settings, self.layout.halves, q.shape[0]
        offered_k, offered_v, grid = k, v, self.grid
        if s.mode == "pooled":
            offered_k, grid = pool_tokens(k, self.grid)  # (B, heads, M, d)
            offered_v, _ = pool_tokens(v, self.grid)
        keep = None  # (B, M) bool
        if self.masks is not None:
            keep = self.masks.on_grid(grid).to(q.device).repeat(halves, 1)  # the conditional masks, per half
        if s.dropout > 0:
            draw = self.dropout_draw(batch, offered_k.shape[2]).to(q.device)  # (B, M)
            kept = draw >= s.dropout
            keep = kept if keep is None else keep & kept
        offered_k, offered_v = offers(offered_k, offered_v, keep)
        return attend_own_and_offered(q, k, v, offered_k, offered_v,
                                      others_seen(batch, halves, s.mode, s.anchors),
                                      include_own=s.mode != "others", strength=strength, scale=scale)


def find_unet(model: nn.Module) -> nn.Module:
    """The UNet inside a LatentDiffusion model (`model.model.diffusion_model`), or the UNet itself."""
    if hasattr(model, "shared_attention") and hasattr(model, "self_attention_layers"):
        return model
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if unet is None or not hasattr(unet, "self_attention_layers"):
        raise TypeError(f"expected a LatentDiffusion model or a UNetModel, got {type(model).__name__}")
    return unet


def shared_attention(model: nn.Module, groups: Union[str, Sequence[str]] = "all", mode: str = "all",
                     anchors: int = 1, steps: tuple[float, float] = (0.0, 1.0), strength: float = 0.0,
                     subject: Union[str, Sequence[str]] = (), dropout: float = 0.0, adain: bool = False,
                     prompts: Optional[Sequence[str]] = None,
                     subject_positions: Optional[Sequence[Sequence[int]]] = None, seed: int = 0) -> SharedAttention:
    """`with shared_attention(model, groups="up"): ...` turns batch sharing on for the selected layers.
    With `subject`, give the batch's `prompts` (a LatentDiffusion model finds the words' tokens with its
    tokenizer) or the token positions directly; `seed` seeds the dropout."""
    settings = SharedAttentionSettings(groups=parse_groups(groups), mode=mode, anchors=anchors,
                                       steps=(float(steps[0]), float(steps[1])), strength=float(strength),
                                       subject=parse_groups(subject), dropout=dropout, adain=bool(adain))
    return controller_for(model, settings, prompts=prompts, subject_positions=subject_positions, seed=seed)


def controller_for(model: nn.Module, settings: SharedAttentionSettings, prompts: Optional[Sequence[str]] = None,
                   subject_positions: Optional[Sequence[Sequence[int]]] = None, seed: int = 0) -> SharedAttention:
    """The controller of `settings` for a batch of `prompts` (needed with subject words unless
    `subject_positions` is given) generated from `seed`."""
    if settings.subject and subject_positions is None and prompts is not None:
        subject_positions = subject_positions_for(model, prompts, settings.subject)
    return SharedAttention(model, settings, subject_positions=subject_positions, seed=seed)


def subject_positions_for(model: nn.Module, prompts: Sequence[str], words: Sequence[str]) -> list[tuple[int, ...]]:
    """The subject words' token positions in each prompt, found with `model`'s text encoder's tokenizer."""
    encoder = getattr(model, "cond_stage_model", None)
    if encoder is None or not hasattr(encoder, "tokenizer"):
        raise TypeError("finding the subject's tokens needs a model with a text encoder (cond_stage_model); "
                        "for a bare UNet pass subject_positions")
    return subject_token_positions(encoder.tokenizer, prompts, words, getattr(encoder, "max_length", 77))


@contextmanager
def batch_layout(model: nn.Module, halves: int, progress: Optional[float] = None) -> Iterator[None]:
    """Called by the guidance helper around each model call: how many guidance halves the batch holds
    and how far sampling has come. Does nothing when no sharing is active on `model`."""
    try:
        unet = find_unet(model)
    except TypeError:  # a model without our UNet (e.g. a test double) cannot share attention
        yield
        return
    controller: Optional[SharedAttention] = unet.shared_attention
    if controller is None:
        yield
        return
    previous = controller.layout
    controller.layout = BatchLayout(halves=halves, progress=progress)
    try:
        yield
    finally:
        controller.layout = previous
