"""Which self-attention layers share: layer tags, group names, and the listing `--shared-attn help` prints.

`UNetModel` tags every `attn1` with its resolution group when it is built: `down.64`, `down.32`,
`down.16`, `mid.8`, `up.16`, `up.32`, `up.64` (the level is the SD v1 latent side at 512 px). A
selection is a list of group names: `all`, a path (`down`, `mid`, `up`), a path and level (`up.32`)
or a bare level (`32` = every path at that level). Layers are selected by tag only, never by counting
calls or by sequence length.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch.nn as nn

from ldm.modules.attention import CrossAttention
from ldm.sharing.settings import MODE_INTUITIONS

if TYPE_CHECKING:
    from ldm.modules.token_grids import LayerGrid

PATHS = ("down", "mid", "up")


def find_unet(model: nn.Module) -> nn.Module:
    """The UNet inside a LatentDiffusion model (`model.model.diffusion_model`), or the UNet itself."""
    if hasattr(model, "self_attention_layers"):  # a UNetModel (or any module that lists its attn1 layers)
        return model
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if unet is None or not hasattr(unet, "self_attention_layers"):
        raise TypeError(f"expected a LatentDiffusion model or a UNetModel, got {type(model).__name__}")
    return unet


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
