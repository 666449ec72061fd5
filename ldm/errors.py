"""The errors library code raises about what it was given, naming the settings they concern.

Library code never knows how a value reached it (a notebook keyword, a command-line flag, a web
form), so its messages speak of the setting's own name (`field`, e.g. "eta" or "sharing.steps") and
the value. Front ends map the field to their own name for it: `ldm/cli.py` turns
`InvalidValue("eta", 5.0, "must be between 0 and 1 ...")` into `error: --ddim_eta 5: must be ...`.

A message that needs to name other settings (what to add or drop) writes each as `{field}` and lists
it in `mentions` (InvalidValue) or `fields` (SettingsError); `describe(names)` writes a front end's
names there, str() the fields' own.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

# A value quoted in a message is cut to this many characters (a 10 MB prompt is not repeated).
MAX_SHOWN = 200


def format_value(value: Any) -> str:
    """A value as a person would type it: 5 rather than 5.0, 1e+30, -inf, 0.6:0.9 for a step window;
    cut to MAX_SHOWN characters."""
    if isinstance(value, bool) or value is None:
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:g}" if math.isfinite(value) else str(value)
    elif isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        text = ":".join(format_value(v) for v in value)
    else:
        text = str(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + f"... ({len(text)} characters)"


def name_fields(text: str, fields: Sequence[str], names: Mapping[str, str]) -> str:
    """`text` with each `{field}` of `fields` written as `names[field]` (the field itself when unnamed)."""
    for name in fields:
        text = text.replace("{" + name + "}", names.get(name, name))
    return text


class InvalidValue(ValueError):
    """`value` given for the setting `field` cannot work; `problem` says why and what would.

    str(error) reads "field=value: problem", e.g. "eta=5: must be between 0 (deterministic) and 1".
    `mentions`: other fields the problem names as `{field}`.
    """

    def __init__(self, field: str, value: Any, problem: str, mentions: Sequence[str] = ()) -> None:
        self.field, self.value, self.problem, self.mentions = field, value, problem, tuple(mentions)
        super().__init__(f"{field}={format_value(value)}: {self.describe_problem({})}")

    def describe_problem(self, names: Mapping[str, str]) -> str:
        return name_fields(self.problem, self.mentions, names)

    def within(self, prefix: str) -> "InvalidValue":
        """The same error for a setting nested under `prefix` (e.g. "steps" of the sharing settings)."""
        return InvalidValue(f"{prefix}.{self.field}", self.value, self.problem, self.mentions)


class SettingsError(ValueError):
    """Settings that do not work together, or a file a setting names that cannot be used; `message`
    writes each setting of `fields` as `{field}`, e.g. "{sharing.mode} only applies together with
    {sharing.groups}"."""

    def __init__(self, message: str, *fields: str) -> None:
        self.message, self.fields = message, fields
        super().__init__(self.describe({}))

    def describe(self, names: Mapping[str, str]) -> str:
        return name_fields(self.message, self.fields, names)


class ConfigError(ValueError):
    """A config file that does not describe a model this project can build (bad YAML, missing entries,
    a target outside the allow-list); nothing in it was run."""
