"""Anchors from another run: sharing with images that are not in the batch (a reference).

Anchor mode (ldm/sharing/__init__.py) lets the first A images of a batch anchor the rest:
the anchors attend to themselves only, every other image to its own tokens and the anchors'. The
anchors' keys and values therefore never depend on the other images, so they can be computed in an
earlier pass, kept, and offered to any number of later batches: the later images come out as they
would have beside the anchors, in batches as many and as large as wanted. This module holds that
split:

- `AnchorRecorder`: while the reference batch is sampled (with its own settings, or none), readers on
  the self-attention layers the later run will share in record the keys and values that the chosen
  images' layers compute, per (layer, step), both guidance halves together, for the steps of the later
  run's window only. With subject words it also makes the chosen images' subject masks from their own
  cross-attention (readers on the mask levels' `attn2`) and keeps each layer's mask; with AdaIN, the
  first anchor's query and key statistics. Readers only read: the batch comes out as it would alone.
- `RecordedAnchors`: the record. Given to a later run (`SharedAttention(..., reference=record)`), it
  makes every image of that run attend to [its own tokens, the anchors' offered tokens of the same
  layer, step and guidance half], exactly the keys a non-anchor image sees in anchor mode: all of
  them, or with subject words and dropout the gathered ones (the batch's gathered kernel).

Keys are the step's progress (step index / number of steps of the whole grid, from the call's step
context) and the layer's module path; the later run must sample the same grid (one model call per
step: DDIM), all of it (txt2img) or its last steps (img2img, which reads the record at those steps).
Tensors: k, v (B, heads, N, d) as the layer computes them; the record holds (halves, A, heads, N, d),
masks (A, N) bool, statistics (halves, A, heads, 1, d).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from einops import rearrange

from ldm.modules.attention import CrossAttention, readers_added
from ldm.modules.cross_attention_read import cross_attention_layers
from ldm.modules.step_context import LayerCall
from ldm.sharing.kernels import attend_across_images, attend_own_and_offered, attend_within_subjects
from ldm.sharing.layers import find_unet, select_layers
from ldm.sharing.masks import SubjectMasks
from ldm.sharing.settings import SharedAttentionSettings
from ldm.sharing.subject_words import per_subject
from ldm.sharing.transforms import adain_transfer, channel_statistics

Key = tuple[str, float]  # (layer module path, step progress)
Statistics = tuple[torch.Tensor, torch.Tensor]  # (mean, std), each (halves, A, heads, 1, d)


@dataclass
class AnchorEntry:
    """What the anchors offer at one (layer, step): k, v (halves, A, heads, N, d); with subjects their
    masks on the layer's token grid (A, N) (isolated subjects: each token's subject, `labels` (A, N) in
    0..S); with AdaIN their query and key statistics."""

    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor] = None
    q_statistics: Optional[Statistics] = None
    k_statistics: Optional[Statistics] = None
    labels: Optional[torch.Tensor] = None

    @property
    def nbytes(self) -> int:
        tensors = [self.k, self.v] + [t for t in (self.mask, self.labels) if t is not None]
        for statistics in (self.q_statistics, self.k_statistics):
            tensors += list(statistics or ())
        return sum(t.numel() * t.element_size() for t in tensors)

    def after(self, other: "AnchorEntry") -> "AnchorEntry":
        """These anchors followed by `other`'s (along A)."""
        def joined(a, b, dim):
            return None if a is None else torch.cat([a, b], dim=dim)

        def joined_statistics(a, b):
            return None if a is None else (joined(a[0], b[0], 1), joined(a[1], b[1], 1))
        return AnchorEntry(joined(self.k, other.k, 1), joined(self.v, other.v, 1), joined(self.mask, other.mask, 0),
                           joined_statistics(self.q_statistics, other.q_statistics),
                           joined_statistics(self.k_statistics, other.k_statistics),
                           joined(self.labels, other.labels, 0))


