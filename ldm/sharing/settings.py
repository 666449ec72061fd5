"""What to share: one frozen settings type that owns every check and every conversion.

`SharedAttentionSettings` is the whole description of a batch-sharing run (which layers, which mode,
which steps, and the subject-aware options; the package's entrance, `ldm/sharing/__init__.py`,
explains each). Every way a setting reaches the library goes through it:
- keywords from Python: the constructor, which checks every field's type and value and every rule
  between fields, raising `InvalidValue` naming the field (a wrong type is an error, never coerced:
  'no' is not a boolean, '3' is not a number of anchors);
- values as a front end has them (a command line's or a web form's texts, None = not given):
  `from_values`, which adds the rules about what was given (anchors given without anchor mode,
  subject words given but empty);
- the text syntax of the studies (`from_text` / `to_text`): `GROUPS[@OPTION...]`, e.g. `up@mask@drop=0.5`;
- a PNG's metadata (`as_metadata` / `from_metadata`), which is untrusted input: sizes are bounded and
  types checked before anything is built from it.

Names: group and word lists are written comma-separated in values and metadata (`mid,up.32`,
`chair,lamp`); the study syntax, whose configurations are themselves listed with commas, joins
groups with '+' and words with '/'.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from ldm.errors import InvalidValue

MODES = ("all", "anchor", "others", "pooled", "mean")
MODE_INTUITIONS = {
    "all": "every image sees every image of its group (own tokens included)",
    "anchor": "the first K images share among themselves; every other image sees itself and them",
    "others": "an image sees only the other images' tokens, not its own",
    "pooled": "an image sees its own tokens and the others' average-pooled 2x2 (a quarter of the extra cost)",
    "mean": "keys and values from (group mean + 2 x own) / 3 of the layer input; no extra keys",
}
# Strengths beyond this magnitude make no difference to a float32 softmax (e^-1000 == 0), and keeping
# the bias finite keeps the key padding below representable in float16.
MAX_ABS_STRENGTH = 1000.0
# Bounds on what a text (a PNG's metadata, a form) may make the settings hold.
MAX_NAMES = 64
MAX_NAME_LENGTH = 32
MAX_ANCHORS = 4096

TEXT_SYNTAX = ("GROUPS[@OPTION...]: GROUPS joined by '+' (all, down, mid, up, up.32, 32, ...), OPTION "
               "START:END (step window), s=STRENGTH, anchor or anchor=K, mask (the subject words the caller "
               "names for it), subject=WORD/WORD, drop=P (shared-token dropout), adain, others, pooled or "
               "mean (modes)")


def split_names(spec: Union[str, Sequence[str]], separator: str = ",") -> tuple[str, ...]:
    """'mid, up.32' -> ('mid', 'up.32'): a list of names written with `separator`, blanks dropped.
    A sequence is taken as the names themselves (each must be a text)."""
    if isinstance(spec, str):
        items = spec.split(separator)
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        raise TypeError(f"expected a text or a sequence of texts, got {type(spec).__name__}")
    if not all(isinstance(item, str) for item in items):
        raise TypeError("every name must be a text")
    return tuple(item.strip() for item in items if item.strip())


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _names(field: str, value: Any, what: str) -> tuple[str, ...]:
    """A tuple of names from a text or a sequence of texts, bounded, or an InvalidValue naming `field`."""
    try:
        names = split_names(value)
    except TypeError as error:
        raise InvalidValue(field, value, f"{what} must be a text or a sequence of texts ({error})") from None
    if len(names) > MAX_NAMES or any(len(name) > MAX_NAME_LENGTH for name in names):
        raise InvalidValue(field, ",".join(names)[:80], f"at most {MAX_NAMES} {what} of at most "
                                                        f"{MAX_NAME_LENGTH} characters each")
    return names


@dataclass(frozen=True)
class SharedAttentionSettings:
    """What to share. `groups`: layer selection (`ldm/sharing/layers.py`); `mode`: one of `MODES`;
    `anchors`: how many leading images anchor the rest (anchor mode only); `steps`: the (start, end)
    fraction of the denoising steps during which sharing is on; `strength`: logit bias on other images;
    `subject`: the prompt words naming the subject (masks from cross-attention; () = no masks);
    `dropout`: probability of dropping each of the other images' tokens; `adain`: AdaIN of queries and
    keys towards the first image of each group. Texts are accepted for `groups` and `subject`
    ('up,mid'); every other field must have its own type."""

    groups: tuple[str, ...] = ("all",)
    mode: str = "all"
    anchors: int = 1
    steps: tuple[float, float] = (0.0, 1.0)
    strength: float = 0.0
    subject: tuple[str, ...] = ()
    dropout: float = 0.0
    adain: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", _names("groups", self.groups, "layer groups"))
        object.__setattr__(self, "subject", _names("subject", self.subject, "subject words"))
        if not self.groups:
            raise InvalidValue("groups", "", "no layer groups given; use e.g. 'all', 'up' or 'mid,up.32'")
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise InvalidValue("mode", self.mode, f"unknown shared-attention mode {self.mode!r}; choose one of "
                                                  f"{', '.join(MODES)}")
        if not _is_whole(self.anchors):
            raise InvalidValue("anchors", self.anchors, "anchors must be a whole number of images")
        if not 1 <= self.anchors <= MAX_ANCHORS:
            raise InvalidValue("anchors", self.anchors, f"anchors must be at least 1 and at most {MAX_ANCHORS}")
        if self.anchors != 1 and self.mode != "anchor":
            raise InvalidValue("anchors", self.anchors, f"anchors apply in anchor mode only, and the mode is "
                                                        f"{self.mode!r}; set the mode to 'anchor' or leave anchors out")
        self._check_steps()
        if not _is_number(self.strength) or math.isnan(self.strength) or self.strength == math.inf:
            raise InvalidValue("strength", self.strength, "strength must be a number or -inf (off)")
        bad = [w for w in self.subject if not re.fullmatch(r"[A-Za-z0-9']+", w)]
        if bad:
            raise InvalidValue("subject", ",".join(self.subject), f"subject words are single words (letters, digits), "
                                                                  f"got {bad[0]!r}; separate several with commas")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise InvalidValue("dropout", self.dropout, "the dropout probability must satisfy 0 <= p < 1")
        if not isinstance(self.adain, bool):
            raise InvalidValue("adain", self.adain, "adain must be True or False")
        self._check_mode_options()

    def _check_steps(self) -> None:
        steps = self.steps
        if not isinstance(steps, (tuple, list)) or len(steps) != 2 or not all(_is_number(v) for v in steps):
            raise InvalidValue("steps", steps, "the step window is two numbers (start, end), fractions of the steps")
        object.__setattr__(self, "steps", (float(steps[0]), float(steps[1])))
        start, end = self.steps
        if not 0.0 <= start < end <= 1.0:
            raise InvalidValue("steps", self.steps, f"the step window {start}:{end} must satisfy 0 <= start < end "
                                                    "<= 1 (fractions of the steps)")

    def _check_mode_options(self) -> None:
        if self.mode in ("others", "mean"):
            why = ("leaves a query only the other images' tokens, so masking or dropping them could leave it "
                   "nothing to attend to" if self.mode == "others" else "adds no other images' tokens to select from")
            for name, used in (("subject", bool(self.subject)), ("dropout", self.dropout > 0)):
                if used:
                    value = ",".join(self.subject) if name == "subject" else self.dropout
                    raise InvalidValue(name, value, f"mode {self.mode!r} {why}; use mode 'all', "
                                                    "'anchor' or 'pooled' with it")
        if self.mode == "mean" and self.strength != 0.0:
            raise InvalidValue("strength", self.strength, "mode 'mean' has no other images' keys to bias; use "
                                                          "strength 0 with it")

    # ---- what the settings mean ------------------------------------------------------------------
    @property
    def gathers(self) -> bool:
        """Whether each image offers a selection of its tokens (the gathered kernel) rather than all."""
        return bool(self.subject) or self.dropout > 0 or self.mode in ("others", "pooled")

    @property
    def switched_off(self) -> bool:
        """Strength -inf: no other image's token can receive any weight, so nothing is shared."""
        return self.strength == -math.inf

    @property
    def bias(self) -> float:
        """The strength as the finite logit bias the kernels add (clamped to +-MAX_ABS_STRENGTH)."""
        return max(-MAX_ABS_STRENGTH, min(MAX_ABS_STRENGTH, self.strength))

    def in_window(self, progress: float) -> bool:
        """Whether the step at `progress` (step index / number of steps) lies in the step window."""
        start, end = self.steps
        return start <= progress < end

    def steps_in_window(self, total_steps: int, first: int = 0) -> list[int]:
        """The indices (0 = first, noisiest) of the steps of a `total_steps`-step grid that share, among
        those from `first` on (img2img samples the grid's last steps only)."""
        return [index for index in range(first, total_steps) if self.in_window(index / total_steps)]

    # ---- from a front end's values ---------------------------------------------------------------
    @classmethod
    def from_values(cls, groups: Union[str, Sequence[str]], *, mode: Optional[str] = None,
                    anchors: Optional[int] = None, steps: Union[str, tuple[float, float], None] = None,
                    strength: Optional[float] = None, subject: Union[str, Sequence[str], None] = None,
                    dropout: Optional[float] = None, adain: Optional[bool] = None) -> "SharedAttentionSettings":
        """The settings a front end's values describe; None means "not given" (the default). A step
        window may be the text 'START:END'. Beyond the constructor's checks: anchors given without
        anchor mode, and subject words given but empty, are errors rather than ignored."""
        if anchors is not None and mode != "anchor":
            raise InvalidValue("anchors", anchors, "anchors apply in anchor mode only; add the anchor mode or "
                                                   "leave anchors out")
        if subject is not None and not _names("subject", subject, "subject words"):
            raise InvalidValue("subject", subject, "no subject word given; name the subject (e.g. chair) or "
                                                   "leave subject words out")
        values: dict[str, Any] = {"groups": groups}
        if isinstance(steps, str):
            steps = parse_window(steps)
        for name, value in (("mode", mode), ("anchors", anchors), ("steps", steps), ("strength", strength),
                            ("subject", subject), ("dropout", dropout), ("adain", adain)):
            if value is not None:
                values[name] = value
        return cls(**values)

    # ---- the study's text syntax -----------------------------------------------------------------
    @classmethod
    def from_text(cls, spec: str, mask_words: Sequence[str] = ()) -> "SharedAttentionSettings":
        """'up@0:0.3', 'mid+up@s=-1', 'all@anchor=2', 'up@mask@drop=0.5' -> settings (`TEXT_SYNTAX`).
        `mask` means subject masks of `mask_words`."""
        groups, *options = spec.strip().split("@")
        values: dict[str, Any] = {"groups": split_names(groups, "+")}
        try:
            for option in options:
                if ":" in option:
                    values["steps"] = parse_window(option)
                elif option.startswith("s="):
                    values["strength"] = float(option[2:])
                elif option == "anchor" or option.startswith("anchor="):
                    values["mode"], values["anchors"] = "anchor", int(option.partition("=")[2] or 1)
                elif option == "mask":
                    if not mask_words:
                        raise ValueError("'mask' needs subject words from the caller; use subject=WORD/WORD")
                    values["subject"] = tuple(mask_words)
                elif option.startswith("subject="):
                    values["subject"] = split_names(option[len("subject="):], "/")
                elif option.startswith("drop="):
                    values["dropout"] = float(option[len("drop="):])
                elif option == "adain":
                    values["adain"] = True
                elif option in ("others", "pooled", "mean"):
                    values["mode"] = option
                else:
                    raise ValueError(f"unknown option {option!r}")
        except InvalidValue:
            raise
        except ValueError as error:  # the syntax itself; callers show TEXT_SYNTAX with it
            raise InvalidValue("text", spec, str(error)) from None
        return cls(**values)

    def to_text(self) -> str:
        """The settings in the study's syntax; `from_text(s.to_text()) == s`."""
        parts = ["+".join(self.groups)]
        if self.mode == "anchor":
            parts.append(f"anchor={self.anchors}")
        elif self.mode != "all":
            parts.append(self.mode)
        if self.steps != (0.0, 1.0):
            parts.append(f"{self.steps[0]:g}:{self.steps[1]:g}")
        if self.strength != 0.0:
            parts.append(f"s={self.strength:g}")
        if self.subject:
            parts.append("subject=" + "/".join(self.subject))
        if self.dropout:
            parts.append(f"drop={self.dropout:g}")
        if self.adain:
            parts.append("adain")
        return "@".join(parts)

    # ---- PNG metadata ----------------------------------------------------------------------------
    def as_metadata(self) -> dict[str, Any]:
        """JSON-ready: every field, group and word lists comma-joined, the window as 'START:END'."""
        return {"groups": ",".join(self.groups), "mode": self.mode, "anchors": self.anchors,
                "steps": f"{self.steps[0]}:{self.steps[1]}", "strength": self.strength,
                "subject": ",".join(self.subject), "dropout": self.dropout, "adain": self.adain}

    @classmethod
    def from_metadata(cls, values: Any) -> Optional["SharedAttentionSettings"]:
        """The settings `as_metadata` wrote (None: no sharing). Untrusted: an unknown key, a wrong type or
        a value out of range is an InvalidValue naming the field, before anything uses it."""
        if values is None:
            return None
        if not isinstance(values, Mapping):
            raise InvalidValue("shared_attention", type(values).__name__, "the recorded sharing settings must be "
                                                                          "a mapping of field to value")
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidValue("shared_attention", ",".join(map(str, unknown))[:80], "unknown sharing settings")
        fields = dict(values)
        for name in ("groups", "steps", "subject"):
            if name in fields and not isinstance(fields[name], str):
                raise InvalidValue(name, fields[name], "must be written as a text in the metadata")
        if "steps" in fields:
            fields["steps"] = parse_window(fields["steps"])
        if "strength" in fields and _is_whole(fields["strength"]):
            fields["strength"] = float(fields["strength"])  # JSON writes 0.0 as 0 in some writers
        if "dropout" in fields and _is_whole(fields["dropout"]):
            fields["dropout"] = float(fields["dropout"])
        return cls(**fields)


def parse_window(text: str) -> tuple[float, float]:
    """'0:0.4' -> (0.0, 0.4); anything else is an InvalidValue of `steps`."""
    if not isinstance(text, str) or len(text) > 64:
        raise InvalidValue("steps", text, "give START:END fractions, e.g. 0:0.4")
    try:
        start, end = (float(part) for part in text.split(":"))
    except ValueError:
        raise InvalidValue("steps", text, "give START:END fractions, e.g. 0:0.4") from None
    return start, end
