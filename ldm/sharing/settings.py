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
groups with '+' and words with '/'. Subjects: each subject is a tuple of words, alternatives of one
another ("chair,stool": whichever a prompt uses); several subjects are separated by ';' in a text
("chair;lamp": two subjects). A word may name one occurrence, `face#2` (the second "face" of each
prompt), for two subjects of one kind.
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
MAX_SUBJECTS = 8
# How several subjects share: "pooled" offers every subject's tokens to every query (ConsiStory's
# pooled masks); "isolated" offers a query inside subject A's mask only subject A's tokens.
SUBJECT_SHARING = ("pooled", "isolated")
SUBJECT_WORD = re.compile(r"[A-Za-z0-9']+(#[1-9][0-9]?)?")

TEXT_SYNTAX = ("GROUPS[@OPTION...]: GROUPS joined by '+' (all, down, mid, up, up.32, 32, ...), OPTION "
               "START:END (step window), s=STRENGTH, anchor or anchor=K, mask (the subject words the caller "
               "names for it), subject=WORD/WORD (repeat for several subjects), isolated (each subject shares "
               "only with itself), drop=P (shared-token dropout), adain, others, pooled or mean (modes)")


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


def _subjects(value: Any) -> tuple[tuple[str, ...], ...]:
    """Subjects from a text ('chair,stool;lamp') or a sequence whose items are each one subject (a text of
    alternatives, or a sequence of words), bounded; an InvalidValue naming `subjects` otherwise."""
    if isinstance(value, str):
        items: list[Any] = value.split(";")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise InvalidValue("subjects", value, "subjects must be a text ('chair;lamp') or a sequence of subjects")
    subjects = tuple(words for words in (_names("subjects", item, "subject words") for item in items) if words)
    if len(subjects) > MAX_SUBJECTS:
        raise InvalidValue("subjects", len(subjects), f"at most {MAX_SUBJECTS} subjects")
    return subjects


def subjects_text(subjects: Sequence[Sequence[str]]) -> str:
    """('chair', 'stool'), ('lamp',) -> 'chair,stool;lamp'."""
    return ";".join(",".join(words) for words in subjects)


