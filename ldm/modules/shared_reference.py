"""Anchors from another run: sharing with images that are not in the batch (a reference).

Anchor mode (ldm/modules/shared_attention.py) lets the first A images of a batch anchor the rest:
the anchors attend to themselves only, every other image to its own tokens and the anchors'. The
anchors' keys and values therefore never depend on the other images, so they can be computed in an
earlier pass, kept, and offered to any number of later batches: the later images come out as they
would have beside the anchors, in batches as many and as large as wanted. This module holds that
split:

- `AnchorRecorder`: while the reference batch is sampled (with its own settings), records the keys
  and values that the chosen images' self-attention layers compute, per (layer, step), both guidance
  halves together, for the layers and steps the later run will share in only.
- `RecordedAnchors`: the record. Attached to a later run's controller (`SharedAttention.reference`),
  it makes every image of that run attend to [its own tokens, the anchors' tokens of the same layer,
  step and guidance half], exactly the keys a non-anchor image sees in anchor mode.

Keys are the step's progress (step index / number of steps, as the guidance helper reports it) and
the layer's module path; the later run must sample the same steps (one model call per step: DDIM).
Tensors: k, v (B, heads, N, d) as the layer computes them; the record holds (halves, A, heads, N, d).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
from einops import rearrange

from ldm.modules.attention import CrossAttention
from ldm.modules.shared_attention import (SharedAttention, SharedAttentionSettings, attend_across_images, find_unet,
                                          select_layers)

Key = tuple[str, float]  # (layer module path, step progress)


class RecordedAnchors:
    """Keys and values of A anchor images per (layer, step), both guidance halves: (halves, A, heads, N, d)."""

    def __init__(self) -> None:
        self.keys_values: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
        self._current_layer: Optional[str] = None

    @property
    def nbytes(self) -> int:
        """Memory the record holds."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.keys_values.values())

    def store(self, layer: str, progress: float, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys_values[(layer, progress)] = (k, v)

    def extend(self, other: "RecordedAnchors") -> None:
        """Append `other`'s anchors after these (same layers and steps required)."""
        if not self.keys_values:
            self.keys_values = dict(other.keys_values)
            return
        if self.keys_values.keys() != other.keys_values.keys():
            raise ValueError("the two references were recorded at different layers or steps; record them with "
                             "the same sharing settings and steps")
        for key, (k, v) in other.keys_values.items():
            k0, v0 = self.keys_values[key]
            self.keys_values[key] = (torch.cat([k0, k], dim=1), torch.cat([v0, v], dim=1))  # along A

    @contextmanager
    def attached(self, controller: SharedAttention) -> Iterator["RecordedAnchors"]:
        """Offer these anchors to every image of the batches `controller` runs (its shared layers)."""
        hooks = [layer.register_forward_pre_hook(self._entering(name)) for name, layer in controller.layers]
        controller.reference = self
        try:
            yield self
        finally:
            controller.reference = None
            self._current_layer = None
            for hook in hooks:
                hook.remove()

    def _entering(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self._current_layer = name
        return hook

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, halves: int, progress: Optional[float],
               strength: float, scale: float) -> torch.Tensor:
        """q, k, v (B, heads, N, d) of the running layer -> each image over [own, anchors]: (B, heads, N, d)."""
        key = (self._current_layer, progress)
        if key not in self.keys_values:
            raise ValueError(f"no anchor keys were recorded for layer {key[0]} at step progress {progress}; the "
                             "reference must be recorded with the run's steps and shared layers")
        anchor_k, anchor_v = self.keys_values[key]  # (halves, A, heads, M, d)
        if anchor_k.shape[0] != halves:
            raise ValueError(f"the anchors were recorded with {anchor_k.shape[0]} guidance half(s) but this batch "
                             f"has {halves}; use the reference's guidance scale")
        per_half = q.shape[0] // halves

        def own_then_anchors(t: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
            own = rearrange(t, "(k b) h n d -> (k b) 1 h n d", k=halves)  # (halves*B, 1, heads, N, d)
            shared = anchors[:, None].expand(-1, per_half, -1, -1, -1, -1)  # (halves, B, A, heads, M, d)
            shared = rearrange(shared, "k b a h m d -> (k b) a h m d")  # (halves*B, A, heads, M, d)
            return torch.cat([own, shared.to(t.dtype)], dim=1)  # (halves*B, 1+A, heads, N, d)

        out = attend_across_images(q[:, None], own_then_anchors(k, anchor_k), own_then_anchors(v, anchor_v),
                                   scale=scale, strength=strength)  # (halves*B, 1, heads, N, d)
        return out[:, 0]


class AnchorRecorder:
    """Records the keys and values of images `indices` of a batch in the layers and step window of
    `settings` (the later run's), while the batch samples under its own controller."""

    def __init__(self, model: nn.Module, settings: SharedAttentionSettings, indices: Sequence[int],
                 dtype: Optional[torch.dtype] = None):
        self.unet = find_unet(model)
        self.layers: list[tuple[str, CrossAttention]] = select_layers(self.unet, settings.groups)
        self.settings = settings
        self.indices = list(indices)
        self.dtype = dtype
        self.record = RecordedAnchors()

    @contextmanager
    def recording(self) -> Iterator[RecordedAnchors]:
        hooks = [layer.register_forward_pre_hook(self._recorder(name, layer)) for name, layer in self.layers]
        try:
            yield self.record
        finally:
            for hook in hooks:
                hook.remove()

    def _recorder(self, name: str, layer: CrossAttention):
        def hook(module: nn.Module, args: tuple) -> None:
            controller: Optional[SharedAttention] = self.unet.shared_attention
            if controller is None or controller.layout.progress is None:
                raise RuntimeError("recording anchors needs the batch to sample under a sharing controller "
                                   "(use an 'off' one for a plain batch), so that the step is known")
            progress, halves = controller.layout.progress, controller.layout.halves
            if not self.settings.in_window(progress):
                return  # the later run does not share at this step: nothing to keep
            x = args[0]  # (halves*R, N, C): self-attention input
            k, v = (rearrange(f(x), "(k b) n (h d) -> k b h n d", k=halves, h=layer.heads)
                    for f in (layer.to_k, layer.to_v))  # (halves, R, heads, N, d)
            k, v = k[:, self.indices], v[:, self.indices]  # (halves, A, heads, N, d)
            if self.dtype is not None:
                k, v = k.to(self.dtype), v.to(self.dtype)
            self.record.store(name, progress, k.contiguous(), v.contiguous())
        return hook


OFF = SharedAttentionSettings(strength=float("-inf"))
"""Settings that share nothing: a plain batch samples under them so that recorders know the step."""


def record_bytes(unet: nn.Module, settings: SharedAttentionSettings, image_side: int, steps: int, halves: int,
                 anchors: int, bytes_per_value: int) -> int:
    """What `AnchorRecorder` keeps for `anchors` images of `image_side` px, computed from shapes alone:
    per shared layer and step in the window, keys and values (2) x halves x anchors x N tokens x channels.
    A layer's tag level is its latent side at 512 px with f = 8 (SD v1's layout), so N = (level * side / 512)^2."""
    total = 0
    for _, layer in select_layers(unet, settings.groups):
        side = int(layer.tag.split(".")[1]) * image_side // 512
        total += 2 * halves * anchors * side * side * layer.to_k.out_features * bytes_per_value
    return total * len(settings.steps_in_window(steps))
