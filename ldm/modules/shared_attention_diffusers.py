"""Batch-shared self-attention for a diffusers `StableDiffusionPipeline` (SD v1), as an attention processor.

The mechanism is this project's (`ldm/modules/shared_attention.py`: the why, the kernel, the settings);
this module only connects it to diffusers' UNet2DConditionModel, so its users get the same sharing:

    from ldm.modules.shared_attention import SharedAttentionSettings
    from ldm.modules.shared_attention_diffusers import DiffusersSharedAttention

    with DiffusersSharedAttention(pipe, SharedAttentionSettings(groups=("up",), mode="anchor")):
        images = pipe(["a wooden chair"] * 4).images

- Layers: every `attn1` of the UNet is tagged like this project's UNet, from its block:
  `down_blocks.i` -> `down.{64 / 2**i}`, `mid_block` -> `mid.{64 / 2**(levels-1)}`, `up_blocks.i` ->
  `up.{64 / 2**(levels-1-i)}` (SD v1: down.64, down.32, down.16, mid.8, up.16, up.32, up.64). The
  selected ones get `SharedSelfAttentionProcessor`; all other processors stay as they are, and every
  processor is put back on exit. Cross-attention (`attn2`) is never touched.
- Guidance halves: diffusers batches `[unconditional; conditional]` as this project does; the number of
  halves is the pipeline's own `do_classifier_free_guidance`, never guessed from the batch size.
- Steps: a forward pre-hook on the UNet reads the timestep the pipeline passes and finds its position
  among the run's timesteps (the last `pipe.num_timesteps` of `pipe.scheduler.timesteps`), so
  progress = step index / steps, as this project's samplers report it. The same hook reads the latent
  grid (h, w); a layer's token grid is that grid divided by its level's factor (`down.32`: 2), rounded
  up as the UNet's stride-2 convolutions round, and checked against the layer's token count.
- Subject words: the selected levels' `attn2` layers (`MASK_LEVELS` of ldm/modules/subject_masks.py)
  get a processor that reads their queries and keys into this project's `SubjectMasks` and then calls
  the layer's own processor, whose output it returns untouched. The subject's token positions come from
  `prompts` and the pipeline's tokenizer, or are given as `subject_positions`.
- Dropout is drawn from a generator seeded by `seed` (this project's samplers use the batch's first
  seed), so a run with the same seed drops the same tokens.

Processors are duck-typed callables in diffusers, so this module imports nothing from diffusers; the
`diffusers` extra (`pip install -e ".[diffusers]"`) is only needed for the pipeline itself.
"""
from __future__ import annotations

import math
import re
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch
from einops import rearrange

from ldm.modules.diffusionmodules.openaimodel import TAG_BASE_RESOLUTION
from ldm.modules.shared_attention import BatchLayout, SharedAttention, SharedAttentionSettings, selected_tags
from ldm.modules.subject_masks import SubjectMasks, subject_token_positions

_ATTENTION = re.compile(r"(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.attentions\.\d+\."
                        r"transformer_blocks\.\d+\.(attn1|attn2)\.processor")


def _layer_tags(unet: Any, kind: str) -> dict[str, str]:
    """{processor name: level tag} for every `kind` ("attn1" or "attn2") layer of a UNet2DConditionModel."""
    levels = len(unet.config.block_out_channels)
    tags = {}
    for name in unet.attn_processors:
        match = _ATTENTION.fullmatch(name)
        if match is None or match.group(4) != kind:
            continue
        down, up = match.group(2), match.group(3)
        if down is not None:
            path, level = "down", int(down)
        elif up is not None:
            path, level = "up", levels - 1 - int(up)
        else:
            path, level = "mid", levels - 1
        tags[name] = f"{path}.{TAG_BASE_RESOLUTION // 2 ** level}"
    return tags


def diffusers_layer_tags(unet: Any) -> dict[str, str]:
    """{processor name: tag} for every self-attention layer of a diffusers UNet2DConditionModel."""
    return _layer_tags(unet, "attn1")