@dataclass(frozen=True)
class SharedAttentionSettings:
    """What to share. `groups`: layer selection (`ldm/sharing/layers.py`); `mode`: one of `MODES`;
    `anchors`: how many leading images anchor the rest (anchor mode only); `steps`: the (start, end)
    fraction of the denoising steps during which sharing is on; `strength`: logit bias on other images;
    `subjects`: the subjects, each the prompt words naming it (masks from cross-attention; () = no masks);
    `dropout`: probability of dropping each of the other images' tokens; `adain`: AdaIN of queries and
    keys towards the first image of each group (per subject, when isolated); `subject_sharing`: with
    subjects, "pooled" (every subject's tokens offered to every query) or "isolated" (a query inside one
    subject's mask sees only that subject's tokens of the others; a query outside every mask, its own
    image only). Texts are accepted for `groups` ('up,mid') and `subjects` ('chair,stool;lamp'); every
    other field must have its own type."""

    groups: tuple[str, ...] = ("all",)
    mode: str = "all"
    anchors: int = 1
    steps: tuple[float, float] = (0.0, 1.0)
    strength: float = 0.0
    subjects: tuple[tuple[str, ...], ...] = ()
    dropout: float = 0.0
    adain: bool = False
    subject_sharing: str = "pooled"

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", _names("groups", self.groups, "layer groups"))
        object.__setattr__(self, "subjects", _subjects(self.subjects))
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
        self._check_subjects()
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

    def _check_subjects(self) -> None:
        text = subjects_text(self.subjects)
        bad = [w for words in self.subjects for w in words if not SUBJECT_WORD.fullmatch(w)]
        if bad:
            raise InvalidValue("subjects", text, f"subject words are single words (letters, digits; WORD#N for the "
                                                 f"N-th occurrence), got {bad[0]!r}; separate alternatives with "
                                                 "commas and subjects with ';'")
        seen: set[str] = set()
        for words in self.subjects:
            repeated = seen & {w.lower() for w in words}
            if repeated:
                raise InvalidValue("subjects", text, f"the word {sorted(repeated)[0]!r} names two subjects; give each "
                                                     "subject its own words (face#1 and face#2 for two of one kind)")
            seen |= {w.lower() for w in words}
        if not isinstance(self.subject_sharing, str) or self.subject_sharing not in SUBJECT_SHARING:
            raise InvalidValue("subject_sharing", self.subject_sharing, f"choose one of {', '.join(SUBJECT_SHARING)}")
        if self.subject_sharing != "pooled" and self.mode not in ("all", "anchor"):
            raise InvalidValue("subject_sharing", self.subject_sharing, f"isolated subjects share in mode 'all' or "
                                                                        f"'anchor', not {self.mode!r}")

    def _check_mode_options(self) -> None:
        if self.mode in ("others", "mean"):
            why = ("leaves a query only the other images' tokens, so masking or dropping them could leave it "
                   "nothing to attend to" if self.mode == "others" else "adds no other images' tokens to select from")
            for name, used in (("subjects", bool(self.subjects)), ("dropout", self.dropout > 0)):
                if used:
                    value = subjects_text(self.subjects) if name == "subjects" else self.dropout
                    raise InvalidValue(name, value, f"mode {self.mode!r} {why}; use mode 'all', "
                                                    "'anchor' or 'pooled' with it")
        if self.mode == "mean" and self.strength != 0.0:
            raise InvalidValue("strength", self.strength, "mode 'mean' has no other images' keys to bias; use "
                                                          "strength 0 with it")

    # ---- what the settings mean ------------------------------------------------------------------
    @property
    def gathers(self) -> bool:
        """Whether each image offers a selection of its tokens (the gathered kernel) rather than all."""
        return bool(self.subjects) or self.dropout > 0 or self.mode in ("others", "pooled")

    @property
    def isolated(self) -> bool:
        """Whether each subject shares only with itself (a query sees only its own subject's tokens)."""
        return bool(self.subjects) and self.subject_sharing == "isolated"

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
                    strength: Optional[float] = None, subjects: Union[str, Sequence[str], None] = None,
                    dropout: Optional[float] = None, adain: Optional[bool] = None,
                    subject_sharing: Optional[str] = None) -> "SharedAttentionSettings":
        """The settings a front end's values describe; None means "not given" (the default). A step
        window may be the text 'START:END'; `subjects` a text of one subject's alternatives
        ('chair,stool') or a sequence of such texts, one per subject (a repeated flag). Beyond the
        constructor's checks: anchors given without anchor mode, a subject given without words, and the
        subject sharing given without subjects, are errors rather than ignored."""
        if anchors is not None and mode != "anchor":
            raise InvalidValue("anchors", anchors, "anchors apply in anchor mode only; add the anchor mode or "
                                                   "leave anchors out")
        if subjects is not None:
            given = [part for item in ([subjects] if isinstance(subjects, str) else list(subjects))
                     for part in (item.split(";") if isinstance(item, str) else [item])]
            if not given or any(not _names("subjects", item, "subject words") for item in given):
                raise InvalidValue("subjects", subjects, "no subject word given; name the subject (e.g. chair) or "
                                                         "leave subject words out")
            subjects = [item if isinstance(item, str) else tuple(item) for item in given]
        if subject_sharing is not None and not subjects:
            raise InvalidValue("subject_sharing", subject_sharing, "applies to subjects; name them or leave it out")
        values: dict[str, Any] = {"groups": groups}
        if isinstance(steps, str):
            steps = parse_window(steps)
        for name, value in (("mode", mode), ("anchors", anchors), ("steps", steps), ("strength", strength),
                            ("subjects", subjects), ("dropout", dropout), ("adain", adain),
                            ("subject_sharing", subject_sharing)):
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
        subjects: list[tuple[str, ...]] = []
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
                    subjects.append(tuple(mask_words))
                elif option.startswith("subject="):
                    subjects.append(split_names(option[len("subject="):], "/"))
                elif option == "isolated":
                    values["subject_sharing"] = "isolated"
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
        return cls(**values, subjects=tuple(subjects))

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
        parts += ["subject=" + "/".join(words) for words in self.subjects]
        if self.subject_sharing != "pooled":
            parts.append(self.subject_sharing)
        if self.dropout:
            parts.append(f"drop={self.dropout:g}")
        if self.adain:
            parts.append("adain")
        return "@".join(parts)

    # ---- PNG metadata ----------------------------------------------------------------------------
    def as_metadata(self) -> dict[str, Any]:
        """JSON-ready: every field, group and word lists comma-joined, subjects ';'-joined (under the key
        "subject"), the window as 'START:END'. Options added later are written only where they differ
        from their default, so settings that do not use them are written as they always were."""
        values = {"groups": ",".join(self.groups), "mode": self.mode, "anchors": self.anchors,
                  "steps": f"{self.steps[0]}:{self.steps[1]}", "strength": self.strength,
                  "subject": subjects_text(self.subjects), "dropout": self.dropout, "adain": self.adain}
        for name, default in LATER_OPTIONS.items():
            if getattr(self, name) != default:
                values[name] = getattr(self, name)
        return values

    @classmethod
    def from_metadata(cls, values: Any) -> Optional["SharedAttentionSettings"]:
        """The settings `as_metadata` wrote (None: no sharing). Untrusted: an unknown key, a wrong type or
        a value out of range is an InvalidValue naming the field, before anything uses it."""
        if values is None:
            return None
        if not isinstance(values, Mapping):
            raise InvalidValue("shared_attention", type(values).__name__, "the recorded sharing settings must be "
                                                                          "a mapping of field to value")
        known = (set(cls.__dataclass_fields__) - {"subjects"}) | {"subject"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidValue("shared_attention", ",".join(map(str, unknown))[:80], "unknown sharing settings")
        fields = dict(values)
        if "subject" in fields:
            fields["subjects"] = fields.pop("subject")
        for name in ("groups", "steps", "subjects"):
            if name in fields and not isinstance(fields[name], str):
                raise InvalidValue(name, fields[name], "must be written as a text in the metadata")
        if "steps" in fields:
            fields["steps"] = parse_window(fields["steps"])
        if "strength" in fields and _is_whole(fields["strength"]):
            fields["strength"] = float(fields["strength"])  # JSON writes 0.0 as 0 in some writers
        if "dropout" in fields and _is_whole(fields["dropout"]):
            fields["dropout"] = float(fields["dropout"])
        return cls(**fields)


# Options newer than the metadata's first form, with their defaults (written only when set otherwise).
LATER_OPTIONS: dict[str, Any] = {"subject_sharing": "pooled"}


def parse_window(text: str) -> tuple[float, float]:
    """'0:0.4' -> (0.0, 0.4); anything else is an InvalidValue of `steps`."""
    if not isinstance(text, str) or len(text) > 64:
        raise InvalidValue("steps", text, "give START:END fractions, e.g. 0:0.4")
    try:
        start, end = (float(part) for part in text.split(":"))
    except ValueError:
        raise InvalidValue("steps", text, "give START:END fractions, e.g. 0:0.4") from None
    return start, end
