"""The sharing settings a front end's values describe: the one place flags or form values become
`SharedAttentionSettings` (whose own checks and conversions are the settings type's,
`SharedAttentionSettings.from_values`)."""
from __future__ import annotations

from typing import Optional

from ldm.errors import InvalidValue, SettingsError
from ldm.generation.builder.values import SharingValues
from ldm.sharing import SharedAttentionSettings


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
    try:
        return SharedAttentionSettings.from_values(
            values.groups, mode=values.mode, anchors=values.anchors, steps=values.steps, strength=values.strength,
            subjects=values.subjects, dropout=values.dropout, adain=values.adain,
            subject_sharing=values.subject_sharing)
    except InvalidValue as error:
        raise error.within("sharing") from None
