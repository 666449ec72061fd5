"""The controller: switches batch sharing on for the selected layers of this project's UNet, and off again.

`with SharedAttention(model, settings, ...):` (or the keyword form `shared_attention(model, groups=...)`)
starts a `SharingRun` (ldm/sharing/run.py) and puts a `SharingProcessor` in the processor slot of each
selected self-attention layer; with subject words it also adds the run's reader to the cross-attention
layers of the mask levels (reading only: their output stays the one their own processor computes). On
exit every layer gets its previous processor and readers back. Nothing else is written on the model,
and nothing is tracked by hooks: each call's guidance halves, step and token grid arrive as the layer's
`LayerCall` (ldm/modules/step_context.py).
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
import torch.nn as nn

from ldm.modules.attention import PLAIN, CrossAttention, processors_installed, readers_added
from ldm.modules.cross_attention_read import cross_attention_layers
from ldm.modules.step_context import LayerCall
from ldm.sharing.layers import find_unet, select_layers, tagged_layers
from ldm.sharing.masks import SubjectMasks
from ldm.sharing.subject_words import Positions, per_subject, subject_token_positions
from ldm.sharing.run import SharingRun
from ldm.sharing.settings import SharedAttentionSettings

if TYPE_CHECKING:
    from ldm.sharing.reference import RecordedAnchors


class SharingProcessor:
    """The processor of one selected self-attention layer (module path `name`): shared attention while
    the run applies to the call, the layer's plain attention otherwise."""

    def __init__(self, run: SharingRun, name: str) -> None:
        self.run, self.name = run, name

    def __call__(self, layer: CrossAttention, x: torch.Tensor, context: Optional[torch.Tensor],
                 call: Optional[LayerCall]) -> torch.Tensor:
        if call is None:
            raise ValueError(f"the shared layer {self.name} was called without its LayerCall; call it through "
                             "its SpatialTransformer (or the UNet), which passes the step context and token grid")
        if context is not None:
            raise ValueError(f"the shared layer {self.name} is a cross-attention layer; only self-attention shares")
        if not self.run.applies(call.step):
            return PLAIN(layer, x, context, call)
        q, k, v = layer.project(x)  # (B, heads, N, d) each
        return layer.output(self.run.attend(q, k, v, scale=layer.scale, call=call, layer=self.name))


def active_run(model: nn.Module) -> Optional[SharingRun]:
    """The sharing run active on the model's UNet, or None."""
    for _, layer in tagged_layers(find_unet(model)):
        if isinstance(layer.processor, SharingProcessor):
            return layer.processor.run
    return None


class SharedAttention:
    """Batch sharing with `settings` on a LatentDiffusion model or a UNetModel, for a `with` block.

    `subject_positions[s][i]`: subject s's token positions in the prompt of (conditional) image i (for a
    single subject [i] will do), needed with subjects (`subject_token_positions` finds them from the
    prompts); `seed`: the run's seed,
    which seeds the dropout generator; `reference`: anchors recorded in another run that every image
    also attends to. Each entry starts a fresh run (masks, dropout draws)."""

    def __init__(self, model: nn.Module, settings: SharedAttentionSettings,
                 subject_positions: Optional[Sequence] = None, seed: int = 0,
                 reference: Optional["RecordedAnchors"] = None):
        if settings.subjects and subject_positions is None:
            raise ValueError("subject masks need the subject's token positions in each prompt; pass the prompts "
                             "(or subject_positions)")
        self.settings = settings
        self.unet = find_unet(model)
        self.layers = select_layers(self.unet, settings.groups)
        self.subject_positions = None if subject_positions is None else per_subject(subject_positions)
        self.seed = int(seed)
        self.reference = reference
        self.run: Optional[SharingRun] = None
        self._scope: Optional[ExitStack] = None

    def __enter__(self) -> "SharedAttention":
        if active_run(self.unet) is not None:
            raise RuntimeError("batch-shared attention is already active on this model; leave it before entering again")
        self.run = SharingRun(self.settings, self.subject_positions, self.seed, self.reference)
        scope = ExitStack()
        scope.enter_context(processors_installed([(layer, SharingProcessor(self.run, name))
                                                  for name, layer in self.layers]))
        if self.settings.subjects:
            scope.enter_context(readers_added([(layer, self.run.read_cross_attention)
                                               for _, tag, layer in cross_attention_layers(self.unet)
                                               if SubjectMasks.reads(tag)]))
        self._scope = scope
        return self

    def __exit__(self, *exc) -> None:
        self._scope.close()
        self._scope, self.run = None, None


def shared_attention(model: nn.Module, groups: Union[str, Sequence[str]] = "all", mode: str = "all",
                     anchors: int = 1, steps: tuple[float, float] = (0.0, 1.0), strength: float = 0.0,
                     subjects: Union[str, Sequence] = (), dropout: float = 0.0, adain: bool = False,
                     subject_sharing: str = "pooled", prompts: Optional[Sequence[str]] = None,
                     subject_positions: Optional[Sequence] = None, seed: int = 0) -> SharedAttention:
    """`with shared_attention(model, groups="up"): ...` turns batch sharing on for the selected layers.
    With `subjects` ("chair", or "chair;lamp" for two), give the batch's `prompts` (a LatentDiffusion
    model finds the words' tokens with its tokenizer) or the token positions directly; `seed` seeds the
    dropout."""
    settings = SharedAttentionSettings(groups=groups, mode=mode, anchors=anchors, steps=steps, strength=strength,
                                       subjects=subjects, dropout=dropout, adain=adain, subject_sharing=subject_sharing)
    return controller_for(model, settings, prompts=prompts, subject_positions=subject_positions, seed=seed)


def controller_for(model: nn.Module, settings: SharedAttentionSettings, prompts: Optional[Sequence[str]] = None,
                   subject_positions: Optional[Sequence] = None, seed: int = 0,
                   reference: Optional["RecordedAnchors"] = None) -> SharedAttention:
    """The controller of `settings` for a batch of `prompts` (needed with subject words unless
    `subject_positions` is given) generated from `seed`, beside `reference`'s anchors if given."""
    if settings.subjects and subject_positions is None and prompts is not None:
        subject_positions = subject_positions_for(model, prompts, settings.subjects)
    return SharedAttention(model, settings, subject_positions=subject_positions, seed=seed, reference=reference)


def subject_positions_for(model: nn.Module, prompts: Sequence[str], subjects: Sequence[Sequence[str]]) -> Positions:
    """Each subject's token positions in each prompt, found with `model`'s text encoder's tokenizer."""
    encoder = getattr(model, "cond_stage_model", None)
    if encoder is None or not hasattr(encoder, "tokenizer"):
        raise TypeError("finding the subject's tokens needs a model with a text encoder (cond_stage_model); "
                        "for a bare UNet pass subject_positions")
    return subject_token_positions(encoder.tokenizer, prompts, subjects, getattr(encoder, "max_length", 77))
