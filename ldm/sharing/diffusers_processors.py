"""Batch-shared self-attention for a diffusers `StableDiffusionPipeline` (SD v1), as attention processors.

The mechanism is this project's (ldm/sharing/: the why, the kernels, the settings, the run); this module
only connects a `SharingRun` to diffusers' UNet2DConditionModel, so its users get the same sharing:

    from ldm.sharing import SharedAttentionSettings
    from ldm.sharing.diffusers_processors import DiffusersSharedAttention

    with DiffusersSharedAttention(pipe, SharedAttentionSettings(groups=("up",), mode="anchor")):
        images = pipe(["a wooden chair"] * 4).images

- Layers: every `attn1` of the UNet is tagged like this project's UNet, from its block:
  `down_blocks.i` -> `down.{64 / 2**i}`, `mid_block` -> `mid.{64 / 2**(levels-1)}`, `up_blocks.i` ->
  `up.{64 / 2**(levels-1-i)}` (SD v1: down.64, down.32, down.16, mid.8, up.16, up.32, up.64). The
  selected ones get `SharedSelfAttentionProcessor`, which computes q, k, v as diffusers does and hands
  them to the run's `attend`, the same code this project's UNet runs; all other processors stay as
  they are, and every processor is put back on exit. Cross-attention (`attn2`) is never changed.
- The step context: diffusers' pipeline passes its processors nothing that says which step runs, so
  one forward pre-hook on the UNet (the one hook of the package) reads the timestep the pipeline passes,
  finds its position among the run's timesteps (the last `pipe.num_timesteps` of
  `pipe.scheduler.timesteps`) and builds the call's `StepContext` as this project's guidance helper
  does: the halves are the pipeline's own `do_classifier_free_guidance` (never guessed from the batch
  size; diffusers batches `[unconditional; conditional]` as this project does), the step index and
  count, the latent size. A layer's token grid is that size divided by its level's factor, rounded up
  as the UNet's stride-2 convolutions round, and checked against the layer's token count.
- Subject words: the mask levels' `attn2` layers (`MASK_LEVELS` of ldm/sharing/masks.py) get a
  processor that calls the layer's own processor, returns its output untouched, and hands the layer's
  input to the run's mask reader. The subject's token positions come from `prompts` and the pipeline's
  tokenizer, or are given as `subject_positions`.
- Dropout is drawn from a generator seeded by `seed` (this project's samplers use the batch's first
  seed), so a run with the same seed drops the same tokens. Recorded anchors (references) are not offered
  here.

Processors are duck-typed callables in diffusers, so this module imports nothing from diffusers; the
`diffusers` extra (`pip install -e ".[diffusers]"`) is only needed for the pipeline itself.
"""
from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch
from einops import rearrange

from ldm.modules.step_context import TAG_BASE_RESOLUTION, LayerCall, StepContext
from ldm.sharing.layers import selected_tags
from ldm.sharing.masks import SubjectMasks
from ldm.sharing.subject_words import per_subject, subject_token_positions
from ldm.sharing.run import SharingRun
from ldm.sharing.settings import SharedAttentionSettings

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
    """The (h, w) token grid of a layer of level `tag` in a UNet called on latents of `latent_grid`
    (`StepContext.token_grid`), checked against the `tokens` the layer received."""
    grid = StepContext(latent_size=latent_grid).token_grid(tag)
    if grid[0] * grid[1] != tokens:
        raise ValueError(f"layer {tag} has {tokens} tokens, which is not the {grid[0]}x{grid[1]} grid its level "
                         f"gives on {latent_grid[0]}x{latent_grid[1]} latents")
    return grid


def _plain_ids(tokenizer: Any) -> Any:
    """A transformers CLIP tokenizer seen as this project's: `encode(text)` without start and end tokens."""
    return SimpleNamespace(encode=lambda text: tokenizer(text, add_special_tokens=False).input_ids)


class _LayerProcessor:
    """A processor put in place of one layer's own (`original`, kept to call and to restore), knowing
    the controller, the layer's processor name and its level tag."""

    def __init__(self, controller: "DiffusersSharedAttention", original: Any, name: str, tag: str) -> None:
        self.controller = controller
        self.original = original
        self.name = name
        self.tag = tag

    def layer_call(self, tokens: int) -> LayerCall:
        """This layer's LayerCall in the running UNet call."""
        step = self.controller.step
        return LayerCall(step, token_grid(self.tag, step.latent_size, tokens))


