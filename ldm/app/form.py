"""The page's form, made from txt2img's argparse options, and a submitted form turned into the
builder's values (`ldm.generation.builder.RunValues`).

Fields: the prompt (one text for every image, or one line per image), the basic sampling options
(`BASIC_FLAGS`) and every option of `add_shared_attention_arguments`, the CLI's shared-attention
group, except two that the page sets itself: --shared-attn (the layer groups, shown as one checkbox
per group name of the model) and --compare (always on with sharing: the page shows both rows).
An option added to that group later appears on the page as a field of its kind, with its --help text
as the explanation: a checkbox for a flag without a value, a list for one with choices, a text box
otherwise; it sets the RunValues field the CLI's flag sets (`GENERATION_FLAGS`).

A submitted form is a JSON object whose keys are the fields' flags (plus "prompt", "per_image" and
"groups"), its values strings as typed (the references: a list of uploads and result URLs).
`form_values` converts each by its option's type (whole number, number, text) and leaves empty fields
out, which means the CLI's default.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Optional, Sequence

from ldm.cli import GENERATION_FLAGS, UsageError, add_sampling_arguments, add_shared_attention_arguments
from ldm.errors import InvalidValue
from ldm.generation.builder import RunValues

# Sampling flags the page shows, with the label it gives each.
BASIC_FLAGS = {"--n_samples": "images", "--seed": "seed", "--ddim_steps": "steps", "--scale": "guidance scale",
               "--negative-prompt": "negative prompt"}
# Shared-attention flags the page sets itself instead of showing a field.
PAGE_SET_FLAGS = ("--shared-attn", "--compare")
SHARING_PREFIX = "--shared-attn-"
FIELD_OF_FLAG = {flag: name for name, flag in GENERATION_FLAGS.items()}
# How a typed text becomes a value, for the option types argparse knows them by, and what a wrong one needs.
TYPE_NAMES = {int: "a whole number", float: "a number"}
# Fields whose value is not the option's type as it stands.
CONVERSIONS: Mapping[str, Callable[[str], Any]] = {"reference_cache": lambda text: text == "on"}
# The field of reference images: uploads or the page's own results (ldm/app/uploads.py), never a path.
REFERENCE_FLAG = "--shared-attn-reference"


@dataclass(frozen=True)
class FormField:
    """One field of the form: the CLI flag it stands for, the value it sets, how it is shown."""

    flag: str  # e.g. "--ddim_steps"; also the field's key in a submitted form
    name: str  # the RunValues field it sets, e.g. "steps" or "sharing.mode"
    label: str
    help: str
    kind: str  # "text", "checkbox", "select" or "reference" (pictures: uploads or the page's results)
    choices: tuple[str, ...] = ()
    value: str = ""  # what the box starts with; "" leaves the CLI's default
    type: Callable[[str], Any] = str  # the option's type: int, float or str

    def convert(self, text: str) -> Any:
        """A typed text as the field's value; InvalidValue naming the field if it is not of its type."""
        if self.kind == "select" and text not in self.choices:
            raise InvalidValue(self.name, text, f"choose one of {', '.join(self.choices)}")
        try:
            value = self.type(text)
        except ValueError:
            raise InvalidValue(self.name, text, f"must be {TYPE_NAMES.get(self.type, 'a text')}") from None
        return CONVERSIONS.get(self.name, lambda v: v)(value)


def _actions(add_arguments: Callable[[argparse.ArgumentParser], None]) -> list[argparse.Action]:
    """The options `add_arguments` defines, read from a throwaway parser."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return [action for action in parser._actions if action.option_strings]


def _help_text(action: argparse.Action) -> str:
    """--help's text for the option, with argparse's %-placeholders filled in."""
    text = action.help or ""
    try:
        return text % {**vars(action), "prog": "txt2img"}
    except (KeyError, TypeError, ValueError):
        return text.replace("%%", "%")


def _field(action: argparse.Action, label: str, value: Any = None) -> FormField:
    flag = max(action.option_strings, key=len)
    name, help_text = FIELD_OF_FLAG[flag], _help_text(action)
    if action.nargs == 0:  # store_true and the like: the flag alone
        return FormField(flag, name, label, help_text, "checkbox")
    if flag == REFERENCE_FLAG:
        return FormField(flag, name, label, "an uploaded picture, or an image of this page's results (its 'use as "
                         "reference' button), that every new image also shares with (anchor mode)", "reference")
    shown = "" if value is None else str(value)
    if action.choices is not None:
        return FormField(flag, name, label, help_text, "select", tuple(str(c) for c in action.choices), shown)
    return FormField(flag, name, label, help_text, "text", value=shown, type=action.type or str)


def basic_fields(defaults: RunValues) -> list[FormField]:
    """The sampling fields, filled with `defaults` (the page's model's values)."""
    by_flag = {max(a.option_strings, key=len): a for a in _actions(add_sampling_arguments)}
    return [_field(by_flag[flag], label, getattr(defaults, FIELD_OF_FLAG[flag])) for flag, label in BASIC_FLAGS.items()]


def sharing_fields() -> list[FormField]:
    """Every shared-attention option of the CLI but the two the page sets itself; empty by default."""
    fields = []
    for action in _actions(add_shared_attention_arguments):
        flag = max(action.option_strings, key=len)
        if flag in PAGE_SET_FLAGS:
            continue
        name = flag[len(SHARING_PREFIX):] if flag.startswith(SHARING_PREFIX) else flag.lstrip("-")
        fields.append(_field(action, name.replace("-", " ").replace("_", " ")))
    return fields


def per_image_prompts(values: Mapping[str, Any]) -> Optional[tuple[str, ...]]:
    """The prompts, one per image, when the form asks for that; None for one prompt for every image."""
    if not values.get("per_image"):
        return None
    prompts = tuple(line.strip() for line in str(values.get("prompt", "")).splitlines() if line.strip())
    if not prompts:
        raise UsageError("the prompt box is empty: write one prompt per line, one image each")
    return prompts


def form_values(values: Mapping[str, Any], fields: Sequence[FormField], base: RunValues,
                resolve_reference: Optional[Callable[[Any], str]] = None) -> RunValues:
    """A submitted form as the builder's values, over `base` (the page's model and limits); with per-image
    prompts there are as many images as prompts. Reference items become files through
    `resolve_reference` (ldm/app/uploads.py); without it a form with references is refused."""
    prompts = per_image_prompts(values)
    run = replace(base, prompt=" ".join(str(values.get("prompt", "")).split()), prompts=prompts)
    groups = values.get("groups") or []
    if not isinstance(groups, list):
        raise UsageError("the layer groups must be a list of group names")
    sharing = replace(run.sharing, groups=",".join(str(group) for group in groups) or None)
    run = replace(run, compare=bool(groups))
    for field in fields:
        value = values.get(field.flag)
        if field.kind == "checkbox":
            value = True if value else None
        elif prompts is not None and field.name == "batch_size":
            value = len(prompts)  # one image per prompt
        elif field.kind == "reference":
            if not value:
                continue
            if not isinstance(value, list) or resolve_reference is None:
                raise InvalidValue("references", str(value)[:80], "give uploaded pictures or images of this "
                                                                  "page's results")
            value = tuple(resolve_reference(item) for item in value)
        elif value is None or not str(value).strip():
            continue
        else:
            value = field.convert(str(value).strip())
        group, _, attribute = field.name.rpartition(".")
        if group == "sharing":
            sharing = replace(sharing, **{attribute: value})
        elif value is not None:
            run = replace(run, **{attribute: value})
    return replace(run, sharing=sharing)
