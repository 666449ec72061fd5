"""Configurations of the consistency evaluation: named ways of generating a prompt set.

A configuration is plain generation ('off') or batch-shared attention over some layer groups, with an
optional step window, strength, mode (anchor, others, pooled, mean), subject masks, dropout and AdaIN (`ldm.modules.shared_attention`). This module parses
the text syntax (CONFIGURATION_SYNTAX), derives the default list from a UNet's layer groups, and
checks every configuration against the model before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ldm.data.world import SUBJECTS
from ldm.errors import InvalidValue
from ldm.modules.shared_attention import PATHS, SharedAttentionSettings, select_layers, valid_group_names


@dataclass(frozen=True)
class Configuration:
    """A named way of generating: `sharing` None means plain generation."""

    name: str
    sharing: Optional[SharedAttentionSettings]

    def as_metadata(self) -> dict[str, Any]:
        return {"name": self.name, "sharing": self.sharing.as_metadata() if self.sharing else None}


CONFIGURATION_SYNTAX = ("GROUPS[@OPTION...]: GROUPS joined by '+' (all, down, mid, up, up.32, 32, ...), OPTION "
                        "START:END (step window), s=STRENGTH, anchor or anchor=K, mask (subject masks of the demo "
                        "worlds' subject nouns: chair, table, lamp, vase, face), subject=WORD/WORD, drop=P "
                        "(shared-token dropout), adain, others, pooled or mean (modes); or 'off', 'anchor' "
                        "(= all@anchor=1), 'default' (the default list)")


def parse_configuration(spec: str) -> Configuration:
    """'up@0:0.3', 'mid+up@s=-1', 'all@anchor=2', 'off', 'anchor' -> a Configuration named `spec`."""
    name = spec.strip()
    if name == "off":
        return Configuration("off", None)
    groups, *options = ("all@anchor=1" if name == "anchor" else name).split("@")
    values: dict[str, Any] = {"groups": tuple(g.strip() for g in groups.split("+") if g.strip())}
    try:
        for option in options:
            if ":" in option:
                start, end = option.split(":")
                values["steps"] = (float(start), float(end))
            elif option.startswith("s="):
                values["strength"] = float(option[2:])
            elif option == "anchor" or option.startswith("anchor="):
                values["mode"], values["anchors"] = "anchor", int(option.partition("=")[2] or 1)
            elif option == "mask":
                values["subject"] = tuple(SUBJECTS)  # v1's four classes and v2's face: every default prompt
            elif option.startswith("subject="):
                values["subject"] = tuple(w for w in option[len("subject="):].split("/") if w)
            elif option.startswith("drop="):
                values["dropout"] = float(option[len("drop="):])
            elif option == "adain":
                values["adain"] = True
            elif option in ("others", "pooled", "mean"):
                values["mode"] = option
            else:
                raise ValueError(f"unknown option {option!r}")
        return Configuration(name, SharedAttentionSettings(**values))
    except ValueError as error:
        problem = error.problem if isinstance(error, InvalidValue) else str(error)
        raise InvalidValue("configs", name, f"{problem}. Syntax: {CONFIGURATION_SYNTAX}") from None


def default_configuration_specs(unet: torch.nn.Module) -> list[str]:
    """off, all, the paths, each level whose layers differ from every earlier entry's (so mid.8 alone
    is not listed twice), one-anchor mode, and sharing over the first half of the steps."""
    valid = valid_group_names(unet)
    specs = ["off", "all", *(p for p in PATHS if p in valid)]
    seen = [frozenset(name for name, _ in select_layers(unet, [spec])) for spec in specs[1:]]
    for level in (name for name in valid if name.isdigit()):
        layers = frozenset(name for name, _ in select_layers(unet, [level]))
        if layers not in seen:
            specs.append(level)
            seen.append(layers)
    return [*specs, "anchor", "all@0:0.5"]


def resolve_configurations(specs: Optional[Sequence[str]], unet: torch.nn.Module) -> list[Configuration]:
    """Parse and check `specs` against the model's layer groups ('default' expands; None = default)."""
    expanded: list[str] = []
    for spec in specs or ["default"]:
        expanded += default_configuration_specs(unet) if spec.strip() == "default" else [spec.strip()]
    duplicates = sorted({s for s in expanded if expanded.count(s) > 1})
    if duplicates:
        raise InvalidValue("configs", ",".join(duplicates), "listed twice (note 'default' already holds "
                                                            f"{', '.join(default_configuration_specs(unet))})")
    configurations = [parse_configuration(spec) for spec in expanded]
    for configuration in configurations:
        if configuration.sharing is not None:
            try:
                select_layers(unet, configuration.sharing.groups)
            except ValueError as error:
                raise InvalidValue("configs", configuration.name, str(error)) from None
    return configurations