class RecordedAnchors:
    """The anchors' offers per (layer, step) (`AnchorEntry`), and the first anchor's seed (None: a
    picture), which seeds dropout as the anchors' own batch would."""

    def __init__(self, seed: Optional[int] = None) -> None:
        self.entries: dict[Key, AnchorEntry] = {}
        self.seed = seed

    @property
    def nbytes(self) -> int:
        """Memory the record holds."""
        return sum(entry.nbytes for entry in self.entries.values())

    def store(self, layer: str, progress: float, entry: AnchorEntry) -> None:
        self.entries[(layer, progress)] = entry

    def extend(self, other: "RecordedAnchors") -> None:
        """Append `other`'s anchors after these (same layers and steps required)."""
        if self.seed is None:
            self.seed = other.seed
        if not self.entries:
            self.entries = dict(other.entries)
            return
        if self.entries.keys() != other.entries.keys():
            raise ValueError("the two references were recorded at different layers or steps; record them with "
                             "the same sharing settings and steps")
        self.entries = {key: entry.after(other.entries[key]) for key, entry in self.entries.items()}

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, settings: SharedAttentionSettings,
               draw: Callable[[int, int], torch.Tensor], call: LayerCall, layer: str, strength: float,
               scale: float, query_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q, k, v (B, heads, N, d) of the shared layer `layer` (module path) -> each image over [own, anchors'
        offers]: (B, heads, N, d). `settings`: the later run's; `draw(rows, tokens)`: its dropout generator's
        next uniform draw; `call`: the guidance halves and the step; `query_labels` (B, N): with isolated
        subjects, the subject of each of the new images' tokens."""
        halves, progress = call.step.halves, call.step.progress
        key = (layer, progress)
        if key not in self.entries:
            raise ValueError(f"no anchor keys were recorded for layer {key[0]} at step progress {progress}; the "
                             "reference must be recorded with the run's steps, shared layers and subject words")
        entry = self.entries[key]
        anchor_k, anchor_v = entry.k.to(k.dtype), entry.v.to(v.dtype)  # (halves, A, heads, M, d)
        if anchor_k.shape[0] != halves:
            raise ValueError(f"the anchors were recorded with {anchor_k.shape[0]} guidance half(s) but this batch "
                             f"has {halves}; use the reference's guidance scale")
        if settings.adain:
            q, k, anchor_k = _adain_towards_first_anchor(q, k, anchor_k, entry, halves)
        if settings.isolated:
            if entry.labels is None or query_labels is None:
                raise ValueError("the anchors were recorded without isolated subjects' labels; record them with "
                                 "the run's subjects")
            return self._gathered(q, k, v, anchor_k, anchor_v, None, settings.dropout, draw, strength, scale,
                                  entry.labels, query_labels)
        if entry.mask is None and settings.dropout == 0:
            return _attend_own_then_anchors(q, k, v, anchor_k, anchor_v, halves, strength, scale)
        return self._gathered(q, k, v, anchor_k, anchor_v, entry.mask, settings.dropout, draw, strength, scale)

    def _gathered(self, q, k, v, anchor_k, anchor_v, mask, p, draw, strength, scale, labels=None,
                  query_labels=None) -> torch.Tensor:
        """As the batch's gathered kernel: each anchor offers its subject tokens, less those dropped by
        the draw of a batch [anchors; new images] (rows of the anchors); each image sees its own and these
        (with isolated subjects, `labels` (A, M): a query of subject a sees the anchors' tokens of a only)."""
        halves, A, _, M, _ = anchor_k.shape
        per_half = q.shape[0] // halves
        keep = torch.ones(halves, A, M, dtype=torch.bool, device=q.device)
        if mask is not None:
            keep &= mask.to(q.device)[None]  # one mask per anchor, both halves
        if p > 0:
            drawn = draw(halves * (A + per_half), M)  # the draw of a batch [anchors; new]
            keep &= rearrange(drawn, "(k g) m -> k g m", k=halves)[:, :A].to(q.device) >= p
        if labels is not None:
            keep &= labels.to(q.device)[None] > 0  # only subject tokens are offered
        offered_k = [anchor_k[h, a][:, keep[h, a]] for h in range(halves) for a in range(A)]  # (heads, M_a, d)
        offered_v = [anchor_v[h, a][:, keep[h, a]] for h in range(halves) for a in range(A)]
        seen = [[(i // per_half) * A + a for a in range(A)] for i in range(q.shape[0])]  # same half's anchors
        if labels is not None:
            offered_labels = [labels[a].to(q.device)[keep[h, a]] for h in range(halves) for a in range(A)]
            return attend_within_subjects(q, k, v, offered_k, offered_v, offered_labels, query_labels, seen,
                                          strength=strength, scale=scale)
        return attend_own_and_offered(q, k, v, offered_k, offered_v, seen, include_own=True, strength=strength,
                                      scale=scale)


def _attend_own_then_anchors(q, k, v, anchor_k, anchor_v, halves, strength, scale) -> torch.Tensor:
    """Every image over [own tokens, every anchor token]: q, k, v (B, heads, N, d), anchors (halves, A, heads, M, d)."""
    per_half = q.shape[0] // halves

    def own_then_anchors(t: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        own = rearrange(t, "(k b) h n d -> (k b) 1 h n d", k=halves)  # (halves*B, 1, heads, N, d)
        shared = anchors[:, None].expand(-1, per_half, -1, -1, -1, -1)  # (halves, B, A, heads, M, d)
        shared = rearrange(shared, "k b a h m d -> (k b) a h m d")  # (halves*B, A, heads, M, d)
        return torch.cat([own, shared], dim=1)  # (halves*B, 1+A, heads, N, d)

    out = attend_across_images(q[:, None], own_then_anchors(k, anchor_k), own_then_anchors(v, anchor_v),
                               scale=scale, strength=strength)  # (halves*B, 1, heads, N, d)
    return out[:, 0]


def _adain_towards_first_anchor(q, k, anchor_k, entry: AnchorEntry, halves: int):
    """AdaIN as in a batch whose first image is the first anchor: the new images' q and k (B, heads, N, d)
    and the other anchors' recorded keys get the first anchor's per-channel statistics."""
    if entry.q_statistics is None:
        raise ValueError("the anchors were recorded without AdaIN statistics; record them with adain on")

    def towards_first(t: torch.Tensor, first: Statistics) -> torch.Tensor:
        grouped = rearrange(t, "(k b) h n d -> k b h n d", k=halves)  # (halves, B, heads, N, d)
        out = adain_transfer(grouped, channel_statistics(grouped), (first[0][:, :1], first[1][:, :1]))
        return rearrange(out, "k b h n d -> (k b) h n d")

    q, k = towards_first(q, entry.q_statistics), towards_first(k, entry.k_statistics)
    if anchor_k.shape[1] > 1:  # the other anchors offer keys normalised as in their batch; the first its own
        mean, std = entry.k_statistics
        others = adain_transfer(anchor_k[:, 1:], (mean[:, 1:], std[:, 1:]), (mean[:, :1], std[:, :1]))
        anchor_k = torch.cat([anchor_k[:, :1], others.to(anchor_k.dtype)], dim=1)
    return q, k, anchor_k


class AnchorRecorder:
    """Records the keys and values of images `indices` of a batch in the layers and step window of
    `settings` (the later run's), while the batch samples under its own settings (or none). With subject
    words give `subject_positions` (of those images' prompts); `seed`: the first recorded image's seed."""

    def __init__(self, model: nn.Module, settings: SharedAttentionSettings, indices: Sequence[int],
                 dtype: Optional[torch.dtype] = None, subject_positions: Optional[Sequence] = None,
                 seed: Optional[int] = None):
        self.unet = find_unet(model)
        self.layers: list[tuple[str, CrossAttention]] = select_layers(self.unet, settings.groups)
        self.settings = settings
        self.indices = list(indices)
        self.dtype = dtype
        self.record = RecordedAnchors(seed)
        self.masks: Optional[SubjectMasks] = None
        if settings.subjects:
            if subject_positions is None:
                raise ValueError("recording anchors for subject masks needs the subjects' token positions in "
                                 "their prompts")
            self.masks = SubjectMasks(per_subject(subject_positions))  # of the recorded images, their own attention

    @contextmanager
    def recording(self) -> Iterator[RecordedAnchors]:
        readers = [(layer, self._recorder(name)) for name, layer in self.layers]
        if self.masks is not None:
            readers += [(layer, self._read_masks) for _, tag, layer in cross_attention_layers(self.unet)
                        if SubjectMasks.reads(tag)]
        with readers_added(readers):
            yield self.record

    def _read_masks(self, layer: nn.Module, x: torch.Tensor, context: Optional[torch.Tensor], call: LayerCall,
                    out: torch.Tensor) -> None:
        self.masks.record(layer, x, context, call, rows=self.indices)

    def _recorder(self, name: str):
        def read(layer: CrossAttention, x: torch.Tensor, context: Optional[torch.Tensor], call: LayerCall,
                 out: torch.Tensor) -> None:
            progress, halves = call.step.progress, call.step.halves
            if progress is None:
                raise RuntimeError("recording anchors needs the batch to be sampled (the step of each call is "
                                   "recorded); call the model through a sampler")
            if not self.settings.in_window(progress):
                return  # the later run does not share at this step: nothing to keep
            if self.masks is not None:
                self.masks.enter_call(call.step)
                if not self.masks.ready:
                    return  # no mask yet: the later run does not share at this step either
            # x (halves*R, N, C): the self-attention input

            def chosen(f) -> torch.Tensor:
                t = rearrange(f(x), "(k b) n (h d) -> k b h n d", k=halves, h=layer.heads)  # (halves, R, heads, N, d)
                t = t[:, self.indices]  # (halves, A, heads, N, d)
                return t.to(self.dtype) if self.dtype is not None else t
            entry = AnchorEntry(chosen(layer.to_k).contiguous(), chosen(layer.to_v).contiguous())
            if self.masks is not None:
                entry.mask = self.masks.on_grid(call.grid).clone()  # (A, N)
                if self.settings.isolated:
                    entry.labels = self.masks.labels_on_grid(call.grid).to(torch.uint8)  # (A, N) in 0..S
            if self.settings.adain:
                entry.q_statistics, entry.k_statistics = channel_statistics(chosen(layer.to_q)), \
                    channel_statistics(entry.k)
            self.record.store(name, progress, entry)
        return read


def record_bytes(unet: nn.Module, settings: SharedAttentionSettings, image_side: int, steps: int, halves: int,
                 anchors: int, bytes_per_value: int) -> int:
    """What `AnchorRecorder` keeps for `anchors` images of `image_side` px, computed from shapes alone:
    per shared layer and step in the window, keys and values (2) x halves x anchors x N tokens x channels
    (subject masks and AdaIN statistics add N booleans and 4 x channels values: left out).
    A layer's tag level is its latent side at 512 px with f = 8 (SD v1's layout), so N = (level * side / 512)^2."""
    total = 0
    for _, layer in select_layers(unet, settings.groups):
        side = int(layer.tag.split(".")[1]) * image_side // 512
        total += 2 * halves * anchors * side * side * layer.to_k.out_features * bytes_per_value
    return total * len(settings.steps_in_window(steps))
