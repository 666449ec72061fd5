"""The sharing settings a front end's values describe: the one place flags or form values become
`SharedAttentionSettings` (whose own checks are the settings type's)."""
from __future__ import annotations

from typing import Optional

from ldm.errors import InvalidValue, SettingsError
from ldm.generation.builder.values import SharingValues
from ldm.modules.shared_attention import SharedAttentionSettings, parse_groups


def sharing_settings(values: SharingValues, compare: bool = False) -> Optional[SharedAttentionSettings]:
    """The settings `values` describe, or None when sharing is off (no groups); an option given without
    groups, or `compare` without sharing, is refused rather than ignored."""
    if values.groups is None:
        given = values.given()
        if given:
            field = f"sharing.{given[0]}"
            raise SettingsError(f"{{{field}}} only applies together with {{sharing.groups}} GROUPS; add "
                                f"{{sharing.groups}} (e.g. all) or drop {{{field}}}", field, "sharing.groups")
        if compare:
            raise SettingsError("{compare} shows sharing against no sharing; add {sharing.groups} GROUPS (e.g. all)",
                                "compare", "sharing.groups")
        return None
    window = values.steps or "0:1"
    try:
        start, end = (float(part) for part in window.split(":"))
    except ValueError:
        raise InvalidValue("sharing.steps", window, "give START:END fractions, e.g. 0:0.4") from None
    try:
        return SharedAttentionSettings(
            groups=parse_groups(values.groups), mode=values.mode or "all",
            anchors=1 if values.anchors is None else values.anchors, steps=(start, end),
            strength=0.0 if values.strength is None else values.strength,
            subject=parse_groups(values.subject or ""),
            dropout=0.0 if values.dropout is None else values.dropout, adain=bool(values.adain))
    except InvalidValue as error:
        raise error.within("sharing") from None
