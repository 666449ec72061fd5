"""Configurations of the consistency evaluation: named ways of generating a prompt set.

A configuration is plain generation ('off') or batch-shared attention over some layer groups, with an
optional step window, strength, mode (anchor, others, pooled, mean), subject masks, dropout and AdaIN
(`ldm.sharing`). A configuration's text is the settings' own syntax (`SharedAttentionSettings.from_text`)
plus the names 'off' and 'anchor' and the option 'mask' (the demo worlds' subject nouns); this module
derives the default list from a UNet's layer groups and checks every configuration against the model
before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ldm.data.world import SUBJECTS
from ldm.errors import InvalidValue
from ldm.sharing import PATHS, SharedAttentionSettings, select_layers, valid_group_names
from ldm.sharing.settings import TEXT_SYNTAX


@dataclass(frozen=True)
class Configuration:
    """A named way of generating: `sharing` None means plain generation."""

    name: str
    sharing: Optional[SharedAttentionSettings]

    def as_metadata(self) -> dict[str, Any]:
        return {"name": self.name, "sharing": self.sharing.as_metadata() if self.sharing else None}


CONFIGURATION_SYNTAX = (f"{TEXT_SYNTAX}; 'mask' means subject masks of the demo worlds' subject nouns "
                        f"({', '.join(SUBJECTS)}); or 'off', 'anchor' (= all@anchor=1), 'default' (the default list)")


def parse_configuration(spec: str) -> Configuration:
    """'up@0:0.3', 'mid+up@s=-1', 'all@anchor=2', 'off', 'anchor' -> a Configuration named `spec`."""
    name = spec.strip()
    if name == "off":
        return Configuration("off", None)
    try:
        return Configuration(name, SharedAttentionSettings.from_text("all@anchor=1" if name == "anchor" else name,
                                                                     mask_words=SUBJECTS))
    except InvalidValue as error:
        raise InvalidValue("configs", name, f"{error.problem}. Syntax: {CONFIGURATION_SYNTAX}") from None


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
