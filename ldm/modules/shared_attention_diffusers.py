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
  progress = step index / steps, as this project's samplers report it.

Processors are duck-typed callables in diffusers, so this module imports nothing from diffusers; the
`diffusers` extra (`pip install -e ".[diffusers]"`) is only needed for the pipeline itself.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch
from einops import rearrange

from ldm.errors import InvalidValue
from ldm.modules.diffusionmodules.openaimodel import TAG_BASE_RESOLUTION
from ldm.modules.shared_attention import BatchLayout, SharedAttention, SharedAttentionSettings, selected_tags

_SELF_ATTENTION = re.compile(r"(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.attentions\.\d+\."
                             r"transformer_blocks\.\d+\.attn1\.processor")


def diffusers_layer_tags(unet: Any) -> dict[str, str]:
    """{processor name: tag} for every self-attention layer of a diffusers UNet2DConditionModel."""
    levels = len(unet.config.block_out_channels)
    tags = {}
    for name in unet.attn_processors:
        match = _SELF_ATTENTION.fullmatch(name)
        if match is None:
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


class SharedSelfAttentionProcessor:
    """A diffusers attention processor for one `attn1`: this project's batch sharing while the controller
    applies (step window, strength), the layer's original processor otherwise."""

    def __init__(self, controller: "DiffusersSharedAttention", original: Any) -> None:
        self.controller = controller
        self.original = original

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
        q, k, v = (rearrange(proj(hidden_states), "b n (h d) -> b h n d", h=heads)
                   for proj in (attn.to_q, attn.to_k, attn.to_v))  # (B, N, heads*d) -> (B, heads, N, d)
        out = self.controller.attend(q, k, v, scale=attn.scale)  # (B, heads, N, d)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, heads*d)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        return out / attn.rescale_output_factor


class DiffusersSharedAttention(SharedAttention):
    """The controller for a diffusers pipeline: the same settings, step window and kernel as
    `SharedAttention` (whose `applies_now` and `attend` it inherits); entering installs the processors
    on the selected layers, leaving restores the pipeline's own."""

    def __init__(self, pipeline: Any, settings: SharedAttentionSettings) -> None:
        # Subject masks read this project's cross-attention layers and pooling needs the token grid
        # of this project's transformer blocks; neither is wired into diffusers' processors yet.
        if settings.subject:
            raise InvalidValue("subject", ",".join(settings.subject), "subject masks are not available in the "
                               "diffusers processor yet; use this project's pipeline (ldm.generation)")
        if settings.mode == "pooled" or settings.dropout:
            field, value = ("mode", "pooled") if settings.mode == "pooled" else ("dropout", settings.dropout)
            raise InvalidValue(field, value, "is not available in the diffusers processor yet; use this "
                               "project's pipeline (ldm.generation)")
        self.settings = settings
        # the state SharedAttention.attend reads, for the options this controller offers
        self.masks, self.reference, self.grid, self.latent_grid, self._generator = None, None, None, None, None
        self.pipeline = pipeline
        self.unet = pipeline.unet
        tags = diffusers_layer_tags(self.unet)
        chosen = selected_tags(list(tags.values()), settings.groups)
        self.layers = [(name, tag) for (name, tag), keep in zip(tags.items(), chosen) if keep]
        self.layout = BatchLayout()
        self._previous: dict[str, Any] = {}
        self._hook: Any = None

    def __enter__(self) -> "DiffusersSharedAttention":
        if self._hook is not None:
            raise RuntimeError("batch-shared attention is already active on this pipeline; leave it first")
        self._previous = dict(self.unet.attn_processors)
        processors = dict(self._previous)
        for name, _ in self.layers:
            processors[name] = SharedSelfAttentionProcessor(self, self._previous[name])
        self.unet.set_attn_processor(processors)
        self._hook = self.unet.register_forward_pre_hook(self._read_step, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unet.set_attn_processor(self._previous)
        self._hook.remove()
        self._hook, self._previous = None, {}
        self.layout = BatchLayout()

    def _read_step(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Before each UNet call: the guidance halves and the step the pipeline is at."""
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        run = self.pipeline.scheduler.timesteps[-self.pipeline.num_timesteps:]
        position = (run == torch.as_tensor(timestep).flatten()[0].to(run.dtype)).nonzero().flatten()
        progress = None if len(position) == 0 else position[0].item() / len(run)
        self.layout = BatchLayout(halves=2 if self.pipeline.do_classifier_free_guidance else 1, progress=progress)