class SharedSelfAttentionProcessor(_LayerProcessor):
    """A diffusers attention processor for one `attn1`: the run's batch sharing while it applies (step
    window, strength, subject masks made), the layer's original processor otherwise."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        run = self.controller.run
        if not run.applies(self.controller.step):
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
        call = self.layer_call(hidden_states.shape[1])
        q, k, v = (rearrange(proj(hidden_states), "b n (h d) -> b h n d", h=heads)
                   for proj in (attn.to_q, attn.to_k, attn.to_v))  # (B, N, heads*d) -> (B, heads, N, d)
        out = run.attend(q, k, v, scale=attn.scale, call=call, layer=self.name)  # (B, heads, N, d)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, heads*d)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        return out / attn.rescale_output_factor


class SubjectReadingProcessor(_LayerProcessor):
    """A diffusers attention processor for one `attn2` feeding the subject masks: it returns what the
    layer's own processor computes, unchanged, and hands the layer's input to the run's mask reader."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is None or hidden_states.dim() != 3 or getattr(attn, "norm_cross", None):
            raise ValueError("subject masks read SD v1's plain cross-attention layers; this one has no text "
                             "context, a 4-D input or a normalised context")
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        self.controller.run.read_cross_attention(attn, hidden_states, encoder_hidden_states,
                                                 self.layer_call(hidden_states.shape[1]))
        return out


class DiffusersSharedAttention:
    """Batch sharing with `settings` on a diffusers pipeline, for a `with` block: entering starts a
    `SharingRun` and installs the processors on the selected layers (and, with subject words, the
    reading ones on the mask levels' `attn2`) and the step hook; leaving restores the pipeline's own.

    With subject words, `prompts` (the batch's prompts, read with `pipeline.tokenizer`) or
    `subject_positions` (each prompt's subject token positions, 0 = start token) say where the subject
    is named; `seed` seeds the dropout."""

    def __init__(self, pipeline: Any, settings: SharedAttentionSettings, prompts: Optional[Sequence[str]] = None,
                 subject_positions: Optional[Sequence[Sequence[int]]] = None, seed: int = 0) -> None:
        if settings.subjects and subject_positions is None:
            if prompts is None or getattr(pipeline, "tokenizer", None) is None:
                raise ValueError("subject masks need the subject's token positions in each prompt; pass the "
                                 "prompts (with a pipeline that has a tokenizer) or subject_positions")
            tokenizer = pipeline.tokenizer
            subject_positions = subject_token_positions(_plain_ids(tokenizer), prompts, settings.subjects,
                                                        tokenizer.model_max_length)
        self.settings = settings
        self.subject_positions = None if subject_positions is None else per_subject(subject_positions)
        self.seed = int(seed)
        self.pipeline = pipeline
        self.unet = pipeline.unet
        tags = diffusers_layer_tags(self.unet)
        chosen = selected_tags(list(tags.values()), settings.groups)
        self.layers = [(name, tag) for (name, tag), keep in zip(tags.items(), chosen) if keep]
        self.readers = [(name, tag) for name, tag in _layer_tags(self.unet, "attn2").items()
                        if settings.subjects and SubjectMasks.reads(tag)]
        self.run: Optional[SharingRun] = None
        self.step: Optional[StepContext] = None  # the running UNet call's, built by the step hook
        self._previous: dict[str, Any] = {}
        self._hook: Any = None

    def __enter__(self) -> "DiffusersSharedAttention":
        if self._hook is not None:
            raise RuntimeError("batch-shared attention is already active on this pipeline; leave it first")
        self.run = SharingRun(self.settings, self.subject_positions, self.seed)
        self._previous = dict(self.unet.attn_processors)
        processors = dict(self._previous)
        for name, tag in self.layers:
            processors[name] = SharedSelfAttentionProcessor(self, self._previous[name], name, tag)
        for name, tag in self.readers:
            processors[name] = SubjectReadingProcessor(self, self._previous[name], name, tag)
        self.unet.set_attn_processor(processors)
        self._hook = self.unet.register_forward_pre_hook(self._read_step, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unet.set_attn_processor(self._previous)
        self._hook.remove()
        self._hook, self._previous = None, {}
        self.run, self.step = None, None

    def _read_step(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Before each UNet call: its step context (guidance halves, the step the pipeline is at, latent size)."""
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        run = self.pipeline.scheduler.timesteps[-self.pipeline.num_timesteps:]
        position = (run == torch.as_tensor(timestep).flatten()[0].to(run.dtype)).nonzero().flatten()
        step_index, total = (None, None) if len(position) == 0 else (int(position[0].item()), len(run))
        self.step = StepContext(halves=2 if self.pipeline.do_classifier_free_guidance else 1, step_index=step_index,
                                total_steps=total, latent_size=(sample.shape[-2], sample.shape[-1]))
