"""Which Stable Diffusion base an add-on file (ControlNet, LoRA) was made for, told from a tensor's width.

Add-on files do not name their base model, but their cross-attention does: it reads text features of the
base's text encoder, SD v1's 768 wide (CLIP ViT-L/14), SD 2.x's 1024 (OpenCLIP ViT-H/14), SDXL's 2048 (two
encoders' features side by side). A file whose width differs from the model's is refused with
`OtherBaseModelError` before any weight is used, naming the base it was made for.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from ldm.checkpoint.errors import OtherBaseModelError

CONTEXT_WIDTHS = {768: "SD v1", 1024: "SD 2.x", 2048: "SDXL"}
CROSS_ATTENTION_KEY_SUFFIX = "attn2.to_k.weight"  # (inner_dim, context width) in every UNet-like model


def base_of_context_width(width: int) -> str:
    """'SD v1', 'SD 2.x', 'SDXL', or a description for other widths (the tiny test models' 32)."""
    return CONTEXT_WIDTHS.get(width, f"a model with {width}-wide text features")


def context_width(shapes: Mapping[str, torch.Tensor | torch.Size]) -> Optional[int]:
    """The text-feature width the first cross-attention of a state dict (or of a {key: shape} mapping) reads,
    or None if it has none."""
    key = next((key for key in shapes if key.endswith(CROSS_ATTENTION_KEY_SUFFIX)), None)
    return None if key is None else int(getattr(shapes[key], "shape", shapes[key])[-1])


def refuse_other_base(source: str, what: str, width: Optional[int], expected: int) -> None:
    """Raise `OtherBaseModelError` when an add-on reading `width`-wide text features meets a model reading
    `expected`-wide ones; `what` names the add-on ("ControlNet", "LoRA")."""
    if width is None or width == expected:
        return
    theirs, ours = base_of_context_width(width), base_of_context_width(expected)
    raise OtherBaseModelError(
        f"{source} is a {what} for {theirs} (its cross-attention reads {width}-wide text features, this model's "
        f"{expected}-wide), so it was not loaded; use a {what} made for {ours}")
