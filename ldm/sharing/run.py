"""One sharing run: what the shared layers of a batch hold between calls, and the attention they compute.

A `SharingRun` is made when sharing is switched on for a batch (by `SharedAttention` on this project's
UNet, by `DiffusersSharedAttention` on a diffusers pipeline) and lives until it is switched off. It
holds the settings and the run's state: the subject masks (made from the calls before), the dropout
generator (seeded by the run's seed), and anchors recorded in another run (a reference). Everything
that changes from call to call arrives with the call (`LayerCall`: guidance halves, step, token grid).

`attend(q, k, v, call=..., layer=...)` is the shared attention of one selected layer: it picks the
kernel the settings ask for (ldm/sharing/kernels.py), after the transforms they ask for
(ldm/sharing/transforms.py). `applies(step)` says whether a call shares at all (step window,
strength -inf, a subject mask made yet).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn as nn

from ldm.modules.attention_kernel import memory_linear_attention
from ldm.modules.step_context import LayerCall, StepContext
from ldm.sharing.kernels import (attend_own_and_offered, attend_within_subjects, offers, others_seen,
                                  shared_batch_attention)
from ldm.sharing.masks import SubjectMasks
from ldm.sharing.settings import SharedAttentionSettings
from ldm.sharing.subject_words import per_subject
from ldm.sharing.transforms import adain_per_subject, adain_to_group_reference, blend_with_group_mean, pool_tokens

if TYPE_CHECKING:
    from ldm.sharing.reference import RecordedAnchors

# Offset between an image's noise seed and the dropout generator's, so the two streams differ.
DROPOUT_SEED_OFFSET = 0x5EED_D0


class SharingRun:
    """The state of one run with `settings`: `subject_positions[s][i]` are subject s's token positions in
    the prompt of (conditional) image i (needed with subjects); `seed` seeds the dropout generator;
    `reference`, anchors recorded in another run that every image of the batch also attends to."""

    def __init__(self, settings: SharedAttentionSettings, subject_positions: Optional[Sequence] = None,
                 seed: int = 0, reference: Optional["RecordedAnchors"] = None) -> None:
        if settings.subjects and subject_positions is None:
            raise ValueError("subject masks need the subject's token positions in each prompt; pass the prompts "
                             "(or subject_positions)")
        if reference is not None and settings.isolated and settings.adain:
            raise ValueError("AdaIN per subject beside a recorded reference is not supported: the reference records "
                             "its first anchor's statistics of the whole image; drop adain or the reference")
        self.settings = settings
        self.reference = reference
        self.masks: Optional[SubjectMasks] = None
        if settings.subjects:
            subject_positions = per_subject(subject_positions)
            if len(subject_positions) != len(settings.subjects):
                raise ValueError(f"got token positions of {len(subject_positions)} subjects for "
                                 f"{len(settings.subjects)} subjects")
            self.masks = SubjectMasks(subject_positions)
        self._generator: Optional[torch.Generator] = None
        if settings.dropout > 0:
            self._generator = torch.Generator().manual_seed((int(seed) + DROPOUT_SEED_OFFSET) % 2 ** 63)

    def applies(self, step: StepContext) -> bool:
        """Whether the call `step` shares: inside the step window (always, when no step is known), not
        switched off by strength, and with subject masks only once a mask exists."""
        if self.settings.switched_off:
            return False
        if self.masks is not None:
            self.masks.enter_call(step)
            if not self.masks.ready:
                return False
        progress = step.progress
        return progress is None or self.settings.in_window(progress)

    def read_cross_attention(self, layer: nn.Module, x: torch.Tensor, context: Optional[torch.Tensor],
                             call: LayerCall, out: Optional[torch.Tensor] = None) -> None:
        """A reader of a mask level's cross-attention: its subject maps feed the masks (output untouched)."""
        self.masks.record(layer, x, context, call)

    def dropout_draw(self, rows: int, tokens: int) -> torch.Tensor:
        """The next (rows, tokens) uniform draw of the run's dropout generator: one per shared layer call,
        a row per image of the batch (both halves), kept where >= the dropout probability."""
        return torch.rand(rows, tokens, generator=self._generator)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, call: LayerCall,
               layer: str) -> torch.Tensor:
        """q, k, v (B, heads, N, d) of the selected self-attention layer `layer` (its module path) -> its
        attention output, same shape."""
        s = self.settings
        halves = call.step.halves
        if q.shape[0] % halves:
            raise ValueError(f"a batch of {q.shape[0]} cannot be split into {halves} guidance halves")
        if self.reference is not None:  # the anchors are recorded: every image of the batch is a non-anchor
            labels = self.masks.labels_on_grid(call.grid).to(q.device).repeat(halves, 1) if s.isolated else None
            return self.reference.attend(q, k, v, settings=s, draw=self.dropout_draw, call=call, layer=layer,
                                         strength=s.bias, scale=scale, query_labels=labels)
        if s.adain and s.isolated:
            labels = self.masks.labels_on_grid(call.grid).to(q.device).repeat(halves, 1)  # (B, N), per half
            q, k = adain_per_subject(q, labels, halves), adain_per_subject(k, labels, halves)
        elif s.adain:
            q, k = adain_to_group_reference(q, halves), adain_to_group_reference(k, halves)
        if s.mode == "mean":
            return memory_linear_attention(q, blend_with_group_mean(k, halves), blend_with_group_mean(v, halves),
                                           scale=scale)
        if not s.gathers:
            return shared_batch_attention(q, k, v, halves=halves, mode=s.mode, anchors=s.anchors,
                                          strength=s.bias, scale=scale)
        return self._gathered(q, k, v, call=call, scale=scale)

    def _gathered(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, call: LayerCall,
                  scale: float) -> torch.Tensor:
        """Each image offers its pooled / subject / kept tokens; each query sees its own and the offers."""
        s, halves, batch = self.settings, call.step.halves, q.shape[0]
        offered_k, offered_v, grid = k, v, call.grid
        if s.mode == "pooled":
            offered_k, grid = pool_tokens(k, call.grid)  # (B, heads, M, d)
            offered_v, _ = pool_tokens(v, call.grid)
        keep = None  # (B, M) bool
        if self.masks is not None and not s.isolated:
            keep = self.masks.on_grid(grid).to(q.device).repeat(halves, 1)  # the conditional masks, per half
        if s.dropout > 0:
            draw = self.dropout_draw(batch, offered_k.shape[2]).to(q.device)  # (B, M)
            kept = draw >= s.dropout
            keep = kept if keep is None else keep & kept
        seen = others_seen(batch, halves, s.mode, s.anchors)
        if s.isolated:
            labels = self.masks.labels_on_grid(grid).to(q.device).repeat(halves, 1)  # (B, N) in 0..S, per half
            offered = labels if keep is None else labels * keep  # dropped tokens offer no subject
            offered_k, offered_v = offers(k, v, offered > 0)
            offered_labels = [row[row > 0] for row in offered]  # (M_j,) each
            return attend_within_subjects(q, k, v, offered_k, offered_v, offered_labels, labels, seen,
                                          strength=s.bias, scale=scale)
        offered_k, offered_v = offers(offered_k, offered_v, keep)
        return attend_own_and_offered(q, k, v, offered_k, offered_v, seen, include_own=s.mode != "others",
                                      strength=s.bias, scale=scale)
