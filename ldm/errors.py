"""The error a library function raises for a value that cannot work, naming the setting it belongs to.

Library code never knows how a value reached it (a notebook keyword, a command-line flag, a web
form), so its messages speak of the setting's own name (`field`, e.g. "eta" or "sharing.steps") and
the value. Front ends map the field to their own name for it: `ldm/cli.py` turns
`InvalidValue("eta", 5.0, "must be between 0 and 1 ...")` into `error: --ddim_eta 5: must be ...`.
"""
from __future__ import annotations

import math
from typing import Any


def format_value(value: Any) -> str:
    """A value as a person would type it: 5 rather than 5.0, 1e+30, -inf, 0.6:0.9 for a step window."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return ":".join(format_value(v) for v in value)
    return str(value)


class InvalidValue(ValueError):
    """`value` given for the setting `field` cannot work; `problem` says why and what would.

    str(error) reads "field=value: problem", e.g. "eta=5: must be between 0 (deterministic) and 1".
    """

    def __init__(self, field: str, value: Any, problem: str) -> None:
        self.field, self.value, self.problem = field, value, problem
        super().__init__(f"{field}={format_value(value)}: {problem}")

    def within(self, prefix: str) -> "InvalidValue":
        """The same error for a setting nested under `prefix` (e.g. "steps" of the sharing settings)."""
        return InvalidValue(f"{prefix}.{self.field}", self.value, self.problem)