def token_grid(tag: str, latent_grid: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The (h, w) token grid of a layer of level `tag` in a UNet called on latents of `latent_grid`:
    each level below the first halves the grid, rounding up (stride-2 convolutions with padding 1)."""
    factor = TAG_BASE_RESOLUTION // int(tag.split(".")[1])
    grid = (math.ceil(latent_grid[0] / factor), math.ceil(latent_grid[1] / factor))
    if grid[0] * grid[1] != tokens:
        raise ValueError(f"layer {tag} has {tokens} tokens, which is not the {grid[0]}x{grid[1]} grid its level "
                         f"gives on {latent_grid[0]}x{latent_grid[1]} latents")
    return grid


def _plain_ids(tokenizer: Any) -> Any:
    """A transformers CLIP tokenizer seen as this project's: `encode(text)` without start and end tokens."""
    return SimpleNamespace(encode=lambda text: tokenizer(text, add_special_tokens=False).input_ids)


class _LayerProcessor:
    """A processor put in place of one layer's own (`original`, kept to call and to restore), knowing
    the controller and the layer's level tag."""

    def __init__(self, controller: "DiffusersSharedAttention", original: Any, tag: str) -> None:
        self.controller = controller
        self.original = original
        self.tag = tag


class SharedSelfAttentionProcessor(_LayerProcessor):
    """A diffusers attention processor for one `attn1`: this project's batch sharing while the controller
    applies (step window, strength), the layer's original processor otherwise."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.controller.applies_now():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        unsupported = [name for name, value in (("an attention mask", attention_mask),
                                                ("a context", encoder_hidden_states),
                                                ("spatial_norm", attn.spatial_norm), ("group_norm", attn.group_norm),
                                                ("norm_q", getattr(attn, "norm_q", None)))
                       if value is not None] + (["a residual connection"] if attn.residual_connection else [])
        if unsupported or hidden_states.dim() != 3:
            raise ValueError(f"batch-shared self-attention supports SD v1's plain self-attention layers; this one "
                             f"has {', '.join(unsupported) or 'a 4-D input'}")
        heads = attn.heads
        self.controller.grid = token_grid(self.tag, self.controller.latent_grid, hidden_states.shape[1])
        q, k, v = (rearrange(proj(hidden_states), "b n (h d) -> b h n d", h=heads)
                   for proj in (attn.to_q, attn.to_k, attn.to_v))  # (B, N, heads*d) -> (B, heads, N, d)
        out = self.controller.attend(q, k, v, scale=attn.scale)  # (B, heads, N, d)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, heads*d)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        return out / attn.rescale_output_factor


class SubjectReadingProcessor(_LayerProcessor):
    """A diffusers attention processor for one `attn2` feeding the subject masks: it reads the layer's
    queries and keys (conditional half) and returns what the layer's own processor computes, unchanged."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        c = self.controller
        if encoder_hidden_states is None or hidden_states.dim() != 3 or getattr(attn, "norm_cross", None):
            raise ValueError("subject masks read SD v1's plain cross-attention layers; this one has no text "
                             "context, a 4-D input or a normalised context")
        grid = token_grid(self.tag, c.latent_grid, hidden_states.shape[1])
        c.masks.record(attn, hidden_states, encoder_hidden_states, grid, c.latent_grid, c.layout.halves)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


class DiffusersSharedAttention(SharedAttention):
    """The controller for a diffusers pipeline: the same settings, step window and kernel as
    `SharedAttention` (whose `applies_now` and `attend` it inherits); entering installs the processors
    on the selected layers (and, with subject words, the reading ones on the mask levels' `attn2`),
    leaving restores the pipeline's own.

    With subject words, `prompts` (the batch's prompts, read with `pipeline.tokenizer`) or
    `subject_positions` (each prompt's subject token positions, 0 = start token) say where the subject
    is named; `seed` seeds the dropout."""

    def __init__(self, pipeline: Any, settings: SharedAttentionSettings, prompts: Optional[Sequence[str]] = None,
                 subject_positions: Optional[Sequence[Sequence[int]]] = None, seed: int = 0) -> None:
        if settings.subject and subject_positions is None:
            if prompts is None or getattr(pipeline, "tokenizer", None) is None:
                raise ValueError("subject masks need the subject's token positions in each prompt; pass the "
                                 "prompts (with a pipeline that has a tokenizer) or subject_positions")
            tokenizer = pipeline.tokenizer
            subject_positions = subject_token_positions(_plain_ids(tokenizer), prompts, settings.subject,
                                                        tokenizer.model_max_length)
        self.settings = settings
        self.subject_positions = subject_positions
        self.seed = int(seed)
        # the rest of the state SharedAttention.attend reads; recorded anchors are not offered here
        self.masks, self.reference, self.grid, self.latent_grid, self._generator = None, None, None, None, None
        self.pipeline = pipeline
        self.unet = pipeline.unet
        tags = diffusers_layer_tags(self.unet)
        chosen = selected_tags(list(tags.values()), settings.groups)
        self.layers = [(name, tag) for (name, tag), keep in zip(tags.items(), chosen) if keep]
        self.readers = [(name, tag) for name, tag in _layer_tags(self.unet, "attn2").items()
                        if settings.subject and SubjectMasks.reads(tag)]
        self.layout = BatchLayout()
        self._previous: dict[str, Any] = {}
        self._hook: Any = None

    def __enter__(self) -> "DiffusersSharedAttention":
        if self._hook is not None:
            raise RuntimeError("batch-shared attention is already active on this pipeline; leave it first")
        self._previous = dict(self.unet.attn_processors)
        processors = dict(self._previous)
        for name, tag in self.layers:
            processors[name] = SharedSelfAttentionProcessor(self, self._previous[name], tag)
        for name, tag in self.readers:
            processors[name] = SubjectReadingProcessor(self, self._previous[name], tag)
        self.unet.set_attn_processor(processors)
        self._hook = self.unet.register_forward_pre_hook(self._read_step, with_kwargs=True)
        self._begin_run()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unet.set_attn_processor(self._previous)
        self._hook.remove()
        self._hook, self._previous = None, {}
        self.layout = BatchLayout()
        self.masks, self._generator, self.grid, self.latent_grid = None, None, None, None

    def _read_step(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Before each UNet call: the latent grid, the guidance halves and the step the pipeline is at."""
        sample = args[0] if args else kwargs["sample"]
        self.start_call(tuple(sample.shape[-2:]))
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        run = self.pipeline.scheduler.timesteps[-self.pipeline.num_timesteps:]
        position = (run == torch.as_tensor(timestep).flatten()[0].to(run.dtype)).nonzero().flatten()
        progress = None if len(position) == 0 else position[0].item() / len(run)
        self.layout = BatchLayout(halves=2 if self.pipeline.do_classifier_free_guidance else 1, progress=progress)
